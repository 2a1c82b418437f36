"""Admission shared by the simulated prefill and aggregated instances: an offer answered with
the real `decide_offer` (start in a free slot, queue in the baselines' local FIFO until the
request's deadline, or reject), as the real instance's `PrefillRole.offer` does."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from pd_serve.instance import admission as adm
from pd_serve.sim.request import SimRequest

if TYPE_CHECKING:
    from pd_serve.sim.context import SimContext
    from pd_serve.sim.events import EventLoop


class SlotAdmission:
    """Mixin: the host sets `ctx`, `loop`, `spec`, `slots`, `fifo`, `draining` and implements
    `_start(req)`; `_expired_hook()` runs after a queued request expired (default: nothing)."""

    ctx: SimContext
    loop: EventLoop
    slots: adm.SlotPool
    fifo: deque[SimRequest]
    draining: bool

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

    def _start(self, req: SimRequest) -> None:
        raise NotImplementedError

    def _expired_hook(self) -> None:
        """Called after a queued request left on its deadline."""
