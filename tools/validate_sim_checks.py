"""Consistency checks of tools/validate_sim.py's probes: repetitions of a probe checked against
each other (and re-probed when they disagree), and the drift of the calibration between the
probes before and after the real runs.

Rule: a set of repetitions agrees when, for every checked quantity, max / min - 1 <= the
tolerance (15 %, the validation's own band: a probe whose repetitions differ by more than the
band the simulator is judged against cannot calibrate it to that band). A probe is repeated
`need` times; while no `need` of its repetitions agree, it is repeated once more, at most
`max_tries` times in all. The largest agreeing set is kept; among equally large sets the one
with the smallest first quantity, because a machine disturbed by other work only slows a probe
down. Without an agreeing set, the pair with the smallest spread is kept and the probe is
reported as inconsistent (the session is flagged, not aborted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any, TypeVar

T = TypeVar("T")


def rel_spread(values: Sequence[float]) -> float:
    """max / min - 1 of positive `values` (0 for a single value)."""
    if not values:
        raise ValueError("rel_spread: no values")
    if any(v != v for v in values):  # NaN: a repetition that measured nothing agrees with none
        return float("inf")
    if min(values) <= 0:
        raise ValueError(f"rel_spread: values must be positive, got {list(values)}")
    return max(values) / min(values) - 1


def worst_spread(reps: Sequence[dict[str, float]], keys: Sequence[str]) -> float:
    """The largest `rel_spread` over `keys` of the repetitions `reps`."""
    return max(rel_spread([r[k] for r in reps]) for k in keys)


def agreeing(reps: Sequence[dict[str, float]], tol: float, need: int = 2) -> list[int]:
    """Indices of the largest set (at least `need`) of repetitions whose every quantity has a
    `rel_spread` <= `tol`; ties go to the smallest sum of the first quantity; [] if none.
    Every repetition must have the same quantities, in the same order."""
    if need < 1 or tol < 0:
        raise ValueError(f"agreeing: need >= 1 and tol >= 0, got need={need}, tol={tol}")
    if not reps:
        return []
    keys = list(reps[0])
    if any(list(r) != keys for r in reps):
        raise ValueError("agreeing: repetitions have different quantities")
    for size in range(len(reps), need - 1, -1):
        ok = [c for c in combinations(range(len(reps)), size)
              if worst_spread([reps[i] for i in c], keys) <= tol]
        if ok:
            return list(min(ok, key=lambda c: sum(reps[i][keys[0]] for i in c)))
    return []


def closest(reps: Sequence[dict[str, float]], need: int = 2) -> list[int]:
    """Indices of the `need` repetitions with the smallest worst spread (the fallback when
    none agree)."""
    keys = list(reps[0])
    return list(min(combinations(range(len(reps)), min(need, len(reps))),
                    key=lambda c: worst_spread([reps[i] for i in c], keys)))


def repeat_until_agree(measure: Callable[[], T], summary: Callable[[T], dict[str, float]],
                       tol: float, need: int = 2, max_tries: int = 4,
                       ) -> tuple[list[T], dict[str, Any]]:
    """Runs `measure` `need` times, then once more while no `need` repetitions agree on
    `summary`, at most `max_tries` times in all. Returns (the kept repetitions, a report: every
    repetition's summary, the kept indices, their worst spread and whether they agree)."""
    if max_tries < need:
        raise ValueError(f"max_tries ({max_tries}) must be >= need ({need})")
    reps: list[T] = []
    sums: list[dict[str, float]] = []
    kept: list[int] = []
    while len(reps) < max_tries:
        reps.append(measure())
        sums.append(summary(reps[-1]))
        if len(reps) >= need:
            kept = agreeing(sums, tol, need)
            if kept:
                break
    ok = bool(kept)
    if not ok:
        kept = closest(sums, need)
    spread = worst_spread([sums[i] for i in kept], list(sums[0]))
    return [reps[i] for i in kept], {"tolerance": tol, "tries": len(reps),
                                     "summaries": sums, "kept": kept,
                                     "spread": spread, "consistent": ok}


def drift(before: dict[str, float], after: dict[str, float], tol: float) -> dict[str, Any]:
    """Relative change after / before - 1 of every quantity in both; `flagged` lists those
    beyond `tol`."""
    common = [k for k in before if k in after]
    rel = {k: (after[k] / before[k] - 1 if before[k] else float("inf")) for k in common}
    return {"before": {k: before[k] for k in common}, "after": {k: after[k] for k in common},
            "rel_change": rel, "tolerance": tol,
            "flagged": [k for k, v in rel.items() if abs(v) > tol]}


def probe_quantities(probes: dict[str, Any], cal: dict[str, Any]) -> dict[str, float]:
    """The quantities whose drift between the probes before and after the real runs is
    reported: raw probe times (profile-independent) and the calibrated co-location factors,
    prefill scale and round trips."""
    col = probes["colocation"]
    out = {"coloc_decode_alone_step_ms": 1000 * _median(
               [s["step_s"] for s in col["decode_alone"]]),
           "coloc_decode_loaded_step_ms": 1000 * _median(
               [s["step_s"] for s in col["decode_with_prefill"]]),
           "coloc_long_prefill_ttft_ms": 1000 * _median(
               col["prefill_with_decode_ttft_s"][max(col["prefill_with_decode_ttft_s"],
                                                     key=int)]),
           "first_token_path_ms": 1000 * _median(
               [t for ts in probes["first_token_path"].values() for t in ts])}
    for s in probes["decode_ctx64"]:
        out[f"decode_b{s['batch']}_ctx64_step_ms"] = 1000 * s["step_s"]
    out["decode_b16_ctx1024_step_ms"] = 1000 * probes["decode_b16_ctx1024"]["step_s"]
    for n, ts in probes["prefill_lone_s"].items():
        out[f"prefill_lone_{n}_ms"] = 1000 * _median(ts)
    c = cal["colocation"]
    out.update(f_p=c["f_p"], f_d_host=c.get("f_d_host", c["f_d"]),
               prefill_scale=cal.get("prefill_scale", 1.0), rtt_ms=cal["rtt_ms"],
               rtt_loaded_ms=cal["rtt_loaded_ms"])
    return out


def session_flags(probes: dict[str, Any], label: str) -> list[str]:
    """One line per probe of `probes` whose repetitions did not agree."""
    return [f"{label}: {name} inconsistent after {r['tries']} tries (spread "
            f"{100 * r['spread']:.0f} % > {100 * r['tolerance']:.0f} %)"
            for name, r in probes.get("consistency", {}).items() if not r["consistent"]]


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2
