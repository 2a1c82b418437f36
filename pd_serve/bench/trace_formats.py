"""Loaders for the CSV trace formats in shared/traces and `load_trace`, which picks a loader for
any of the five formats (Mooncake JSONL, Azure 2023 CSV, ShareGPT / arXiv length CSVs, ServeGen
client statistics) from `fmt` or from the path's name and content.

Formats (`FORMATS`; aliases in `ALIASES`):
* "mooncake": JSONL with prefix hash ids (`pd_serve.bench.traces.read_mooncake`);
* "azure": `TIMESTAMP,ContextTokens,GeneratedTokens`, wall-clock times with up to 9 fractional
  digits -> seconds from the first row (exact to 100 ns: whole seconds and fractions are
  subtracted separately);
* "lengths" (aliases "sharegpt", "arxiv"): `num_prefill_tokens,num_decode_tokens,
  num_total_tokens[,pd_ratio]`, untimed (arrival 0.0, `timed=False`); a total that is not
  prefill + decode is a malformed row;
* "servegen": a folder of `chunk-<i>-trace.csv` + `chunk-<i>-dataset.json`, turned into a timed
  trace (`pd_serve.bench.servegen.load_servegen`).

Detection (`detect_format`, first match wins): a folder holding `chunk-*-trace.csv` ->
servegen; a file named `chunk-<i>-trace.csv` / `chunk-<i>-dataset.json` -> servegen on its
folder, client i only (unless `clients` is given); first non-blank line a JSON object ->
mooncake; CSV header with TIMESTAMP and ContextTokens -> azure; header with
num_prefill_tokens and num_decode_tokens -> lengths; anything else -> ValueError listing formats.

Malformed rows (wrong field count, non-integer or negative lengths, bad timestamps, a missing
header column, time going backwards): strict (default) raises ValueError `<file>:<line>: ...`
(1-based); `strict=False` skips the row, counts it in `Trace.skipped` and notes the first
reasons; rows out of time order are then sorted rather than dropped. A missing header column or
an empty file raises in both modes.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pd_serve.bench.servegen import SERVEGEN_FILE, load_servegen
from pd_serve.bench.traces import RowPolicy, Trace, TraceRequest, check_limit, read_mooncake

FORMATS = ("mooncake", "azure", "lengths", "servegen")
ALIASES = {"sharegpt": "lengths", "arxiv": "lengths", "splitwise": "azure", "jsonl": "mooncake"}
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
LENGTH_COLUMNS = ("num_prefill_tokens", "num_decode_tokens", "num_total_tokens")
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "mooncake": ("block",), "azure": (), "lengths": (),
    "servegen": ("clients", "top_k", "start_s", "duration_s", "seed"),
}

_INT = re.compile(r"-?[0-9]+")
_AZURE_TIME = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})[ T]([0-9]{2}:[0-9]{2}:[0-9]{2})"
                         r"(?:\.([0-9]{1,9}))?")
_EPOCH = datetime(1970, 1, 1)


def parse_count(text: str, column: str, minimum: int) -> int:
    """`text` as an integer >= minimum, else ValueError naming the column and the value."""
    if not _INT.fullmatch(text.strip()):
        raise ValueError(f"{column} must be an integer, got {text!r}")
    value = int(text)
    if value < minimum:
        raise ValueError(f"{column} must be >= {minimum}, got {value}")
    return value


def azure_time(text: str) -> tuple[int, float]:
    """`YYYY-MM-DD HH:MM:SS[.fffffff]` as (whole seconds since 1970, fraction of a second)."""
    m = _AZURE_TIME.fullmatch(text.strip())
    if not m:
        raise ValueError(f"TIMESTAMP must look like 'YYYY-MM-DD HH:MM:SS.fffffff', got {text!r}")
    try:
        when = datetime.strptime(f"{m[1]} {m[2]}", "%Y-%m-%d %H:%M:%S")
    except ValueError as exc:
        raise ValueError(f"TIMESTAMP {text!r} is not a valid time ({exc})") from None
    frac = m[3] or "0"
    return int((when - _EPOCH).total_seconds()), int(frac) / 10 ** len(frac)


def _csv_rows(path: Path, rows: RowPolicy,
              required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, {required column: text}) per data row; blank lines skipped, rows with the wrong
    number of fields reported to `rows`."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file (no header; expected {','.join(required)})")
        names = [h.strip() for h in header]
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)} "
                             f"(expected {','.join(required)}, got {','.join(names)})")
        where = {c: names.index(c) for c in required}
        for fields in reader:
            if not any(x.strip() for x in fields):
                continue
            if len(fields) != len(names):
                rows.bad(reader.line_num, f"expected {len(names)} fields, got {len(fields)}")
                continue
            yield reader.line_num, {c: fields[i] for c, i in where.items()}


def load_azure(path: str | Path, strict: bool = True, limit: int | None = None) -> Trace:
    """Azure LLM inference 2023 CSV (Splitwise) as a timed trace, arrivals in seconds from the
    first row; input >= 1 and output >= 0 tokens."""
    check_limit(limit)
    path = Path(path)
    rows = RowPolicy(path, "Azure trace", strict)
    out: list[TraceRequest] = []
    t0: tuple[int, float] | None = None
    for line, row in _csv_rows(path, rows, AZURE_COLUMNS):
        if limit is not None and len(out) >= limit:
            break
        try:
            whole, frac = azure_time(row["TIMESTAMP"])
            n_in = parse_count(row["ContextTokens"], "ContextTokens", 1)
            n_out = parse_count(row["GeneratedTokens"], "GeneratedTokens", 0)
        except ValueError as exc:
            rows.bad(line, str(exc))
            continue
        if t0 is None:
            t0 = (whole, frac)
        arrival = (whole - t0[0]) + (frac - t0[1])
        rows.keep(out, TraceRequest(arrival, n_in, n_out, source=f"{path.name}:{line}"), line)
    return rows.trace(out, path.stem, timed=True, fmt="azure")


def load_lengths(path: str | Path, strict: bool = True, limit: int | None = None) -> Trace:
    """ShareGPT / arXiv length CSV (sarathi-serve / vidur) as an untimed trace."""
    check_limit(limit)
    path = Path(path)
    rows = RowPolicy(path, "length trace", strict)
    out: list[TraceRequest] = []
    for line, row in _csv_rows(path, rows, LENGTH_COLUMNS):
        if limit is not None and len(out) >= limit:
            break
        try:
            n_in = parse_count(row["num_prefill_tokens"], "num_prefill_tokens", 1)
            n_out = parse_count(row["num_decode_tokens"], "num_decode_tokens", 0)
            total = parse_count(row["num_total_tokens"], "num_total_tokens", 0)
            if total != n_in + n_out:
                raise ValueError(f"num_total_tokens {total} != num_prefill_tokens + "
                                 f"num_decode_tokens = {n_in + n_out}")
        except ValueError as exc:
            rows.bad(line, str(exc))
            continue
        out.append(TraceRequest(0.0, n_in, n_out, source=f"{path.name}:{line}"))
    return rows.trace(out, path.stem, timed=False, fmt="lengths")


def _first_line(path: Path) -> str:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                return line.strip()
    raise ValueError(f"{path}: empty file, cannot detect its trace format")


def detect_format(path: str | Path) -> str:
    """The format of `path` by the rules in the module docstring; ValueError if none fits."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("chunk-*-trace.csv")):
            return "servegen"
        raise ValueError(f"{path}: a folder without ServeGen chunk-*-trace.csv files; "
                         f"trace formats: {', '.join(FORMATS)}")
    if SERVEGEN_FILE.fullmatch(path.name):
        return "servegen"
    head = _first_line(path)
    if head.startswith("{"):
        try:
            if isinstance(json.loads(head), dict):
                return "mooncake"
        except json.JSONDecodeError:
            pass
    columns = {c.strip() for c in head.split(",")}
    if {"TIMESTAMP", "ContextTokens"} <= columns:
        return "azure"
    if {"num_prefill_tokens", "num_decode_tokens"} <= columns:
        return "lengths"
    raise ValueError(f"{path}: unknown trace format (first line {head[:80]!r}); trace formats: "
                     f"{', '.join(FORMATS)}")


