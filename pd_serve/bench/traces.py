"""Trace data model (`TraceRequest`, `Trace`, malformed-row policy), the Mooncake (FAST'25) JSONL
loader, Mooncake block scaling and prompt synthesis for replay against a small model.

Mooncake: one JSON line per request, `{"timestamp": ms, "input_length": n, "output_length": m,
"hash_ids": [...]}`; `hash_ids` are prefix-chained ids of 512-token blocks (equal id at position
i: that block and all before it are identical), `len(hash_ids) == ceil(n / 512)`. Every format
loads through `pd_serve.bench.trace_formats.load_trace` into the same `Trace`.

Lifecycle:
1. `read_mooncake(path)` -> `Trace` (`load_mooncake`: its requests as a list; `load_trace`: any
   format); malformed lines raise ValueError naming file and line (`strict=False`: skipped);
2. `spread_buckets` spreads requests sharing a (3 s quantised) timestamp over the gap to the next;
3. `scale(requests, block_tokens, max_model_len)` shrinks lengths by `block_tokens / 512` (a
   512-token block becomes `block_tokens` tokens), capped to the context (`scaling.scale_trace`);
4. `prompt_tokens(req, block_tokens, vocab_size, salt)`: one fixed pseudo-random block per hash
   id (from id and salt) concatenated and cut to `input_len`, so equal hash-id prefixes give
   identical token prefixes (no hash ids: `scaling.synth_prompt`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

MOONCAKE_BLOCK = 512
FIRST_TOKEN_ID = 3  # ids below are special tokens (pad/bos/eos) in the demo tokenizer
NOTED_REASONS = 3  # malformed-row reasons kept in a lenient trace's notes


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: arrival (s from trace start; 0.0 for traces without times, whose
    arrivals come from an arrival process), lengths in tokens, prefix-chained block ids (empty
    when the trace has no prefix information), scenario tag and source (file:line)."""

    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    scenario: str = "default"
    source: str = ""


@dataclass(frozen=True)
class Trace:
    """A loaded or generated trace: requests in arrival order; `timed` when arrivals are real
    (else all are 0.0 and an arrival process supplies them); `block_size` tokens per hash id
    (512 for Mooncake, `block_tokens` after block scaling, None without prefix information);
    `skipped` malformed rows dropped in lenient mode; `notes` what the loader decided; `fmt` the
    format name it came from."""

    name: str
    requests: tuple[TraceRequest, ...]
    timed: bool
    block_size: int | None = None
    skipped: int = 0
    notes: tuple[str, ...] = ()
    fmt: str = ""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def span_s(self) -> float:
        """Seconds from the first to the last arrival (0.0 for untimed or empty traces)."""
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0


@dataclass(frozen=True)
class LengthStats:
    """Mean, median and 99th percentile (numpy linear) of a list of lengths."""

    mean: float
    p50: float
    p99: float

    @staticmethod
    def of(values: Sequence[int]) -> LengthStats:
        if not values:
            return LengthStats(0.0, 0.0, 0.0)
        arr = np.asarray(values, dtype=float)
        return LengthStats(float(arr.mean()), float(np.percentile(arr, 50)),
                           float(np.percentile(arr, 99)))


@dataclass(frozen=True)
class ScaleReport:
    """What scaling did: factor applied, tokens per hash-id block after scaling (0 without
    blocks), requests whose input / output was cut to fit (`capped`: either), the policy and
    context, and input / output length statistics before and after."""

    factor: float
    block_tokens: int
    capped_input: int
    capped_output: int
    policy: str = "blocks"
    max_model_len: int = 0
    capped: int = 0
    input_before: LengthStats | None = None
    input_after: LengthStats | None = None
    output_before: LengthStats | None = None
    output_after: LengthStats | None = None


