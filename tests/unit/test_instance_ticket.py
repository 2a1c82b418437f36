"""A prefill slot or queue place taken at offer time comes back even when the SSE body never
starts (the client left before the response began), and only once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pd_serve.instance.app import _TicketedStream
from pd_serve.instance.prefill_queue import SlotQueue, Ticket

SCOPE: dict[str, Any] = {"type": "http", "asgi": {"spec_version": "2.0"}, "method": "POST"}


async def _disconnected() -> dict[str, Any]:
    return {"type": "http.disconnect"}


async def _gone(message: dict[str, Any]) -> None:
    raise OSError("client went away")


def test_unstarted_body_gives_the_slot_back() -> None:
    async def scenario() -> tuple[list[int], bool]:
        queue = SlotQueue(size=1, queue_max=4)
        slot = queue.acquire()
        started = False

        async def body() -> AsyncIterator[str]:
            nonlocal started
            started = True
            yield "event: first\n\n"

        ticket = Ticket(lambda: queue.release(slot))
        with contextlib.suppress(Exception):
            await _TicketedStream(body(), ticket)(SCOPE, _disconnected, _gone)
        ticket.abandon()  # a second abandon is a no-op
        return [queue.slots.free], started

    free, started = asyncio.run(scenario())
    assert free == [1] and not started


def test_claimed_ticket_is_left_to_the_body() -> None:
    async def scenario() -> list[str]:
        returned: list[str] = []
        sent: list[dict[str, Any]] = []
        ticket = Ticket(lambda: returned.append("given back"))

        async def body() -> AsyncIterator[str]:
            ticket.claim()
            yield "event: first\n\n"

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        await _TicketedStream(body(), ticket)(SCOPE, receive, send)
        assert any(m.get("body") == b"event: first\n\n" for m in sent)
        return returned

    assert asyncio.run(scenario()) == []


def test_abandoned_queue_place_is_removed() -> None:
    async def scenario() -> tuple[int, int]:
        queue = SlotQueue(size=1, queue_max=4)
        slot = queue.acquire()
        waiter = queue.push(deadline=None)
        Ticket(lambda: queue.abandon(waiter)).abandon()
        queued = queue.queued
        queue.release(slot)
        return queued, queue.slots.free

    assert asyncio.run(scenario()) == (0, 1)
