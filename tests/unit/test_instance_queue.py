"""Prefill admission with the optional local FIFO (baseline (a)) and TTFT deadlines: the pure
offer decision and deadline check, the SlotQueue hand-over in arrival order, and the wire fields."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from pd_serve.instance.admission import decide_offer, past_deadline
from pd_serve.instance.messages import FirstEvent, PrefillRequest
from pd_serve.instance.prefill_queue import SlotQueue


def offer(**kw: object) -> str:
    args = {"free_slots": 1, "queued": 0, "queue_max": 2, "wants_queue": False,
            "draining": False, "expired": False, **kw}
    return decide_offer(**args)  # type: ignore[arg-type]


def test_offer_without_queue_starts_or_rejects_at_once() -> None:
    assert offer() == "start"
    assert offer(free_slots=0) == "no_free_slot"
    assert offer(free_slots=1, queued=1) == "no_free_slot"  # nobody overtakes the FIFO


def test_offer_with_queue_waits_until_the_queue_is_full() -> None:
    assert offer(wants_queue=True) == "start"
    assert offer(wants_queue=True, free_slots=0, queued=1) == "queue"
    assert offer(wants_queue=True, free_slots=1, queued=1) == "queue"
    assert offer(wants_queue=True, free_slots=0, queued=2) == "queue_full"
    assert offer(wants_queue=True, free_slots=0, queue_max=0) == "queue_full"


def test_draining_refuses_and_expired_budget_never_starts() -> None:
    assert offer(draining=True) == "draining"
    assert offer(draining=True, expired=True) == "draining"
    assert offer(expired=True) == "deadline_exceeded"
    assert offer(expired=True, free_slots=0, wants_queue=True) == "deadline_exceeded"


def test_no_live_decode_peer_refuses_so_the_request_waits_at_the_gateway() -> None:
    assert offer(has_decode=False) == "no_decode_peer"
    assert offer(has_decode=False, draining=True) == "draining"
    assert offer(has_decode=False, wants_queue=True, free_slots=0) == "no_decode_peer"


def test_past_deadline_is_a_function_of_deadline_and_clock() -> None:
    assert not past_deadline(None, 1e9)
    assert not past_deadline(10.0, 9.99)
    assert past_deadline(10.0, 10.0) and past_deadline(10.0, 11.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_freed_slots_go_to_waiters_in_arrival_order() -> None:
    async def scenario() -> None:
        q = SlotQueue(1, 4, Clock())
        held = q.acquire()
        waiters = [q.push(None) for _ in range(3)]
        tasks = [asyncio.create_task(q.wait(w)) for w in waiters]
        await asyncio.sleep(0)
        for i, task in enumerate(tasks):
            q.release(held)
            assert [w.turn.done() for w in waiters] == [j <= i for j in range(3)]
            slot = await task
            assert slot is not None
            held = slot
        assert q.queued == 0 and q.slots.busy == 1
        q.release(held)
        assert q.slots.busy == 0

    asyncio.run(scenario())


def test_waiter_past_its_deadline_never_takes_a_slot() -> None:
    async def scenario() -> None:
        clock = Clock()
        q = SlotQueue(1, 4, clock)
        held = q.acquire()
        late, on_time = q.push(clock.now + 1.0), q.push(clock.now + 60.0)
        tasks = [asyncio.create_task(q.wait(w)) for w in (late, on_time)]
        await asyncio.sleep(0)
        clock.now += 2.0  # the first budget ran out while the slot was busy
        q.release(held)
        assert await tasks[0] is None
        slot = await tasks[1]
        assert slot == held and q.slots.busy == 1 and q.queued == 0
        q.release(slot)

    asyncio.run(scenario())


def test_waiter_deadline_timer_and_cancel_leave_no_trace() -> None:
    async def scenario() -> None:
        q = SlotQueue(1, 4)
        held = q.acquire()
        assert await q.wait(q.push(0.0)) is None  # budget already gone: the timer fires at once
        task = asyncio.create_task(q.wait(q.push(None)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert q.queued == 0
        q.release(held)
        assert q.slots.busy == 0

    asyncio.run(scenario())


def test_slot_reaching_a_cancelled_waiter_is_released_again() -> None:
    async def scenario() -> None:
        q = SlotQueue(1, 4)
        held = q.acquire()
        task = asyncio.create_task(q.wait(q.push(None)))
        await asyncio.sleep(0)
        q.release(held)  # handed over, and the waiter is cancelled before it resumes
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert q.slots.busy == 0 and q.queued == 0

    asyncio.run(scenario())


def test_wire_fields_default_to_on_demand_forwarding() -> None:
    base = {"request_id": "r", "prompt_token_ids": [1], "sampling": {}}
    req = PrefillRequest.model_validate(base)
    assert req.queue is False and req.deadline_s is None
    req = PrefillRequest.model_validate({**base, "queue": True, "deadline_s": 0.5})
    assert req.queue and req.deadline_s == 0.5
    with pytest.raises(ValidationError):
        PrefillRequest.model_validate({**base, "deadline_s": float("nan")})
    first = FirstEvent(token_id=1, text="a", prompt_tokens=1, cached_tokens=0, finished=False,
                       finish_reason=None)
    assert first.late is False