class RowPolicy:
    """Malformed rows and time order of one file being loaded.

    1. `bad(where, why, file)`: strict raises ValueError naming file (default the policy's),
       line and problem; lenient counts the row as skipped and keeps the first few reasons;
    2. `keep(out, req, line)` appends; an arrival before the previous one raises when strict,
       else is kept and later sorted (stably, shifted so the first is 0 s) and noted;
    3. `trace(...)` builds the `Trace`; no requests at all raises ValueError."""

    def __init__(self, path: str | Path, kind: str, strict: bool) -> None:
        self.path, self.kind, self.strict = str(path), kind, strict
        self.skipped = 0
        self.reasons: list[str] = []
        self.unsorted = 0
        self._last = float("-inf")

    def bad(self, where: int | str, why: str, file: str | Path | None = None) -> None:
        msg = f"{file or self.path}:{where}: malformed {self.kind} row: {why}"
        if self.strict:
            raise ValueError(msg)
        self.skipped += 1
        if len(self.reasons) < NOTED_REASONS:
            self.reasons.append(msg)

    def keep(self, out: list[TraceRequest], req: TraceRequest, line: int) -> None:
        if req.arrival_s < self._last:
            if self.strict:
                raise ValueError(f"{self.path}:{line}: arrival {req.arrival_s:.6f} s is before the "
                                 f"previous row's {self._last:.6f} s (strict=False sorts rows)")
            self.unsorted += 1
        self._last = max(self._last, req.arrival_s)
        out.append(req)

    def trace(self, out: list[TraceRequest], name: str, timed: bool, fmt: str,
              block_size: int | None = None, notes: Sequence[str] = ()) -> Trace:
        if not out:
            why = (f"all {self.skipped} rows malformed, first: {self.reasons[0]}" if self.skipped
                   else "empty file")
            raise ValueError(f"{self.path}: no requests ({why})")
        notes = list(notes)
        if self.unsorted:
            out = sorted(out, key=lambda r: r.arrival_s)
            t0 = out[0].arrival_s
            if t0 < 0:
                out = [replace(r, arrival_s=r.arrival_s - t0) for r in out]
            notes.append(f"{self.unsorted} row(s) out of time order: sorted by arrival")
        if self.skipped:
            notes.append(f"skipped {self.skipped} malformed row(s)")
            notes.extend(self.reasons)
        return Trace(name, tuple(out), timed, block_size, self.skipped, tuple(notes), fmt)


