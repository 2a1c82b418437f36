"""DistServe-style maximum goodput: the highest offered rate at which SLO attainment (the
fraction of all requests, failed ones included, meeting every SLO) stays >= a target (90 % by
default), and that rate divided by the number of instances (goodput per instance).

Lifecycle (`run_sweep(spec, measure)`; `measure(rate)` runs one load point and returns its
attainment and whatever should be kept of it):
1. the rates of `spec.rates` are measured in ascending order until one's attainment falls below
   `spec.stop_below` (default: the target), as DistServe sweeps until attainment collapses;
2. `spec.refine` bisection steps between the highest passing rate (0 if none) and the lowest
   failing rate above it narrow the bracket;
3. the outcome: every point, the highest passing rate (None if none passed; `bounded` False when
   no rate failed, so the maximum is only a lower bound), the rate where the attainment curve
   crosses the target by linear interpolation between the bracketing points (DistServe's
   `find_intersection`), and both per instance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SweepSpec:
    rates: tuple[float, ...]
    target: float = 0.9
    refine: int = 0
    instances: int = 1
    stop_below: float | None = None

    def __post_init__(self) -> None:
        if not self.rates or any(not r > 0 for r in self.rates):
            raise ValueError(f"sweep rates must be a non-empty list of rates > 0, got "
                             f"{list(self.rates)}")
        if not 0 < self.target <= 1:
            raise ValueError(f"target attainment must be in (0, 1], got {self.target}")
        if self.refine < 0 or self.instances < 1:
            raise ValueError("refine must be >= 0 and instances >= 1")


@dataclass(frozen=True)
class SweepPoint:
    rate: float
    attainment: float
    refined: bool
    data: Any = None


@dataclass(frozen=True)
class SweepOutcome:
    points: tuple[SweepPoint, ...]  # sorted by rate
    target: float
    instances: int
    max_rate: float | None
    bounded: bool
    interpolated_rate: float | None

    @property
    def max_rate_per_instance(self) -> float | None:
        return None if self.max_rate is None else self.max_rate / self.instances

    @property
    def interpolated_per_instance(self) -> float | None:
        r = self.interpolated_rate
        return None if r is None else r / self.instances


def geometric_rates(start: float, factor: float, stop: float) -> tuple[float, ...]:
    """start, start*factor, ... up to and including `stop` (within rounding)."""
    if not start > 0 or not factor > 1 or stop < start:
        raise ValueError(f"geometric rates need start > 0, factor > 1 and stop >= start; got "
                         f"{start}, {factor}, {stop}")
    out, r = [], start
    while r <= stop * (1 + 1e-9):
        out.append(round(r, 6))
        r *= factor
    return tuple(out)


def crossing(points: list[SweepPoint], target: float) -> float | None:
    """Rate where attainment crosses `target` downwards, linearly interpolated between the
    highest passing point and the next (failing) one; None without such a pair."""
    for a, b in zip(points, points[1:]):
        if a.attainment >= target > b.attainment and not any(
                p.attainment >= target for p in points if p.rate > b.rate):
            return a.rate + (a.attainment - target) * (b.rate - a.rate) / (
                a.attainment - b.attainment)
    return None


def outcome(points: list[SweepPoint], spec: SweepSpec) -> SweepOutcome:
    pts = sorted(points, key=lambda p: p.rate)
    passing = [p.rate for p in pts if p.attainment >= spec.target]
    best = max(passing) if passing else None
    bounded = any(p.attainment < spec.target and (best is None or p.rate > best) for p in pts)
    return SweepOutcome(tuple(pts), spec.target, spec.instances, best, bounded,
                        crossing(pts, spec.target))


def run_sweep(spec: SweepSpec, measure: Callable[[float], tuple[float, Any]]) -> SweepOutcome:
    """Measures the ladder, then bisects (see the module docstring)."""
    floor = spec.target if spec.stop_below is None else spec.stop_below
    points: list[SweepPoint] = []
    for rate in sorted(spec.rates):
        attainment, data = measure(rate)
        points.append(SweepPoint(rate, attainment, False, data))
        if attainment < floor:
            break
    for _ in range(spec.refine):
        passing = [p.rate for p in points if p.attainment >= spec.target]
        lo = max(passing, default=0.0)
        above = [p.rate for p in points if p.rate > lo and p.attainment < spec.target]
        if not above:
            break  # nothing failed: no bracket to refine
        mid = (lo + min(above)) / 2
        attainment, data = measure(mid)
        points.append(SweepPoint(mid, attainment, True, data))
    return outcome(points, spec)
