"""The E2E P/D performance model: hand-computed T_p, T_d, capacities and Phi (including the
paper's worked example), interpolation between profiled batch sizes, validation and JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.orchestrator import perf_model as pm
from pd_serve.orchestrator.perf_model import ScenarioProfile


def chat(**over: Any) -> ScenarioProfile:
    kw: dict[str, Any] = dict(name="chat", b_p=4, b_d=16,
                              ttft_by_batch={1: 0.1, 2: 0.15, 4: 0.25}, r_pre=0.8,
                              tpot_by_batch={1: 0.01, 8: 0.02, 16: 0.03}, xi=0.05, G=100)
    kw.update(over)
    return ScenarioProfile(**kw)


def paper(g: float = 10.0) -> ScenarioProfile:
    """Fig. 12a: one prefill instance serves 0.6 (normalised), one decode instance 0.7."""
    return ScenarioProfile(name="fig12a", b_p=6, b_d=7, tp_by_batch={6: 10.0},
                           tpot_by_batch={7: 1.0}, xi=0.0, G=g)


def test_hand_computed_latencies() -> None:
    p = chat()
    assert pm.t_p(p) == pytest.approx(0.25 * 0.8)  # T_p = TTFT_bs * r_pre at b_p = 4
    assert pm.t_p(p, 3) == pytest.approx(0.2 * 0.8)  # halfway between 2 and 4
    assert pm.t_p(p, 0.5) == pytest.approx(0.08)  # clamped below the smallest batch
    assert pm.t_p(p, 64) == pytest.approx(0.2)  # clamped above the largest
    assert pm.tpot(p) == pytest.approx(0.03)
    assert pm.tpot(p, 12) == pytest.approx(0.025)
    assert pm.t_d(p) == pytest.approx(0.05 + 0.03 * 100)  # T_d = xi + TPOT_bs * G
    assert pm.e2e(p) == pytest.approx(0.2 + 3.05)
    assert pm.tp_share(p) == pytest.approx(0.2 / 3.25)


def test_hand_computed_capacities_and_phi() -> None:
    p = chat()
    assert pm.prefill_capacity(p, 2) == pytest.approx(2 * 4 / 0.2)  # 40 req/s
    assert pm.decode_capacity(p, 3) == pytest.approx(3 * 16 / 3.05)  # 15.74 req/s
    assert pm.phi(p, 2, 3) == pytest.approx(3 * 16 / 3.05 / 5)  # decode-bound
    assert pm.phi(p, 2, 3, traffic_rps=10.0) == pytest.approx(10.0 / 5)  # traffic-bound
    assert pm.phi(p, 0, 3) == 0.0
    assert pm.served_rps(p, 1, 10) == pytest.approx(20.0)  # prefill-bound


def test_paper_worked_example_n_to_1_stays_capped_by_decode() -> None:
    p = paper()
    assert pm.prefill_capacity(p, 1) == pytest.approx(0.6)
    assert pm.decode_capacity(p, 1) == pytest.approx(0.7)
    assert pm.served_rps(p, 1, 1) == pytest.approx(0.6)
    for n in range(2, 9):  # N:1 raises prefill to 0.6 N, the system stays at decode's 0.7
        assert pm.prefill_capacity(p, n) == pytest.approx(0.6 * n)
        assert pm.served_rps(p, n, 1) == pytest.approx(0.7)
        assert pm.phi(p, n, 1) == pytest.approx(0.7 / (n + 1))
        assert pm.served_rps(p, 1, n) == pytest.approx(0.6)  # 1:N: prefill stays the cap
    longer = paper(g=15.0)  # T_d+: 50% more generated tokens lowers decode capability
    assert pm.served_rps(longer, 4, 1) == pytest.approx(7 / 15)


def test_tp_table_is_used_as_is() -> None:
    from_json: dict[Any, float] = {"1": 0.1, "2": 0.3}
    p = ScenarioProfile(name="s", b_p=2, b_d=2, tp_by_batch=from_json,
                        tpot_by_batch={2: 0.01}, xi=0.0, G=10)
    assert pm.t_p(p) == pytest.approx(0.3)
    assert list(p.tp_by_batch or {}) == [1, 2]  # JSON-style keys became ints


def test_json_round_trip() -> None:
    p = chat(prompt_tokens=512.0, output_tokens=101.0)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["ttft_by_batch"] == {"1": 0.1, "2": 0.15, "4": 0.25}
    assert d["tp_by_batch"] is None
    q = ScenarioProfile.from_dict(d)
    assert q == p
    assert pm.e2e(q) == pm.e2e(p)


@pytest.mark.parametrize(("over", "field"), [
    ({"name": ""}, "name"),
    ({"b_p": 0}, "b_p"),
    ({"b_d": True}, "b_d"),
    ({"b_d": 2.0}, "b_d"),
    ({"xi": -0.1}, "xi"),
    ({"xi": math.nan}, "xi"),
    ({"G": 0}, "G"),
    ({"r_pre": 0.0}, "r_pre"),
    ({"r_pre": 1.5}, "r_pre"),
    ({"tp_by_batch": {1: 0.1}}, "tp_by_batch"),  # both tables
    ({"ttft_by_batch": None}, "tp_by_batch"),  # neither
    ({"ttft_by_batch": None, "tp_by_batch": {1: 0.1}}, "r_pre"),  # r_pre 0.8 with T_p
    ({"tpot_by_batch": {}}, "tpot_by_batch"),
    ({"tpot_by_batch": {0: 0.1}}, "tpot_by_batch"),
    ({"tpot_by_batch": {"x": 0.1}}, "tpot_by_batch"),
    ({"tpot_by_batch": {1.5: 0.1}}, "tpot_by_batch"),
    ({"tpot_by_batch": {1: 0.0}}, "tpot_by_batch[1]"),
    ({"ttft_by_batch": {1: -1.0}}, "ttft_by_batch[1]"),
    ({"ttft_by_batch": {1: 0.1, "1": 0.2}}, "ttft_by_batch"),
    ({"prompt_tokens": -1}, "prompt_tokens"),
])
def test_bad_profile_names_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field.replace('[', '.').replace(']', '.')}"):
        chat(**over)


def test_from_dict_errors() -> None:
    d = chat().to_dict()
    with pytest.raises(ValueError, match="^extra: unknown profile field"):
        ScenarioProfile.from_dict({**d, "extra": 1})
    del d["xi"]
    with pytest.raises(ValueError, match="xi"):
        ScenarioProfile.from_dict(d)
    with pytest.raises(ValueError, match="expected an object"):
        ScenarioProfile.from_dict([])  # type: ignore[arg-type]


@pytest.mark.parametrize(("call", "field"), [
    (lambda p: pm.prefill_capacity(p, -1), "n_p"),
    (lambda p: pm.decode_capacity(p, 1.5), "n_d"),  # type: ignore[arg-type]
    (lambda p: pm.phi(p, 0, 0), "n_p \\+ n_d"),
    (lambda p: pm.phi(p, 1, 1, -2.0), "traffic_rps"),
    (lambda p: pm.phi(p, 1, 1, math.nan), "traffic_rps"),
    (lambda p: pm.t_p(p, 0), "batch size"),
    (lambda p: pm.tpot(p, math.inf), "batch size"),
])
def test_bad_arguments(call: Any, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        call(chat())


tables = st.dictionaries(st.integers(1, 64), st.floats(1e-4, 10.0), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(tables, st.floats(0.01, 100.0))
def test_interpolation_stays_between_neighbours(table: dict[int, float], b: float) -> None:
    v = pm.interpolate(table, b)
    below = [k for k in table if k <= b]
    above = [k for k in table if k >= b]
    lo = table[max(below)] if below else table[min(table)]
    hi = table[min(above)] if above else table[max(table)]
    assert min(lo, hi) - 1e-12 <= v <= max(lo, hi) + 1e-12
    for k, t in table.items():  # exact at measured points
        assert pm.interpolate(table, k) == pytest.approx(t)


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-3, 5.0), st.floats(1e-4, 0.5), st.floats(0, 1.0), st.floats(1, 500),
       st.integers(1, 16), st.integers(1, 64), st.integers(0, 20), st.integers(0, 20),
       st.one_of(st.none(), st.floats(0, 1e3)))
def test_phi_is_the_formula(tp: float, tpot: float, xi: float, g: float, b_p: int, b_d: int,
                            n_p: int, n_d: int, traffic: float | None) -> None:
    if n_p + n_d == 0:
        return
    p = ScenarioProfile(name="h", b_p=b_p, b_d=b_d, tp_by_batch={b_p: tp},
                        tpot_by_batch={b_d: tpot}, xi=xi, G=g)
    expected = min(math.inf if traffic is None else traffic, n_p * b_p / tp,
                   n_d * b_d / (xi + tpot * g)) / (n_p + n_d)
    assert pm.phi(p, n_p, n_d, traffic) == pytest.approx(expected)
    assert pm.prefill_capacity(p, n_p + 1) >= pm.prefill_capacity(p, n_p)