def check_limit(limit: int | None) -> None:
    """ValueError unless `limit` is None (everything) or a positive request count."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def _int_field(row: dict[str, object], key: str, minimum: int) -> int:
    value = row.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_line(line: str, block: int) -> TraceRequest:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from exc
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    ts = _int_field(row, "timestamp", 0)
    n_in = _int_field(row, "input_length", 1)
    n_out = _int_field(row, "output_length", 0)
    ids = row.get("hash_ids")
    if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"'hash_ids' must be a list of integers, got {ids!r}")
    if len(ids) != -(-n_in // block):
        raise ValueError(f"{len(ids)} hash_ids for input_length {n_in} "
                         f"(expected ceil({n_in}/{block}) = {-(-n_in // block)})")
    return TraceRequest(ts / 1000.0, n_in, n_out, tuple(ids))


def read_mooncake(path: str | Path, strict: bool = True, limit: int | None = None,
                  block: int = MOONCAKE_BLOCK) -> Trace:
    """The first `limit` valid requests (all if None) of a Mooncake JSONL file as a timed
    `Trace` with `block_size=block`; blank lines skipped, source `<file name>:<line>`."""
    check_limit(limit)
    rows = RowPolicy(path, "Mooncake trace", strict)
    out: list[TraceRequest] = []
    name = Path(path).name
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                req = _parse_line(line, block)
            except ValueError as exc:
                rows.bad(lineno, str(exc))
                continue
            rows.keep(out, replace(req, source=f"{name}:{lineno}"), lineno)
    return rows.trace(out, Path(path).stem, timed=True, fmt="mooncake", block_size=block)


def load_trace(path: str | Path, fmt: str | None = None, strict: bool = True,
               limit: int | None = None, **fmt_options: Any) -> Trace:
    """Any trace format: `pd_serve.bench.trace_formats.load_trace` (imported on call, since that
    module builds on this one)."""
    from pd_serve.bench.trace_formats import load_trace as load
    return load(path, fmt, strict, limit, **fmt_options)


def load_mooncake(path: str | Path, limit: int | None = None,
                  block: int = MOONCAKE_BLOCK) -> list[TraceRequest]:
    """The first `limit` requests (all if None) of a Mooncake JSONL file (strict)."""
    return list(read_mooncake(path, limit=limit, block=block).requests)


def spread_buckets(requests: Sequence[TraceRequest], bucket_s: float = 3.0) -> list[TraceRequest]:
    """Requests sharing one timestamp spread evenly over [t, t + gap), gap = time to the next
    distinct timestamp, at most `bucket_s` (the Mooncake conversation trace is quantised to
    ~3 s); order is kept."""
    stamps = sorted({r.arrival_s for r in requests})
    nxt = {t: (stamps[i + 1] - t if i + 1 < len(stamps) else bucket_s)
           for i, t in enumerate(stamps)}
    counts: dict[float, int] = {}
    for r in requests:
        counts[r.arrival_s] = counts.get(r.arrival_s, 0) + 1
    seen: dict[float, int] = {}
    out = []
    for r in requests:
        k = seen.get(r.arrival_s, 0)
        seen[r.arrival_s] = k + 1
        gap = min(bucket_s, nxt[r.arrival_s])
        out.append(replace(r, arrival_s=r.arrival_s + gap * k / counts[r.arrival_s]))
    return out


def scale(requests: Sequence[TraceRequest], block_tokens: int, max_model_len: int,
          max_output: int | None = None,
          block: int = MOONCAKE_BLOCK) -> tuple[list[TraceRequest], ScaleReport]:
    """Lengths times `block_tokens / block` (rounded up, at least 1 token; output at most
    `max_output`); then input cut so input + output <= max_model_len (hash_ids cut to match).
    `block` must be a multiple of `block_tokens`, so the scaled prompt still has exactly one
    block of `block_tokens` per hash id. Scenario and source are kept."""
    if block_tokens <= 0 or block % block_tokens:
        raise ValueError(f"block_tokens must divide {block}, got {block_tokens}")
    k = block // block_tokens
    out, capped_in, capped_out, capped = [], 0, 0, 0
    for r in requests:
        n_out = max(1, -(-r.output_len // k))
        cut = False
        if max_output is not None and n_out > max_output:
            n_out, capped_out, cut = max_output, capped_out + 1, True
        if n_out >= max_model_len:
            raise ValueError(f"output {n_out} leaves no room for a prompt in {max_model_len}")
        n_in = max(1, -(-r.input_len // k))
        if n_in + n_out > max_model_len:
            n_in, capped_in, cut = max_model_len - n_out, capped_in + 1, True
        ids = r.hash_ids[:-(-n_in // block_tokens)]
        capped += cut
        out.append(replace(r, input_len=n_in, output_len=n_out, hash_ids=ids))
    return out, ScaleReport(1.0 / k, block_tokens, capped_in, capped_out, "blocks",
                            max_model_len, capped)


def block_tokens_of(hash_id: int, block_tokens: int, vocab_size: int, salt: int = 0) -> list[int]:
    """The fixed token block of `hash_id` (ids in [3, vocab_size)); a different `salt` gives an
    unrelated workload with the same sharing structure (no prefix-cache carry-over)."""
    rng = random.Random(f"mooncake-block:{salt}:{hash_id}")  # str seeds ignore PYTHONHASHSEED
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(block_tokens)]


def prompt_tokens(req: TraceRequest, block_tokens: int, vocab_size: int,
                  salt: int = 0) -> list[int]:
    """The request's prompt: its hash ids' blocks concatenated, cut to `input_len`."""
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_TOKEN_ID}, got {vocab_size}")
    ids: list[int] = []
    for h in req.hash_ids:
        ids.extend(block_tokens_of(h, block_tokens, vocab_size, salt))
    if len(ids) < req.input_len:
        raise ValueError(f"{len(req.hash_ids)} blocks of {block_tokens} cannot cover "
                         f"{req.input_len} tokens")
    return ids[:req.input_len]

