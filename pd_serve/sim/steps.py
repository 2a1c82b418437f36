"""Reading step traces (pd_serve.engine.step_trace: the format and what a step's period is)
into latency samples, and fitting a latency profile from the steps of real runs
(`pd-serve sim profile-steps`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from pd_serve.engine.step_trace import SCHEMA
from pd_serve.sim.latency import (
    DecodeModel,
    DecodeSample,
    LatencyProfile,
    PrefillModel,
    PrefillSample,
    fit_decode,
    fit_error,
    fit_prefill,
)


@dataclass(frozen=True)
class StepRecord:
    t: float
    s: float
    idle: bool
    kind: str
    shape: tuple[Any, ...]  # prefill: ((prior, new), ...); decode: (ctx, ...)


def read_step_trace(path: str | Path) -> tuple[dict[str, Any], list[StepRecord]]:
    """(header, steps) of one trace file. Malformed content: ValueError naming file and line.
    A last line cut short (the process was killed mid-write) is ignored."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read the step trace ({exc})") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{p}: empty step trace")
    header = _parse(p, 1, lines[0], last=len(lines) == 1)
    if header is None or header.get("schema") != SCHEMA:
        raise ValueError(f"{p}:1: not a step trace (expected schema {SCHEMA!r})")
    steps = []
    for n, line in enumerate(lines[1:], start=2):
        obj = _parse(p, n, line, last=n == len(lines))
        if obj is None:
            continue
        if obj.get("schema") == SCHEMA:  # a restarted process appended a new header
            continue
        steps.append(_record(p, n, obj))
    return header, steps


def _parse(p: Path, n: int, line: str, last: bool) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        if last:
            return None
        raise ValueError(f"{p}:{n}: not JSON ({exc.msg})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{p}:{n}: expected a JSON object")
    return obj


def _record(p: Path, n: int, obj: dict[str, Any]) -> StepRecord:
    try:
        kind = obj["kind"]
        t, s, idle = float(obj["t"]), float(obj["s"]), bool(obj["idle"])
        if kind == "prefill":
            shape: tuple[Any, ...] = tuple((int(a), int(b)) for a, b in obj["chunks"])
            ok = all(a >= 0 and b > 0 for a, b in shape)
        elif kind == "decode":
            shape = tuple(int(c) for c in obj["ctx"])
            ok = all(c > 0 for c in shape)
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{p}:{n}: bad step record ({exc})") from exc
    if not ok or not shape or not s > 0:
        raise ValueError(f"{p}:{n}: bad step record (empty batch, non-positive sizes or time)")
    return StepRecord(t, s, idle, kind, shape)


def periods(steps: Sequence[StepRecord]) -> list[float]:
    """Each step's period (pd_serve.engine.step_trace): up to the next step's start when the
    engine did not wait in between, else the step's own time."""
    out = []
    for i, st in enumerate(steps):
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        out.append(nxt.t - st.t if nxt is not None and not nxt.idle and nxt.t > st.t else st.s)
    return out


def trace_samples(traces: Iterable[Sequence[StepRecord]], since: float | None = None,
                  until: float | None = None, use_period: bool = True,
                  ) -> tuple[list[PrefillSample], list[DecodeSample]]:
    """Latency samples of the steps that started in [since, until) (wall clock), each timed by
    its period (or its own time)."""
    pre: list[PrefillSample] = []
    dec: list[DecodeSample] = []
    for steps in traces:
        times = periods(steps) if use_period else [st.s for st in steps]
        for st, sec in zip(steps, times):
            if (since is not None and st.t < since) or (until is not None and st.t >= until):
                continue
            if st.kind == "prefill":
                pre.append(PrefillSample(st.shape, sec))
            else:
                dec.append(DecodeSample(st.shape, sec))
    return pre, dec


def profile_from_steps(paths: Sequence[str | Path], base: LatencyProfile,
                       since: float | None = None, until: float | None = None,
                       use_period: bool = True) -> LatencyProfile:
    """The prefill and decode models refitted on the steps of real runs (`paths`, steps that
    started in [since, until)); see `fit_samples`."""
    traces = []
    roles = []
    for path in paths:
        header, steps = read_step_trace(path)
        traces.append(steps)
        roles.append(str(header.get("role")))
    pre, dec = trace_samples(traces, since, until, use_period)
    return fit_samples(pre, dec, base, {
        "source": "step traces", "traces": [Path(p).name for p in paths], "roles": roles,
        "window": [since, until], "timing": "period" if use_period else "step"})


def fit_samples(pre: Sequence[PrefillSample], dec: Sequence[DecodeSample],
                base: LatencyProfile, provenance: dict[str, Any]) -> LatencyProfile:
    """Prefill and decode models fitted on step samples; hand-off model, KV bytes per token and
    model forms (packed or padded) from `base`. ValueError when a phase has too few steps."""
    if len(pre) < 8 or len(dec) < 8:
        raise ValueError(f"step traces: {len(pre)} prefill and {len(dec)} decode steps in the "
                         "window; at least 8 of each are needed for a fit")
    pm, k_p = _total_matched(fit_prefill(pre, base.prefill.padded), pre)
    dm, k_d = _total_matched(fit_decode(dec, base.decode.padded), dec)
    prov = {**provenance, "steps": {"prefill": len(pre), "decode": len(dec)},
            "total_scale": {"prefill": k_p, "decode": k_d},
            "fit_errors": {"prefill": fit_error(pm, pre), "decode": fit_error(dm, dec)},
            "base": {k: base.provenance.get(k) for k in ("backend", "model", "threads", "date")}}
    return LatencyProfile(pm, dm, base.handoff, base.kv_bytes_per_token, prov,
                          {"prefill": [asdict(s) for s in pre],
                           "decode": [asdict(s) for s in dec]})


M = TypeVar("M", PrefillModel, DecodeModel)


def _total_matched(model: M, samples: Sequence[Any]) -> tuple[M, float]:
    """`model` scaled so that it adds up to the samples' total time, and the factor. The fit
    weighs relative errors, which puts it near the typical step; steps of a serving process
    have a slow tail (GIL waits, neighbours on the cores) that the total, the busy time a
    simulated instance must reproduce, includes."""
    pred = sum(model.time_of(s.chunks) if isinstance(model, PrefillModel)
               else model.time_of(s.contexts) for s in samples)
    if not pred > 0:
        raise ValueError("step traces: the fitted model predicts no time for these steps")
    k = sum(s.seconds for s in samples) / pred
    coefs = {f.name: getattr(model, f.name) * k for f in fields(model) if f.name != "padded"}
    return replace(model, **coefs), float(k)


def trace_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their steps-*.jsonl; ValueError if none."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.glob("steps-*.jsonl"))
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such step trace or directory")
    if not out:
        raise ValueError(f"no step traces (steps-*.jsonl) in {', '.join(map(str, paths))}")
    return out
