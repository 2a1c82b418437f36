"""ServeGen (Alibaba Bailian) per-client statistics turned into a timed trace.

A ServeGen folder (e.g. shared/traces/servegen/reason/deepseek-r1) holds per client i
`chunk-i-trace.csv` (no header: `window_start_s, rate, cv, pattern, shape, scale` per 600 s
window; pattern Gamma, Weibull or empty = no traffic) and `chunk-i-dataset.json` (every 6 h
python-dict literals `{tokens: probability}` for input_tokens / output_tokens, parsed with
`ast.literal_eval`, never `eval`). Generation (after ServeGen's construct.py):

1. clients: `clients` (default all), then if `top_k` the k with the most expected requests
   (sum of rate x 600 over the span's windows; ties by id); span [start_s, start_s +
   duration_s), default the first hour (0-3600 s: ~69k requests for deepseek-r1);
2. per client and window with rate > 0: n = ceil(rate x 600) requests; n + 1 inter-arrival
   times drawn from Gamma(shape, scale) (numpy `gamma`) or Weibull (numpy `weibull` x scale),
   rescaled to sum to 600 s; arrivals are the first n cumulative sums (so exactly n fall inside
   the window); arrivals outside the span are dropped;
3. lengths: input and output drawn independently from the latest non-empty 6-hourly PDF at or
   before the window (else the earliest later one, noted); ServeGen reuses one uniform for all
   fields, which rank-couples them, but the files only give marginals; input at least 1 token;
4. RNG: `numpy.random.default_rng((seed, client, window_start))`, so a client's requests do not
   change when other clients are added or dropped;
5. requests sorted by arrival (seconds from start_s), scenario `client-<i>`, source
   `chunk-<i>-trace.csv:<line>`; `limit` keeps the first requests.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pd_serve.bench.traces import RowPolicy, Trace, TraceRequest, check_limit

WINDOW_S = 600.0
SERVEGEN_FILE = re.compile(r"chunk-([0-9]+)-(?:trace\.csv|dataset\.json)")
PATTERNS = ("Gamma", "Weibull")
Pdf = tuple[np.ndarray, np.ndarray]  # (token counts, cumulative probabilities), same length


@dataclass(frozen=True)
class Window:
    """One 600 s window of a client: request rate (req/s), inter-arrival CV and law."""

    start_s: float
    rate: float
    cv: float
    pattern: str
    shape: float
    scale: float
    line: int


def client_ids(folder: Path) -> list[int]:
    """Ids of the clients with a `chunk-<i>-trace.csv` in `folder`, ascending."""
    ids = [int(m[1]) for p in folder.glob("chunk-*-trace.csv")
           if (m := SERVEGEN_FILE.fullmatch(p.name))]
    return sorted(ids)


def _float(text: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{column} must be a finite number >= 0, got {text!r}")
    return value


def _window(fields: list[str], line: int) -> Window:
    if len(fields) != 6:
        raise ValueError(f"expected 6 fields (window_start_s, rate, cv, pattern, shape, scale), "
                         f"got {len(fields)}")
    start, rate = _float(fields[0], "window_start_s"), _float(fields[1], "rate")
    cv, pattern = _float(fields[2], "cv"), fields[3].strip()
    shape, scale = _float(fields[4], "shape"), _float(fields[5], "scale")
    if pattern not in ("", *PATTERNS):
        raise ValueError(f"pattern must be Gamma, Weibull or empty, got {pattern!r}")
    if rate > 0 and (not pattern or shape <= 0 or scale <= 0):
        raise ValueError(f"rate {rate} needs a pattern with shape > 0 and scale > 0, got "
                         f"{pattern!r}, {shape}, {scale}")
    return Window(start, rate, cv, pattern, shape, scale, line)


def read_windows(path: Path, rows: RowPolicy) -> list[Window]:
    """The windows of one `chunk-i-trace.csv`; starts must increase."""
    out: list[Window] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for fields in reader:
            if not any(x.strip() for x in fields):
                continue
            try:
                w = _window(fields, reader.line_num)
                if out and w.start_s <= out[-1].start_s:
                    raise ValueError(f"window_start_s {w.start_s:g} does not increase "
                                     f"(previous {out[-1].start_s:g})")
            except ValueError as exc:
                rows.bad(reader.line_num, str(exc), path)
                continue
            out.append(w)
    return out


def _pdf(fields: dict[str, object], name: str) -> Pdf | None:
    """`fields[name]`, a `{tokens: probability}` dict literal, as a Pdf; None when empty."""
    text = fields[name]
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string holding a dict literal")
    try:
        table = ast.literal_eval(text)  # literals only: never eval
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"{name} is not a python literal ({type(exc).__name__})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{name} must be a dict literal, got {type(table).__name__}")
    if not table:
        return None
    keys, probs = list(table), list(table.values())
    if not all(type(k) is int and k >= 0 for k in keys):
        raise ValueError(f"{name}: token counts must be integers >= 0")
    if not all(type(v) in (int, float) for v in probs):
        raise ValueError(f"{name}: probabilities must be numbers")
    p = np.asarray(probs, dtype=float)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"{name}: probabilities must be finite, >= 0 and not all 0")
    order = np.argsort(keys)
    cdf = np.cumsum(p[order])
    return np.asarray(keys, dtype=np.int64)[order], cdf / cdf[-1]


class LengthPdfs:
    """The 6-hourly length PDFs of one client (`chunk-i-dataset.json`), parsed on demand.

    1. construction reads the JSON and keeps the non-empty entries (malformed ones reported to
       `rows`);
    2. `for_window(start)` returns the (input, output) PDFs of the latest entry at or before
       `start`, else of the earliest later one, and whether it was later; each entry is parsed
       once (`ast.literal_eval`); one that fails is reported and dropped; None when none is left.
    """

    def __init__(self, path: Path, rows: RowPolicy) -> None:
        self.path, self.rows = path, rows
        self.raw: dict[float, dict[str, object]] = {}
        self.parsed: dict[float, tuple[Pdf, Pdf] | None] = {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            if rows.strict:
                raise ValueError(f"{path}: cannot read length PDFs ({exc.strerror})") from None
            return  # lenient: the client's requests are not generated (noted by the caller)
        except json.JSONDecodeError as exc:
            rows.bad(exc.lineno, f"not JSON ({exc.msg})", path)
            return
        if not isinstance(data, dict):
            rows.bad(1, "expected a JSON object {window_start_s: {field: dict literal}}", path)
            return
        for key, fields in data.items():
            try:
                start = _float(key, "window key")
                if not isinstance(fields, dict) or not {"input_tokens", "output_tokens"} <= set(
                        fields):
                    raise ValueError("entry must be an object with input_tokens, output_tokens")
            except ValueError as exc:
                rows.bad(f"[{key!r}]", str(exc), path)
                continue
            if all(str(fields[f]).replace(" ", "") != "{}"
                   for f in ("input_tokens", "output_tokens")):
                self.raw[start] = fields

    def for_window(self, start: float) -> tuple[tuple[Pdf, Pdf], bool] | None:
        while self.raw:
            before = [t for t in self.raw if t <= start]
            key = max(before) if before else min(self.raw)
            if key not in self.parsed:
                try:
                    pin, pout = (_pdf(self.raw[key], f) for f in ("input_tokens", "output_tokens"))
                    self.parsed[key] = None if pin is None or pout is None else (pin, pout)
                except ValueError as exc:
                    self.rows.bad(f"[{key!r}]", str(exc), self.path)
                    self.parsed[key] = None
            pdfs = self.parsed[key]
            if pdfs is not None:
                return pdfs, not before
            del self.raw[key]
        return None


def _iats(rng: np.random.Generator, w: Window, n: int) -> np.ndarray:
    """n + 1 inter-arrival times of law `w.pattern`, rescaled to sum to one window."""
    if w.pattern == "Gamma":
        x = rng.gamma(w.shape, w.scale, n + 1)
    else:
        x = rng.weibull(w.shape, n + 1) * w.scale
    total = float(x.sum())
    if not math.isfinite(total) or total <= 0:  # tiny Gamma shapes can underflow to all zeros
        x, total = np.ones(n + 1), float(n + 1)
    return x * (WINDOW_S / total)


def _sample(rng: np.random.Generator, pdf: Pdf, n: int) -> np.ndarray:
    values, cdf = pdf
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return values[np.minimum(idx, len(values) - 1)]


def _choose(ids: list[int], top_k: int | None, windows: dict[int, list[Window]], lo: float,
            hi: float) -> list[int]:
    """`ids`, or the `top_k` of them with the most expected requests in [lo, hi)."""
    if top_k is None:
        return ids
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    load = {c: sum(w.rate for w in windows[c] if lo - WINDOW_S < w.start_s < hi) for c in ids}
    return sorted(sorted(ids, key=lambda c: (-load[c], c))[:top_k])


def load_servegen(folder: str | Path, clients: Sequence[int] | None = None,
                  top_k: int | None = None, start_s: float = 0.0, duration_s: float = 3600.0,
                  seed: int = 0, strict: bool = True, limit: int | None = None) -> Trace:
    """A timed trace generated from the ServeGen folder by the rules in the module docstring."""
    check_limit(limit)
    folder = Path(folder)
    if duration_s <= 0 or start_s < 0 or seed < 0:
        raise ValueError(f"need start_s >= 0, duration_s > 0 and seed >= 0, got {start_s}, "
                         f"{duration_s}, {seed}")
    known = client_ids(folder)
    if not known:
        raise ValueError(f"{folder}: no ServeGen chunk-*-trace.csv files")
    missing = sorted(set(clients or ()) - set(known))
    if missing:
        raise ValueError(f"{folder}: no ServeGen client(s) {missing} (have {known})")
    rows = RowPolicy(folder, "ServeGen", strict)
    wanted = known if clients is None else sorted(set(clients))
    windows = {c: read_windows(folder / f"chunk-{c}-trace.csv", rows) for c in wanted}
    lo, hi = start_s, start_s + duration_s
    chosen = _choose(wanted, top_k, windows, lo, hi)
    notes = [f"servegen {folder.name}: {len(chosen)} of {len(known)} clients, span "
             f"[{lo:g}, {hi:g}) s, seed {seed}"]
    reqs: list[TraceRequest] = []
    for c in chosen:
        busy = [w for w in windows[c] if w.rate > 0 and lo - WINDOW_S < w.start_s < hi]
        reqs.extend(_client_requests(folder, c, busy, rows, seed, lo, hi, notes))
    reqs = sorted(reqs, key=lambda r: r.arrival_s)[:limit]  # stable: ties in client order
    if not reqs:
        raise ValueError(f"{folder}: no requests for client(s) {chosen} in [{lo:g}, {hi:g}) s")
    return rows.trace(reqs, f"servegen-{folder.name}", timed=True, fmt="servegen", notes=notes)


def _client_requests(folder: Path, c: int, busy: list[Window], rows: RowPolicy, seed: int,
                     lo: float, hi: float, notes: list[str]) -> list[TraceRequest]:
    """Client c's requests in its `busy` windows with arrivals in [lo, hi), unsorted."""
    pdfs = LengthPdfs(folder / f"chunk-{c}-dataset.json", rows)
    out: list[TraceRequest] = []
    fallbacks = 0
    for w in busy:
        found = pdfs.for_window(w.start_s)
        if found is None:
            notes.append(f"client-{c}: no length PDF, ~{sum(map(_count, busy))} requests "
                         f"not generated")
            return []
        (pin, pout), later = found
        fallbacks += later
        rng = np.random.default_rng((seed, c, int(w.start_s)))
        n = _count(w)
        t = w.start_s + np.cumsum(_iats(rng, w, n))[:n]
        ins = np.maximum(_sample(rng, pin, n), 1)
        outs = _sample(rng, pout, n)
        keep = (t >= lo) & (t < hi)
        scenario, source = f"client-{c}", f"chunk-{c}-trace.csv:{w.line}"
        out.extend(TraceRequest(a, i, o, (), scenario, source) for a, i, o in zip(
            (t[keep] - lo).tolist(), ins[keep].tolist(), outs[keep].tolist()))
    if fallbacks:
        notes.append(f"client-{c}: {fallbacks} window(s) took the next later length PDF")
    return out


def _count(w: Window) -> int:
    # round first: 0.085 * 600 is 51.000000000000007 in floating point, which must stay 51
    return math.ceil(round(w.rate * WINDOW_S, 6))
