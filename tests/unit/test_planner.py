"""The P/D ratio planner: hand-computed plans, the paper's example, Hypothesis properties
against a brute force over every split (optimality, budget and per-role floors, Eq. 2 sizing,
monotone admitted traffic, local moves), and bad input."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.orchestrator import perf_model as pm
from pd_serve.orchestrator.perf_model import ScenarioProfile
from pd_serve.orchestrator.planner import (
    instances_for_traffic,
    plan_ratio,
    plan_table,
    split,
)


def profile(per_p: float, per_d: float) -> ScenarioProfile:
    """One prefill instance serves `per_p` req/s, one decode instance `per_d`."""
    return ScenarioProfile(name="s", b_p=4, b_d=8, tp_by_batch={4: 4 / per_p},
                           tpot_by_batch={8: 8 / per_d / 10}, xi=0.0, G=10)


def paper() -> ScenarioProfile:
    return profile(0.6, 0.7)


def test_paper_example_balances_the_budget() -> None:
    plan = plan_ratio(paper(), budget=13)  # 7P:6D: min(4.2, 4.2) -- exactly balanced
    assert (plan.n_p, plan.n_d) == (7, 6)
    assert plan.prefill_capacity == pytest.approx(4.2)
    assert plan.decode_capacity == pytest.approx(4.2)
    assert plan.bottleneck == "balanced"
    assert plan.phi == pytest.approx(4.2 / 13)
    assert plan.admitted_rps == pytest.approx(4.2)
    assert "7P:6D" in plan.reason


def test_budget_too_small_for_floor_gives_one_each() -> None:
    plan = plan_ratio(paper(), budget=3)  # < 2 * min_per_role: floor 1
    assert (plan.n_p, plan.n_d) in {(2, 1), (1, 2)}
    assert (plan.n_p, plan.n_d) == (2, 1)  # min(1.2, 0.7)=0.7 beats min(0.6, 1.4)=0.6
    assert plan.bottleneck == "decode"
    assert plan_ratio(paper(), budget=2).n_p == 1


def test_traffic_sizes_the_group_and_eq2_admits() -> None:
    p = profile(1.0, 2.0)
    plan = plan_ratio(p, budget=20, traffic_rps=5.5)
    assert (plan.n_p, plan.n_d) == (6, 3)  # ceil(5.5 / 1), ceil(5.5 / 2)
    assert plan.bottleneck == "traffic"
    assert plan.admitted_rps == pytest.approx(5.5)
    assert plan.phi == pytest.approx(5.5 / 9)
    assert instances_for_traffic(p, 5.5) == (6, 3)
    assert instances_for_traffic(p, 0.1) == (2, 2)  # min_per_role
    assert instances_for_traffic(p, 0.1, min_per_role=1) == (1, 1)
    assert instances_for_traffic(p, 6.0) == (6, 3)  # exact cover needs no extra instance
    over = plan_ratio(p, budget=6, traffic_rps=100.0)  # does not fit: full budget
    assert (over.n_p, over.n_d) == (4, 2)
    assert over.admitted_rps == pytest.approx(4.0)  # Eq. 2: min(I_t, prefill capacity)
    assert over.bottleneck == "balanced"
    assert "exceeds" in over.reason


def test_plan_table_lists_every_feasible_split() -> None:
    rows = plan_table(paper(), budget=6, traffic_rps=1.0)
    assert [(r.n_p, r.n_d) for r in rows] == [(2, 2), (2, 3), (3, 2), (2, 4), (3, 3), (4, 2)]
    assert rows[0].phi == pytest.approx(1.0 / 4)
    assert rows[0].to_dict()["bottleneck_capacity"] == pytest.approx(1.2)
    assert plan_ratio(paper(), budget=6).to_dict()["n_p"] == 3


def test_moving_to_the_bottleneck_can_hurt_an_optimal_plan() -> None:
    """Why the planner searches instead of shifting: (5P, 2D) is optimal for budget 7 with
    prefill the bottleneck, yet moving a decode instance to prefill lowers the bottleneck."""
    p = profile(1.0, 3.0)
    plan = plan_ratio(p, budget=7, min_per_role=1)
    assert (plan.n_p, plan.n_d, plan.bottleneck) == (5, 2, "prefill")
    assert split(p, 6, 1).bottleneck_capacity < split(p, 5, 2).bottleneck_capacity


@pytest.mark.parametrize(("kw", "field"), [
    ({"budget": 1}, "budget"),
    ({"budget": True}, "budget"),
    ({"budget": 4, "min_per_role": 0}, "min_per_role"),
    ({"budget": 4, "traffic_rps": -1.0}, "traffic_rps"),
    ({"budget": 4, "traffic_rps": math.nan}, "traffic_rps"),
])
def test_bad_input(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        plan_ratio(paper(), **kw)
    with pytest.raises(ValueError, match="^traffic_rps"):
        instances_for_traffic(paper(), math.inf)
    with pytest.raises(ValueError, match="^min_per_role"):
        instances_for_traffic(paper(), 1.0, min_per_role=0)


profiles = st.builds(profile, st.floats(0.05, 50.0), st.floats(0.05, 50.0))
budgets = st.integers(2, 40)
floors = st.integers(1, 4)


def floor_of(budget: int, min_per_role: int) -> int:
    return min_per_role if budget >= 2 * min_per_role else 1


@settings(max_examples=300, deadline=None)
@given(profiles, budgets, floors)
def test_plan_matches_brute_force_optimum(p: ScenarioProfile, budget: int, mpr: int) -> None:
    plan = plan_ratio(p, budget, min_per_role=mpr)
    f = floor_of(budget, mpr)
    brute = max(min(pm.prefill_capacity(p, a), pm.decode_capacity(p, t - a))
                for t in range(2, budget + 1) for a in range(1, t))
    feasible = max(r.bottleneck_capacity for r in plan_table(p, budget, min_per_role=mpr))
    best = min(plan.prefill_capacity, plan.decode_capacity)
    assert best == pytest.approx(feasible, rel=1e-9)  # optimal among feasible splits
    assert best <= brute * (1 + 1e-9)  # never beats the unconstrained optimum
    assert plan.n_p + plan.n_d == budget  # no traffic: the whole budget
    assert plan.n_p >= f and plan.n_d >= f
    side = plan.bottleneck
    if side == "prefill":
        assert plan.prefill_capacity < plan.decode_capacity
    elif side == "decode":
        assert plan.decode_capacity < plan.prefill_capacity


@settings(max_examples=300, deadline=None)
@given(profiles, budgets, floors)
def test_no_single_move_improves_the_plan(p: ScenarioProfile, budget: int, mpr: int) -> None:
    plan = plan_ratio(p, budget, min_per_role=mpr)
    f = floor_of(budget, mpr)
    best = min(plan.prefill_capacity, plan.decode_capacity)
    for a, b in ((plan.n_p + 1, plan.n_d - 1), (plan.n_p - 1, plan.n_d + 1)):
        if a >= f and b >= f:
            assert split(p, a, b).bottleneck_capacity <= best * (1 + 1e-9)


@settings(max_examples=300, deadline=None)
@given(profiles, st.integers(1, 30), st.integers(1, 30))
def test_moving_toward_the_bottleneck_is_safe_while_the_giver_covers_it(
        p: ScenarioProfile, n_p: int, n_d: int) -> None:
    """Moving one instance from the non-bottleneck role to the bottleneck role never lowers
    the bottleneck capacity as long as the giver, one smaller, still covers the old
    bottleneck (without that condition it can: see the optimal-plan example above)."""
    s = split(p, n_p, n_d)
    one_p, one_d = pm.prefill_capacity(p, 1), pm.decode_capacity(p, 1)
    if s.prefill_capacity < s.decode_capacity and n_d > 1 \
            and s.decode_capacity - one_d >= s.prefill_capacity:
        assert split(p, n_p + 1, n_d - 1).bottleneck_capacity >= s.bottleneck_capacity
    if s.decode_capacity < s.prefill_capacity and n_p > 1 \
            and s.prefill_capacity - one_p >= s.decode_capacity:
        assert split(p, n_p - 1, n_d + 1).bottleneck_capacity >= s.bottleneck_capacity


@settings(max_examples=300, deadline=None)
@given(profiles, budgets, floors, st.floats(0.0, 500.0))
def test_traffic_plan_covers_with_fewest_instances(p: ScenarioProfile, budget: int, mpr: int,
                                                   traffic: float) -> None:
    plan = plan_ratio(p, budget, traffic_rps=traffic, min_per_role=mpr)
    f = floor_of(budget, mpr)
    assert plan.n_p + plan.n_d <= budget and plan.n_p >= f and plan.n_d >= f
    assert plan.admitted_rps == pytest.approx(min(traffic, plan.prefill_capacity))
    covering = [r for r in plan_table(p, budget, min_per_role=mpr)
                if r.bottleneck_capacity >= traffic * (1 - 1e-9)]  # the planner's float slack
    if covering:
        assert plan.bottleneck == "traffic"
        assert plan.n_p + plan.n_d == min(r.n_p + r.n_d for r in covering)
        assert min(plan.prefill_capacity, plan.decode_capacity) >= traffic * (1 - 1e-9)
    else:
        assert plan.n_p + plan.n_d == budget
        assert plan.bottleneck != "traffic"


@settings(max_examples=300, deadline=None)
@given(profiles, budgets, floors, st.floats(0.0, 300.0), st.floats(0.0, 300.0))
def test_more_traffic_never_lowers_admitted(p: ScenarioProfile, budget: int, mpr: int,
                                            t1: float, t2: float) -> None:
    lo, hi = sorted((t1, t2))
    a = plan_ratio(p, budget, traffic_rps=lo, min_per_role=mpr).admitted_rps
    b = plan_ratio(p, budget, traffic_rps=hi, min_per_role=mpr).admitted_rps
    assert b >= a * (1 - 1e-9)


@settings(max_examples=200, deadline=None)
@given(profiles, st.floats(0.001, 1000.0), floors)
def test_instances_for_traffic_is_minimal(p: ScenarioProfile, traffic: float, mpr: int) -> None:
    n_p, n_d = instances_for_traffic(p, traffic, mpr)
    assert min(pm.prefill_capacity(p, n_p), pm.decode_capacity(p, n_d)) >= traffic * (1 - 1e-9)
    if n_p > mpr:
        assert pm.prefill_capacity(p, n_p - 1) < traffic
    if n_d > mpr:
        assert pm.decode_capacity(p, n_d - 1) < traffic
