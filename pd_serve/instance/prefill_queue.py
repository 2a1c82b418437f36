"""Prefill batch slots with the optional local FIFO in front of them (the paper's baseline (a);
on-demand forwarding never queues): queued requests get freed slots in arrival order.

Lifecycle of one queued request (who frees what):
1. the caller decided "queue" (`decide_offer`) and calls `push(deadline)`: a waiter joins the
   tail, nothing is held;
2. `release(slot)` (a slot's holder is done with it) hands the slot straight to the first waiter
   whose deadline has not passed; waiters found past their deadline are told None and dropped,
   so they never hold a slot;
3. `wait(waiter)` returns that slot, now owned by the caller (who `release`s it once), or None
   when the deadline passed first (the waiter leaves the queue);
4. a waiter cancelled while waiting (client gone) leaves the queue; a slot that reached it in the
   same instant is released again here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pd_serve.instance.admission import SlotPool, past_deadline


@dataclass(eq=False)
class Waiter:
    deadline: float | None  # time.monotonic() seconds; None: no TTFT budget
    turn: asyncio.Future[int | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class SlotQueue:
    """`size` slots and up to `queue_max` waiters (one event loop; no locks)."""

    def __init__(self, size: int, queue_max: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = SlotPool(size)
        self.queue_max = queue_max
        self._clock = clock
        self._waiters: deque[Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def acquire(self) -> int:
        """A free slot for a request that `decide_offer` let start (no waiter is ahead)."""
        slot = self.slots.acquire()
        assert slot is not None and not self._waiters, "start decided without a free slot"
        return slot

    def push(self, deadline: float | None) -> Waiter:
        assert len(self._waiters) < self.queue_max, "queue decided on a full queue"
        waiter = Waiter(deadline)
        self._waiters.append(waiter)
        return waiter

    async def wait(self, waiter: Waiter) -> int | None:
        """The slot handed to `waiter`, or None once its deadline passed first."""
        timeout = None
        if waiter.deadline is not None:
            timeout = max(0.0, waiter.deadline - self._clock())
        try:
            await asyncio.wait({waiter.turn}, timeout=timeout)
        except BaseException:
            self._abandon(waiter)
            raise
        if not waiter.turn.done():
            self._abandon(waiter)
            return None
        return waiter.turn.result()

    def release(self, slot: int) -> None:
        """Frees `slot` (exactly once per acquire/hand-over) and passes it on to the queue."""
        self.slots.release(slot)
        now = self._clock()
        while self._waiters and self.slots.free:
            waiter = self._waiters.popleft()
            if past_deadline(waiter.deadline, now):
                waiter.turn.set_result(None)
            else:
                waiter.turn.set_result(self.slots.acquire())

    def abandon(self, waiter: Waiter) -> None:
        """Takes `waiter` out of the queue, or passes on the slot it was already handed."""
        self._abandon(waiter)

    def _abandon(self, waiter: Waiter) -> None:
        if not waiter.turn.done():
            self._waiters.remove(waiter)
            waiter.turn.cancel()
            return
        slot = waiter.turn.result()
        if slot is not None:
            self.release(slot)


class Ticket:
    """What an offered request holds before its SSE body runs: a slot or a queue place.

    A body generator that never starts (the client left before the response began streaming)
    runs no `finally`, so whoever sends the response calls `abandon()` once it is over; it gives
    the slot or place back unless the body `claim()`ed it first (then the body frees it).
    """

    def __init__(self, give_back: Callable[[], None] | None = None) -> None:
        self._give_back = give_back
        self.claimed = False

    def claim(self) -> None:
        self.claimed = True

    def abandon(self) -> None:
        if not self.claimed and self._give_back is not None:
            self.claimed = True
            self._give_back()
