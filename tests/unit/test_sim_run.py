"""The simulator end to end: hand-computed timings (one request; b_p full under forwarding vs
fifo), determinism, conservation (every request ends exactly once), slot/KV leak checks, the
real policy functions being the ones called, parked waiters matching polling exactly, and the
aggregated mode."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest

from pd_serve.bench.traces import TraceRequest
from pd_serve.config import TTFTBand
from pd_serve.gateway import policy as pol
from pd_serve.instance import admission
from pd_serve.orchestrator import groups
from pd_serve.sim.config import GatewaySpec, InstanceSpec, ScenarioSpec, SimConfig
from pd_serve.sim.latency import DecodeModel, HandoffModel, LatencyProfile, PrefillModel
from pd_serve.sim.prefill import SimPrefill
from pd_serve.sim.records import OUTCOMES
from pd_serve.sim.run import simulate

PROFILE = LatencyProfile(PrefillModel(0.004, 0.001, 1e-4, 1e-8), DecodeModel(0.01, 5e-4, 1e-6),
                         HandoffModel(0.002, 1e9), 6144)
RTT = 0.002


def _cfg(n_p: int = 1, n_d: int = 1, policy: str = "forwarding", mode: str = "disaggregated",
         deadline: float = 30.0, **kw: Any) -> SimConfig:
    inst = kw.pop("instance", InstanceSpec())
    gw = kw.pop("gateway", GatewaySpec(rtt_s=RTT, retry_interval_s=0.02))
    return SimConfig((ScenarioSpec("default", n_p, n_d, policy, (TTFTBand(None, deadline),)),),
                     mode, inst, gw, **kw)


def _trace(n: int, rate: float, seed: int = 0, scenarios: tuple[str, ...] = ("default",),
           max_in: int = 1500, max_out: int = 200) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    return [TraceRequest(float(t[i]), int(rng.integers(16, max_in)), int(rng.integers(1, max_out)),
                         tuple(int(x) for x in rng.integers(0, 4, 2)),
                         scenario=scenarios[i % len(scenarios)]) for i in range(n)]


def _decode_steps(input_len: int, output_len: int) -> float:
    d = PROFILE.decode
    return sum(d.time(1, input_len + 1 + j) for j in range(output_len - 1))


def test_one_request_disaggregated_by_hand() -> None:
    L, out = 300, 5
    rec = next(simulate([TraceRequest(0.0, L, out)], _cfg(), PROFILE).recorder.records())
    prefill = PROFILE.prefill.time_of([(0, L)])
    assert rec["first_token_s"] == pytest.approx(prefill + RTT, abs=1e-12)  # TTFT
    fetched = RTT / 2 + prefill + RTT / 2 + PROFILE.handoff.time(L * 6144)
    assert rec["end_s"] == pytest.approx(fetched + _decode_steps(L, out) + RTT / 2, abs=1e-12)
    assert rec["outcome"] == "finished" and rec["output_tokens"] == out
    assert rec["ttft_slo_met"] and rec["rejections"] == 0


def test_one_request_aggregated_by_hand() -> None:
    L, out = 300, 5
    rec = next(simulate([TraceRequest(0.0, L, out)], _cfg(mode="aggregated"),
                        PROFILE).recorder.records())
    prefill = PROFILE.prefill.time_of([(0, L)])
    assert rec["first_token_s"] == pytest.approx(prefill + RTT, abs=1e-12)
    assert rec["end_s"] == pytest.approx(prefill + RTT + _decode_steps(L, out), abs=1e-12)


@pytest.mark.parametrize("policy", ["forwarding", "fifo"])
def test_second_request_waits_for_the_only_slot(policy: str) -> None:
    eps, L, interval = 1e-4, 400, 0.02
    prefill = PROFILE.prefill.time_of([(0, L)])
    cfg = _cfg(policy=policy, instance=InstanceSpec(b_p=1))
    result = simulate([TraceRequest(0.0, L, 1), TraceRequest(eps, L, 1)], cfg, PROFILE)
    a, b = result.recorder.records()
    slot_free = RTT / 2 + prefill  # one output token: the slot frees when prefill ends
    assert a["first_token_s"] == pytest.approx(slot_free + RTT / 2)
    if policy == "fifo":  # queued on the instance, started the moment the slot frees
        expected, rejections = slot_free + prefill + RTT / 2, 0
    else:  # rejected; retries every RTT + retry interval from the gateway's waiting line
        offer, rejections = eps, 0
        while offer + RTT / 2 < slot_free:
            offer += RTT + interval
            rejections += 1
        expected = offer + RTT / 2 + prefill + RTT / 2
    assert b["first_token_s"] == pytest.approx(expected, abs=1e-12)
    assert b["rejections"] == rejections


def test_same_seed_same_results_other_seed_differs() -> None:
    trace = _trace(400, rate=20)
    cfg = _cfg(2, 3, noise_cv=0.3, seed=7)
    one, two = (simulate(trace, cfg, PROFILE).recorder.columns() for _ in range(2))
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])
    other = simulate(trace, _cfg(2, 3, noise_cv=0.3, seed=8), PROFILE).recorder.columns()
    assert not np.array_equal(one["end_s"], other["end_s"])


@pytest.mark.parametrize("policy", ["forwarding", "fifo", "round_robin"])
@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_every_request_ends_exactly_once_under_overload(policy: str, mode: str) -> None:
    trace = _trace(600, rate=60)
    cfg = _cfg(2, 2, policy, mode, deadline=1.0,
               instance=InstanceSpec(kv_blocks=300, prefix_cache_blocks=8, hash_block_tokens=64,
                                     prefill_queue_max=8))
    result = simulate(trace, cfg, PROFILE)  # check=True: ends and leak checks
    s = result.summary["overall"]
    assert s["requests"] == 600 and s["open"] == 0
    assert s["finished"] + s["terminated"] + s["failed"] == 600
    assert s["terminated"] > 0 and s["finished"] > 0
    outcomes = Counter(r["outcome"] for r in result.recorder.records())
    assert set(outcomes) <= set(OUTCOMES)


def test_requests_that_cannot_fit_decode_fail_and_free_everything() -> None:
    cfg = _cfg(instance=InstanceSpec(kv_blocks=8, block_size=16))  # 128 tokens of KV
    trace = [TraceRequest(0.0, 100, 10), TraceRequest(0.1, 200, 10), TraceRequest(0.2, 50, 10)]
    outcomes = [r["outcome"] for r in simulate(trace, cfg, PROFILE).recorder.records()]
    assert outcomes == ["finished", "failed", "finished"]


def test_leak_check_catches_a_slot_that_is_never_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SimPrefill, "handoff_done", lambda self, req: None)
    with pytest.raises(AssertionError, match="slots busy"):
        simulate(_trace(20, rate=5), _cfg(), PROFILE)


def test_the_real_policy_functions_are_called(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()

    def counting(module: Any, name: str) -> None:
        real = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for name in ("join", "decide", "note_offer", "note_accept", "note_reject", "note_wait",
                 "note_done", "note_close", "ttft_deadline", "first_token_in_slo"):
        counting(pol, name)
    for name in ("decide_offer", "rank_decode_peers", "past_deadline"):
        counting(admission, name)
    counting(groups, "reconcile")
    n = 300
    simulate(_trace(n, rate=40), _cfg(2, 2, deadline=2.0), PROFILE)
    assert calls["join"] == calls["ttft_deadline"] == calls["note_done"] == n
    assert calls["decide"] >= n and calls["note_offer"] == calls["decide_offer"]
    assert calls["note_accept"] + calls["note_reject"] == calls["note_offer"]
    assert calls["note_reject"] > 0 and calls["note_wait"] > 0
    assert calls["note_close"] == calls["note_accept"] and calls["rank_decode_peers"] > 0
    assert calls["reconcile"] >= 1 and calls["first_token_in_slo"] > 0


def test_parked_waiters_give_exactly_the_polling_results() -> None:
    trace = _trace(500, rate=50)
    runs = {park: simulate(trace, _cfg(2, 3, deadline=1.5, gateway=GatewaySpec(
        RTT, 0.0173, park_waiters=park)), PROFILE) for park in (True, False)}
    parked, polled = (runs[p].recorder.columns() for p in (True, False))
    for key in parked:
        np.testing.assert_array_equal(parked[key], polled[key])
    assert runs[True].events < runs[False].events
    assert runs[True].summary["overall"]["terminated"] > 0


def test_scenarios_are_routed_to_their_own_groups() -> None:
    trace = _trace(200, rate=20, scenarios=("chat", "code"))
    cfg = SimConfig((ScenarioSpec("chat", 1, 2), ScenarioSpec("code", 2, 1)),
                    gateway=GatewaySpec(RTT))
    result = simulate(trace, cfg, PROFILE)
    assert set(result.summary["scenarios"]) == {"chat", "code"}
    assert result.summary["scenarios"]["chat"]["requests"] == 100
    assert result.final_groups == {"chat": {"prefill": 1, "decode": 2},
                                   "code": {"prefill": 2, "decode": 1}}
    with pytest.raises(ValueError, match="scenario 'other' has no group"):
        simulate([TraceRequest(0.0, 10, 2, scenario="other")], cfg, PROFILE)


def test_prefix_cache_turns_shared_prefixes_into_cached_tokens() -> None:
    trace = [TraceRequest(i * 0.5, 256, 2, (1, 2, 3, 4 + i)) for i in range(4)]
    cols = {cap: simulate(trace, _cfg(instance=InstanceSpec(
        prefix_cache_blocks=cap, hash_block_tokens=64)), PROFILE).recorder.columns()
        for cap in (0, 16)}
    assert cols[0]["cached_tokens"].sum() == 0
    assert list(cols[16]["cached_tokens"]) == [0, 192, 192, 192]
    assert cols[16]["first_token_s"][1] - 0.5 < cols[0]["first_token_s"][1] - 0.5
    assert not math.isnan(cols[16]["first_token_s"][3])


def test_records_feed_the_bench_metrics() -> None:
    from pd_serve.bench.metrics import compute_metrics
    from pd_serve.bench.slo import SLO, SLOTable
    from pd_serve.sim.bench_records import duration_s, request_records

    result = simulate(_trace(300, rate=60), _cfg(2, 2, deadline=1.0), PROFILE)
    recs = request_records(result.recorder)
    m = compute_metrics(recs, duration_s(result.recorder),
                        slos=SLOTable(SLO(ttft_slo=(TTFTBand(None, 1.0),))))
    s = result.summary["overall"]
    assert (m.completed, m.failed) == (s["finished"], s["terminated"] + s["failed"])
    assert m.stat("ttft").median / 1000 == pytest.approx(np.median(
        [r.ttft_s for r in recs if r.success]))
    assert m.stat("tpot").mean / 1000 == pytest.approx(s["tpot_mean_s"], rel=1e-9)
    assert m.slo_attainment == pytest.approx(s["slo_success_rate"])
