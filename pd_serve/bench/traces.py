"""Mooncake (FAST'25) JSONL traces for replay against a small model.

One line per request: `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids":
[...]}`, where `hash_ids` are prefix-chained ids of 512-token blocks (equal id at position i:
that block and every block before it are identical) and `len(hash_ids) == ceil(n / 512)`.

Lifecycle:
1. `load_mooncake(path)` -> `TraceRequest`s (ValueError naming file and line when malformed);
2. `spread_buckets` spreads requests sharing a (3 s quantised) timestamp evenly over the gap to
   the next timestamp;
3. `scale(requests, block_tokens, max_model_len)` shrinks lengths by `block_tokens / 512` (so a
   512-token block becomes `block_tokens` tokens) and caps input + output to the context;
4. `prompt_tokens(req, block_tokens, vocab_size, salt)` synthesises the prompt: one fixed
   pseudo-random block per hash id (deterministic from id and salt), concatenated and cut to
   `input_len`, so equal hash-id prefixes give identical token prefixes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

MOONCAKE_BLOCK = 512
FIRST_TOKEN_ID = 3  # ids below are special tokens (pad/bos/eos) in the demo tokenizer


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
class ScaleReport:
    """What `scale` did: factor applied and how many requests were capped to the context."""

    factor: float
    block_tokens: int
    capped_input: int
    capped_output: int


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


def load_mooncake(path: str | Path, limit: int | None = None,
                  block: int = MOONCAKE_BLOCK) -> list[TraceRequest]:
    """The first `limit` requests (all if None) of a Mooncake JSONL file; blank lines skipped."""
    out: list[TraceRequest] = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                out.append(_parse_line(line, block))
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: malformed Mooncake trace line: {exc}") from None
    return out


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
    block of `block_tokens` per hash id."""
    if block_tokens <= 0 or block % block_tokens:
        raise ValueError(f"block_tokens must divide {block}, got {block_tokens}")
    k = block // block_tokens
    out, capped_in, capped_out = [], 0, 0
    for r in requests:
        n_out = max(1, -(-r.output_len // k))
        if max_output is not None and n_out > max_output:
            n_out, capped_out = max_output, capped_out + 1
        if n_out >= max_model_len:
            raise ValueError(f"output {n_out} leaves no room for a prompt in {max_model_len}")
        n_in = max(1, -(-r.input_len // k))
        if n_in + n_out > max_model_len:
            n_in, capped_in = max_model_len - n_out, capped_in + 1
        ids = r.hash_ids[:-(-n_in // block_tokens)]
        out.append(TraceRequest(r.arrival_s, n_in, n_out, ids))
    return out, ScaleReport(1.0 / k, block_tokens, capped_in, capped_out)


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
