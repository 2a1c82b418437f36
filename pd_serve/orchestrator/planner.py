"""The P/D ratio planner, pure: a scenario profile and an instance budget in, the integer split
n_p:n_d that balances prefill and decode capacity (Eq. 1 of P/D-Serve) out.

Choices the paper leaves open (papers.md §1.4), made here:
* Objective: maximise the bottleneck capacity min(n_p*b_p/T_p, n_d*b_d/T_d); ties go to the
  smaller mismatch |prefill - decode|, then to fewer instances, then to fewer prefill.
* Budget: with no traffic given the plan uses the whole budget (capacity is linear in each
  count, so a full-budget split is always among the optima). With traffic given, the plan is
  the smallest split whose bottleneck covers it (Eq. 2 sizing: each role sized independently,
  which is the unique smallest such split) when that fits in the budget, else the full-budget
  optimum, which then admits less than the traffic.
* At least `min_per_role` instances per role (no single point of failure) when the budget
  allows 2*min_per_role, else at least one each; a budget under 2 is an error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pd_serve.orchestrator import perf_model as pm
from pd_serve.orchestrator.perf_model import ScenarioProfile

BALANCE_TOL = 0.05  # capacities within 5% of each other are called "balanced"


@dataclass(frozen=True)
class Split:
    """One (n_p, n_d) with its capacities (requests/s) and per-instance throughput phi."""

    n_p: int
    n_d: int
    prefill_capacity: float
    decode_capacity: float
    phi: float

    @property
    def bottleneck_capacity(self) -> float:
        return min(self.prefill_capacity, self.decode_capacity)

    @property
    def mismatch(self) -> float:
        return abs(self.prefill_capacity - self.decode_capacity)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bottleneck_capacity": self.bottleneck_capacity}


@dataclass(frozen=True)
class Plan:
    """The chosen split. `bottleneck`: "traffic" when both roles cover the traffic, else the
    smaller side ("prefill" | "decode"), or "balanced" within BALANCE_TOL. `admitted_rps`:
    Eq. 2, min(traffic, prefill capacity) (the prefill capacity when no traffic is given)."""

    n_p: int
    n_d: int
    prefill_capacity: float
    decode_capacity: float
    bottleneck: str
    phi: float
    admitted_rps: float
    traffic_rps: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _floor(budget: int, min_per_role: int) -> int:
    for key, value in (("budget", budget), ("min_per_role", min_per_role)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
    if min_per_role < 1:
        raise ValueError(f"min_per_role: expected at least 1, got {min_per_role}")
    if budget < 2:
        raise ValueError(f"budget: a P/D group needs at least 2 instances, got {budget}")
    return min_per_role if budget >= 2 * min_per_role else 1


def split(profile: ScenarioProfile, n_p: int, n_d: int,
          traffic_rps: float | None = None) -> Split:
    return Split(n_p, n_d, pm.prefill_capacity(profile, n_p), pm.decode_capacity(profile, n_d),
                 pm.phi(profile, n_p, n_d, traffic_rps))


def _key(s: Split) -> tuple[float, float, int, int]:
    return (-s.bottleneck_capacity, s.mismatch, s.n_p + s.n_d, s.n_p)


def plan_table(profile: ScenarioProfile, budget: int, traffic_rps: float | None = None,
               min_per_role: int = 2) -> list[Split]:
    """Every split with n_p, n_d >= the per-role floor and n_p + n_d <= budget, ordered by
    total then n_p (for benchmarks and the console)."""
    floor = _floor(budget, min_per_role)
    pm.check_traffic(traffic_rps)
    return [split(profile, n_p, total - n_p, traffic_rps)
            for total in range(2 * floor, budget + 1)
            for n_p in range(floor, total - floor + 1)]


def instances_for_traffic(profile: ScenarioProfile, traffic_rps: float,
                          min_per_role: int = 2) -> tuple[int, int]:
    """The smallest (n_p, n_d), each >= min_per_role, whose bottleneck capacity covers
    `traffic_rps` (Eq. 2 sizing): each role needs ceil(traffic / one instance's capacity)."""
    traffic = pm.check_traffic(traffic_rps)
    if not math.isfinite(traffic):
        raise ValueError("traffic_rps: expected a finite number")
    _floor(2 * min_per_role, min_per_role)
    return (max(min_per_role, _needed(traffic, pm.prefill_capacity(profile, 1))),
            max(min_per_role, _needed(traffic, pm.decode_capacity(profile, 1))))


def _needed(traffic: float, per_instance: float) -> int:
    """ceil(traffic / per_instance), forgiving float noise of one part in 1e9."""
    n = max(0, math.ceil(traffic / per_instance * (1 - 1e-9)))
    return n if n * per_instance >= traffic * (1 - 1e-9) else n + 1


def plan_ratio(profile: ScenarioProfile, budget: int, traffic_rps: float | None = None,
               min_per_role: int = 2) -> Plan:
    """The split of at most `budget` instances that maximises the bottleneck capacity; with
    traffic given, the fewest instances that cover it if they fit (see the module docstring)."""
    floor = _floor(budget, min_per_role)
    traffic = pm.check_traffic(traffic_rps)
    if traffic_rps is not None and math.isfinite(traffic):
        n_p, n_d = instances_for_traffic(profile, traffic, floor)
        if n_p + n_d <= budget:
            s = split(profile, n_p, n_d, traffic_rps)
            return _plan(s, "traffic", traffic_rps,
                         f"{n_p}P:{n_d}D is the fewest instances covering {traffic:.3g} req/s "
                         f"(prefill {s.prefill_capacity:.3g}, decode {s.decode_capacity:.3g} "
                         f"req/s; budget {budget})")
    best = min((split(profile, n_p, budget - n_p, traffic_rps)
                for n_p in range(floor, budget - floor + 1)), key=_key)
    side = _side(best)
    short = "" if traffic_rps is None else f"; {traffic:.3g} req/s exceeds what it can serve"
    return _plan(best, side, traffic_rps,
                 f"{best.n_p}P:{best.n_d}D of budget {budget} maximises the bottleneck at "
                 f"{best.bottleneck_capacity:.3g} req/s ({side}; prefill "
                 f"{best.prefill_capacity:.3g}, decode {best.decode_capacity:.3g}){short}")


def _side(s: Split) -> str:
    if s.mismatch <= BALANCE_TOL * max(s.prefill_capacity, s.decode_capacity):
        return "balanced"
    return "prefill" if s.prefill_capacity < s.decode_capacity else "decode"


def _plan(s: Split, bottleneck: str, traffic_rps: float | None, reason: str) -> Plan:
    traffic = pm.check_traffic(traffic_rps)
    return Plan(s.n_p, s.n_d, s.prefill_capacity, s.decode_capacity, bottleneck, s.phi,
                min(traffic, s.prefill_capacity),
                None if traffic_rps is None else float(traffic_rps), reason)
