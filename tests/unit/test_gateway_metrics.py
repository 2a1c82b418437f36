"""Gateway timelines and metrics aggregation: TTFT/TPOT/E2E, SLO success, rejections,
terminations; the bounded ring; JSON and Prometheus views."""

from __future__ import annotations

from pd_serve.gateway.metrics import GatewayMetrics, percentiles
from pd_serve.gateway.timeline import CANCELLED, OK, TERMINATED, Timeline, TimelineRing


def finished(rid: str, first: float, end: float, tokens: int, rejects: int = 0,
             deadline: float = 1.0, scenario: str = "s") -> Timeline:
    tl = Timeline(rid, scenario, 0.0, 10, deadline)
    for i in range(rejects):
        tl.offer(0.01 * i, f"p{i}", "all slots busy")
    tl.offer(0.05, "px", "accepted")
    tl.token(first, 1)
    for n in range(2, tokens + 1):
        tl.token(first + 0.1 * (n - 1), n)
    tl.finish(OK, first + 0.1 * (tokens - 1))
    return tl


def test_timeline_latencies() -> None:
    tl = finished("r", 0.2, 0.0, 5, rejects=2)
    assert tl.ttft() == 0.2 and tl.rejections == 2 and tl.completion_tokens == 5
    assert abs((tl.tpot() or 0) - 0.1) < 1e-9 and abs((tl.e2e() or 0) - 0.6) < 1e-9
    assert tl.in_slo() is True
    j = tl.to_json()
    assert j["offers"][-1]["answer"] == "accepted" and j["outcome"] == OK


def test_late_first_token_is_slo_failure() -> None:
    assert finished("r", 1.5, 0, 3).in_slo() is False


def test_terminated_counts_as_slo_failure_and_termination() -> None:
    m = GatewayMetrics(["s"], 100)
    tl = Timeline("t", "s", 0.0, 10, 0.5)
    tl.offer(0.1, "a", "all slots busy")
    tl.finish(TERMINATED, 0.5, "deadline")
    m.record(tl)
    m.record(finished("r", 0.2, 0, 3))
    snap = m.snapshot()["s"]
    assert snap["requests"] == 2 and snap["terminations"] == 1
    assert snap["ttft_slo_success_rate"] == 0.5
    assert snap["rejections"] == 1 and snap["rejections_per_request"]["mean"] == 0.5
    assert snap["ttft_s"]["count"] == 1 and snap["e2e_s"]["count"] == 1


def test_cancelled_before_first_token_is_not_judged() -> None:
    m = GatewayMetrics(["s"], 100)
    tl = Timeline("c", "s", 0.0, 10, 0.5)
    tl.finish(CANCELLED, 0.1)
    m.record(tl)
    assert m.snapshot()["s"]["ttft_slo_success_rate"] is None


def test_percentiles_nearest_rank() -> None:
    p = percentiles([float(x) for x in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["count"]) == (50.0, 90.0, 99.0, 100)
    assert percentiles([]) == {"count": 0}
    assert percentiles([3.0])["p99"] == 3.0


def test_samples_are_bounded() -> None:
    m = GatewayMetrics(["s"], 3)
    for i in range(10):
        m.record(finished(f"r{i}", 0.1 * (i + 1), 0, 2))
    snap = m.snapshot()["s"]
    assert snap["requests"] == 10 and snap["ttft_s"]["count"] == 3


def test_prometheus_export_per_scenario() -> None:
    m = GatewayMetrics(["a", "b"], 10)
    m.record(finished("r", 0.2, 0, 3, scenario="b"))
    text = m.prometheus().decode()
    assert 'pd_gateway_ttft_seconds_count{scenario="b"} 1.0' in text
    assert 'pd_gateway_requests_total{outcome="finished",scenario="b"} 1.0' in text
    assert 'pd_gateway_ttft_slo_total{met="true",scenario="b"} 1.0' in text
    assert 'pd_gateway_ttft_slo_success_rate{scenario="b"} 1.0' in text
    m.record(finished("late", 1.5, 0, 3, scenario="b"))
    assert 'pd_gateway_ttft_slo_success_rate{scenario="b"} 0.5' in m.prometheus().decode()


def test_ring_keeps_latest() -> None:
    ring = TimelineRing(2)
    for i in range(3):
        ring.add(Timeline(f"r{i}", "s", 0.0))
    assert ring.get("r0") is None and ring.get("r2") is not None and len(ring) == 2
    assert [t.request_id for t in ring.recent(5)] == ["r1", "r2"] and ring.recent(0) == []
