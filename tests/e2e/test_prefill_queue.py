"""Prefill instance admission as real processes on loopback, driven at /internal/prefill with
SSE (no front end): the baseline local FIFO (queue=true) serves in arrival order and is bounded;
a TTFT budget that runs out while queued ends the request `deadline_exceeded` without a slot; a
first token after the budget is flagged `late`; a draining instance refuses new work with 429
`draining`, finishes what it holds and reports idle. Every test ends with leak checks.

One b_p=1 prefill with a queue of 2, peered with one decode that waits 1 s before each KV fetch,
so every request holds the only slot for at least a second after its first token."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from pd_serve.models.tokenizer import Tokenizer
from tests.e2e.pd_cluster import PDCluster, Proc
from tests.e2e.server_process import DEMO_MODEL
from tests.e2e.test_pd_local import wait_clean, wait_stats

pytestmark = pytest.mark.e2e
Event = tuple[str, float, dict[str, Any]]  # (name, time.monotonic() when read, data)
SHORT = "ROMEO:\n"
LONG = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDCluster]:
    c = PDCluster(tmp_path_factory.mktemp("pq"), "torch", b_p=1, prefill_queue_max=2)
    try:
        yield c.start([{"fetch_delay_s": 1.0}], frontend=False)
    except Exception:
        print(c.logs())
        raise
    finally:
        c.stop()


@pytest.fixture()
def prefill(cluster: PDCluster) -> Iterator[Proc]:
    assert cluster.prefill is not None
    yield cluster.prefill
    for proc in (cluster.prefill, *cluster.decodes):  # leak checks after every test
        s = wait_clean(proc)
        assert s["idle"] and not s["draining"] and s.get("queued", 0) == 0


def body(rid: str, text: str = SHORT, **kw: Any) -> dict[str, Any]:
    return {"request_id": rid, "prompt_token_ids": Tokenizer(DEMO_MODEL).encode(text),
            "sampling": {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}, **kw}


def open_prefill(stack: ExitStack, proc: Proc, msg: dict[str, Any]) -> httpx.Response:
    """The SSE response of one offer, its status and headers read (events not yet)."""
    return stack.enter_context(httpx.stream("POST", f"{proc.url}/internal/prefill", json=msg,
                                            timeout=120))


def post(proc: Proc, msg: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{proc.url}/internal/prefill", json=msg, timeout=120)


def events(r: httpx.Response) -> list[Event]:
    out, name = [], ""
    for line in r.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            out.append((name, time.monotonic(), json.loads(line[5:])))
    return out


def to_end(r: httpx.Response) -> list[Event]:
    """Prefill events, then (after a hand-off) the decode stream read to its end."""
    seen = events(r)
    if seen and seen[-1][0] == "handoff":
        h = seen[-1][2]
        with httpx.stream("GET", f"{h['decode_url']}/internal/stream/{h['request_id']}",
                          timeout=120) as d:
            assert d.status_code == 200
            seen += events(d)
    return seen


def completed(seen: list[Event]) -> bool:
    return seen[0][0] == "first" and seen[1][0] == "handoff" and seen[-1][2]["finished"]


def test_queued_requests_get_the_slot_in_arrival_order(prefill: Proc) -> None:
    with ExitStack() as stack:
        rs = [open_prefill(stack, prefill, body(f"fifo-{i}", queue=True)) for i in range(3)]
        assert [r.status_code for r in rs] == [200, 200, 200]  # streams open, two still silent
        s = prefill.stats()
        assert (s["slots_busy"], s["queued"]) == (1, 2) and not s["idle"]
        full = post(prefill, body("fifo-full", queue=True))
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        plain = post(prefill, body("fifo-plain"))
        assert plain.status_code == 429 and plain.json()["error"]["code"] == "no_free_slot"
        with ThreadPoolExecutor(3) as pool:
            seen = list(pool.map(to_end, rs))
    assert all(completed(e) for e in seen)
    firsts = [e[0][1] for e in seen]
    assert firsts == sorted(firsts)  # first-token order equals arrival order
    assert not any(e[0][2]["late"] for e in seen)


def test_budget_gone_while_queued_ends_without_a_slot(cluster: PDCluster, prefill: Proc) -> None:
    before = prefill.stats()["deadline_exceeded"]
    with ExitStack() as stack:
        long = open_prefill(stack, prefill, body("dl-long", LONG, queue=True))
        short = open_prefill(stack, prefill, body("dl-short", queue=True, deadline_s=0.3))
        seen = events(short)
        assert [e[0] for e in seen] == ["error"]
        assert seen[0][2]["code"] == "deadline_exceeded"
        s = prefill.stats()  # dl-long still holds the only slot: dl-short never had one
        assert (s["slots_busy"], s["queued"]) == (1, 0)
        gone = post(prefill, body("dl-gone", queue=True, deadline_s=0.0))  # gone on arrival
        assert gone.status_code == 200 and '"deadline_exceeded"' in gone.text
        assert completed(to_end(long))
    assert prefill.stats()["deadline_exceeded"] == before + 2
    for rid in ("dl-short", "dl-gone"):  # never prefilled, so never handed off
        r = httpx.get(f"{cluster.decodes[0].url}/internal/stream/{rid}", timeout=10)
        assert r.status_code == 404


def test_first_token_after_the_budget_is_late(prefill: Proc) -> None:
    before = prefill.stats()["late_first_tokens"]
    fresh = "Second Citizen:\n" + LONG  # no cached prefix: ~0.1 s of prefill on CPU
    with httpx.stream("POST", f"{prefill.url}/internal/prefill", timeout=120,
                      json=body("late", fresh, deadline_s=0.02)) as r:
        assert r.status_code == 200
        seen = to_end(r)
    assert completed(seen) and seen[0][2]["late"] is True
    with httpx.stream("POST", f"{prefill.url}/internal/prefill", timeout=120,
                      json=body("on-time", LONG, deadline_s=60.0)) as r:
        seen = to_end(r)
    assert completed(seen) and seen[0][2]["late"] is False
    assert prefill.stats()["late_first_tokens"] == before + 1


def test_draining_prefill_refuses_new_work_and_finishes_its_own(prefill: Proc) -> None:
    with ExitStack() as stack:
        running = open_prefill(stack, prefill, body("drain-running", LONG))
        queued = open_prefill(stack, prefill, body("drain-queued", queue=True))
        r = httpx.post(f"{prefill.url}/internal/drain", timeout=10)
        assert r.json() == {"draining": True, "idle": False}
        for queue in (False, True):
            refused = post(prefill, body("drain-new", queue=queue))
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "draining"
        with ThreadPoolExecutor(2) as pool:
            assert all(completed(e) for e in pool.map(to_end, [running, queued]))
    s = wait_stats(prefill, lambda s: s["idle"])
    assert s["draining"] and s["rejected_by_code"]["draining"] >= 2
    r = httpx.post(f"{prefill.url}/internal/undrain", timeout=10)
    assert r.json() == {"draining": False, "idle": True}
    with httpx.stream("POST", f"{prefill.url}/internal/prefill", json=body("after-undrain"),
                      timeout=120) as again:
        assert completed(to_end(again))


def test_draining_decode_refuses_hand_offs(cluster: PDCluster, prefill: Proc) -> None:
    decode = cluster.decodes[0]
    assert httpx.post(f"{decode.url}/internal/drain", timeout=10).json()["draining"] is True
    try:
        with httpx.stream("POST", f"{prefill.url}/internal/prefill", json=body("to-drained"),
                          timeout=120) as r:
            seen = events(r)
        assert [e[0] for e in seen] == ["first", "error"]
        assert seen[1][2]["code"] == "handoff_failed" and "draining" in seen[1][2]["message"]
    finally:
        httpx.post(f"{decode.url}/internal/undrain", timeout=10)