def load_trace(path: str | Path, fmt: str | None = None, strict: bool = True,
               limit: int | None = None, **fmt_options: Any) -> Trace:
    """Load any trace: `fmt` one of `FORMATS` or `ALIASES` (detected when None), `strict` and
    `limit` (first requests kept) as in the module docstring, `fmt_options` passed to the
    format's loader (`FORMAT_OPTIONS`: mooncake `block`; servegen `clients`, `top_k`,
    `start_s`, `duration_s`, `seed`)."""
    path = Path(path)
    name = detect_format(path) if fmt is None else ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; formats: {', '.join(FORMATS)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    unknown = sorted(set(fmt_options) - set(FORMAT_OPTIONS[name]))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} do not apply to {name} traces "
                         f"(accepted: {', '.join(FORMAT_OPTIONS[name]) or 'none'})")
    if name == "mooncake":
        return read_mooncake(path, strict=strict, limit=limit, **fmt_options)
    if name == "azure":
        return load_azure(path, strict=strict, limit=limit)
    if name == "lengths":
        return load_lengths(path, strict=strict, limit=limit)
    m = SERVEGEN_FILE.fullmatch(path.name)
    if m and not path.is_dir():
        path = path.parent
        fmt_options.setdefault("clients", (int(m[1]),))
    return load_servegen(path, strict=strict, limit=limit, **fmt_options)
