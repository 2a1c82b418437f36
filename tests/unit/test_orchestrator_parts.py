"""The orchestrator's small stateful parts: the sample collector (cursor paging over real
gateway routes, windows, summaries), the recovery log, the health checker (threshold counted
only after a first success) and the gateway's sample log."""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi import FastAPI

from pd_serve.gateway.samples import SampleLog
from pd_serve.gateway.timeline import FAILED, OK, Timeline
from pd_serve.orchestrator.collector import SampleCollector
from pd_serve.orchestrator.health import HealthChecker
from pd_serve.orchestrator.recovery import RecoveryLog


def timeline(scenario: str, ttft: float, e2e: float, outcome: str = OK) -> Timeline:
    tl = Timeline(f"r{time.monotonic_ns()}", scenario, 0.0, 8, 10.0)
    tl.token(ttft, 1)
    tl.token(e2e, 4)
    tl.finish(outcome, e2e)
    return tl


def test_sample_log_pages_with_a_cursor_and_counts_dropped() -> None:
    log = SampleLog(capacity=3)
    for i in range(5):
        log.add(timeline("a", 0.1 * (i + 1), 1.0))
    page = log.since(0)
    assert [s["seq"] for s in page["samples"]] == [3, 4, 5] and page["dropped"] == 2
    assert page["next"] == 5 and log.since(5)["samples"] == []
    assert log.since(99)["next"] == 5  # a reader ahead of a restarted gateway resyncs
    assert log.since(3, limit=1)["samples"][0]["seq"] == 4


def test_collector_reads_gateways_and_summarises() -> None:
    logs = {"g1": SampleLog(100), "g2": SampleLog(100)}
    app = FastAPI()

    @app.get("/{gw}/stats/samples")
    def samples(gw: str, since: int = 0) -> dict[str, object]:
        return logs[gw].since(since)

    logs["g1"].add(timeline("chat", 0.2, 1.0))
    logs["g2"].add(timeline("chat", 0.4, 2.0))
    logs["g2"].add(timeline("chat", 0.1, 0.5, FAILED))
    col = SampleCollector(window_s=60.0)

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gw") as client:
            await col.poll(client, ["http://gw/g1", "http://gw/g2", "http://gw/missing"])
            await col.poll(client, ["http://gw/g1", "http://gw/g2"])  # nothing new: no repeats

    asyncio.run(run())
    summary = col.summary("chat")
    assert summary["requests"] == 3 and summary["failed"] == 1
    assert summary["ttft"]["count"] == 2 and abs(summary["tp_share"] - 0.6 / 3.0) < 1e-9
    assert len(col.take_fresh("chat")) == 3 and col.take_fresh("chat") == []
    assert col.summary("other")["requests"] == 0


def test_recovery_log_pairs_replacement_and_times_it() -> None:
    log = RecoveryLog(keep=2)
    ev = log.open("d1", "decode", "chat", "lost", now=100.0)
    log.note_assign("p9", "prefill", "chat")  # another role: not a replacement
    log.note_assign("s1", "decode", "chat")
    assert ev.replacement == "s1" and ev.recovery_s is None
    assert log.note_serving("chat", "decode", {"other"}, now=101.0) == []
    assert log.note_serving("chat", "decode", {"s1"}, now=102.5) == [ev]
    assert ev.recovery_s == 2.5
    for i in range(3):
        log.open(f"x{i}", "prefill", "chat", "lost")
    assert len(log.events) == 2 and log.failures == 4


def test_health_checker_counts_failures_only_after_a_first_success() -> None:
    up = {"a": True, "b": False}
    app = FastAPI()

    @app.get("/{iid}/health")
    def health(iid: str) -> dict[str, str]:
        if not up[iid]:
            raise RuntimeError("down")
        return {"status": "ok"}

    hc = HealthChecker(failures=2, timeout_s=1.0)
    urls = {"a": "http://i/a", "b": "http://i/b"}

    async def rounds(n: int) -> list[list[tuple[str, str]]]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport) as client:
            return [await hc.check(client, urls) for _ in range(n)]

    assert asyncio.run(rounds(3)) == [[], [], []]  # b never answered: still starting
    up["a"] = False
    crossed = asyncio.run(rounds(3))
    assert crossed[0] == [] and [i for i, _ in crossed[1]] == ["a"] and crossed[2] == []
    assert "HTTP 500" in crossed[1][0][1]
    hc.forget("a")
    assert "a" not in hc.seen_ok
