"""Admission shared by the simulated prefill and aggregated instances: an offer answered with
the real `decide_offer` (start in a free slot, queue in the baselines' local FIFO until the
request's deadline, or reject), as the real instance's `PrefillRole.offer` does, and the slot
release that hands freed slots to that FIFO in order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from pd_serve.instance import admission as adm
from pd_serve.sim.request import SimRequest

if TYPE_CHECKING:
    from pd_serve.sim.context import SimContext
    from pd_serve.sim.events import EventLoop


class SlotAdmission:
    """Mixin: the host sets `ctx`, `loop`, `slots`, `fifo`, `draining`, `on_idle` and implements
    `idle` and `_start(req)`; `_expired_hook()` runs after a queued request expired (default:
    nothing); `_release(req)` frees a slot, starts waiters and reports idleness."""

    ctx: SimContext
    loop: EventLoop
    slots: adm.SlotPool
    fifo: deque[SimRequest]
    draining: bool
    on_idle: Callable[[object], None] | None

    def offer(self, req: SimRequest) -> None:
        now = self.loop.now
        verdict = adm.decide_offer(free_slots=self.slots.free, queued=len(self.fifo),
                                   queue_max=self.ctx.spec.prefill_queue_max,
                                   wants_queue=req.deadline is not None,
                                   draining=self.draining,
                                   expired=adm.past_deadline(req.deadline, now))
        req.verdict = verdict
        self.loop.after(self.ctx.half_rtt, self.ctx.gateway.answer, req)
        if verdict == "start":
            req.prefill = self
            slot = self.slots.acquire()
            assert slot is not None
            req.slot = slot
            self._start(req)
        elif verdict == "queue":
            req.prefill = self
            req.queued = True
            self.fifo.append(req)
            assert req.deadline is not None
            self.loop.at(req.deadline, self._expire, req)

    def _expire(self, req: SimRequest) -> None:
        if req.queued:
            self.fifo.remove(req)
            req.queued = False
            self.loop.after(self.ctx.half_rtt, self.ctx.gateway.expired_on_instance, req)
            self._expired_hook()

    def _release(self, req: SimRequest) -> None:
        """Frees `req`'s slot and hands free slots to the FIFO, as SlotQueue.release does."""
        self.slots.release(req.slot)
        req.slot = -1
        now = self.loop.now
        while self.fifo and self.slots.free:
            waiter = self.fifo.popleft()
            waiter.queued = False
            if adm.past_deadline(waiter.deadline, now):
                self.loop.after(self.ctx.half_rtt, self.ctx.gateway.expired_on_instance, waiter)
                continue
            slot = self.slots.acquire()
            assert slot is not None
            waiter.slot = slot
            self._start(waiter)
        self._check_idle()

    def _check_idle(self) -> None:
        if self.on_idle is not None and self.idle:
            self.on_idle(self)

    @property
    def idle(self) -> bool:
        raise NotImplementedError

    def _start(self, req: SimRequest) -> None:
        raise NotImplementedError

    def _expired_hook(self) -> None:
        """Called after a queued request left on its deadline."""
