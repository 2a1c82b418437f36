"""A simulated prefill instance, following pd_serve.instance.prefill: `b_p` slots (the real
SlotPool), offers decided by the real `decide_offer`, the optional local FIFO of the
baselines, batched and chunked prefill (pd_serve.sim.engine), the first token, and the
hand-off to the decode peer the real `rank_decode_peers` picks; the slot is held until decode
has fetched the KV.

Lifecycle of one request (who frees what):
1. `offer(req)` (the offer arrives, half an RTT after the gateway sent it): rejected (nothing
   held), `deadline_exceeded` (nothing held), started in a free slot, or queued in the FIFO
   (nothing held; the request ends `terminated` if its budget runs out before a slot frees);
2. prefill steps run until its prompt is computed: the first token leaves for the gateway;
   a request with one output token ends here and its slot is freed;
3. the hand-off is offered to the least busy decode peer (a draining one refuses: next peer);
   no peer left: the request fails and its slot is freed;
4. `handoff_done` (decode fetched the KV) frees the slot; a freed slot goes to the FIFO head.
On a shared host (pd_serve.sim.host) a step's end is a point in the instance's work time,
re-scheduled when a neighbour starts or stops; the instance counts as computing during steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pd_serve.instance import admission as adm
from pd_serve.sim.admit import SlotAdmission
from pd_serve.sim.context import SimContext
from pd_serve.sim.engine import Chunks, PrefillWork
from pd_serve.sim.request import SimRequest


class SimPrefill(SlotAdmission):
    role = "prefill"

    def __init__(self, name: str, ctx: SimContext) -> None:
        self.name = name
        self.ctx = ctx
        self.loop = ctx.loop
        self.spec = ctx.spec
        self.slots = adm.SlotPool(ctx.spec.b_p)
        self.fifo: deque[SimRequest] = deque()
        self.work = PrefillWork(ctx.spec, ctx.profile.prefill, ctx.noise)
        self.stepping = False
        self.peers: list[str] = []
        self.in_flight: dict[str, int] = {}
        self.rotation = 0  # as the real prefill: rotates rank_decode_peers' tie order
        self.draining = False
        self.on_idle: Callable[[object], None] | None = None
        self.served = 0  # first tokens produced
        # shared host (None: own cores): the step in progress and its end in work time
        self.clock = None if ctx.hosts is None else ctx.hosts.clock(name, self.role, self._retime)
        self.chunks: Chunks | None = None
        self.step_end = 0.0
        self.step_token = 0

    def _expired_hook(self) -> None:
        self._check_idle()

    def _start(self, req: SimRequest) -> None:
        self.work.add(req)
        if not self.stepping:
            self._step()

    def _step(self) -> None:
        chunks = self.work.compose(self.spec.max_num_seqs - len(self.work.running))
        if self.clock is not None:
            self._hosted_step(chunks)
        elif chunks is not None:
            self.stepping = True
            self.loop.after(self.work.duration(chunks), self._step_done, chunks)

    def _hosted_step(self, chunks: Chunks | None) -> None:
        """`_step` on a shared host: the step's end is a point in this instance's work time."""
        clock = self.clock
        assert clock is not None
        if chunks is None:
            clock.set_busy(False)
            return
        self.stepping = True
        self.chunks = chunks
        self.step_end = clock.local(self.loop.now) + self.work.duration(chunks)
        clock.set_busy(True)
        self._retime()

    def _retime(self) -> None:
        """(Re-)schedules the step's end at the current speed; an earlier schedule goes stale."""
        if self.chunks is not None and self.clock is not None:  # a step is in flight
            self.step_token += 1
            loop = self.loop
            loop.at(max(loop.now, self.clock.real(self.step_end)), self._hosted_done,
                    self.step_token)

    def _hosted_done(self, token: int) -> None:
        if token == self.step_token:
            chunks, self.chunks = self.chunks, None
            assert chunks is not None
            self._step_done(chunks)

    def _step_done(self, chunks: Chunks) -> None:
        for req in self.work.complete(chunks):
            self._prefilled(req)  # may start queued requests: they join the next step
        self.stepping = False
        self._step()

    def _prefilled(self, req: SimRequest) -> None:
        self.served += 1
        to_gateway = self.ctx.half_rtt
        if self.clock is not None and self.clock.neighbour_busy():
            to_gateway += self.ctx.first_token_delay
        req.first_token = self.loop.now + to_gateway
        if req.output_len <= 1:
            self._release(req)
            self.loop.after(to_gateway, self.ctx.gateway.finished_at_prefill, req)
            return
        req.candidates = adm.rank_decode_peers(self.peers, self.in_flight, self.rotation)
        self.rotation += 1
        self._offer_handoff(req)

    def _offer_handoff(self, req: SimRequest) -> None:
        """Offers the hand-off to the next candidate; none left: the request fails."""
        if not req.candidates:
            self._release(req)
            self.loop.after(self.ctx.half_rtt, self.ctx.gateway.failed_at_prefill, req)
            return
        req.peer = req.candidates.pop(0)
        target = self.ctx.instances.get(req.peer)
        if target is None or target.role != "decode":  # re-roled meanwhile: refused
            self.loop.after(self.ctx.half_rtt * 2, self.handoff_refused, req)
            return
        self.loop.after(self.ctx.half_rtt, target.handoff_offer, req)

    def handoff_refused(self, req: SimRequest) -> None:
        self._offer_handoff(req)

    def handoff_accepted(self, req: SimRequest) -> None:
        self.in_flight[req.peer] = self.in_flight.get(req.peer, 0) + 1

    def handoff_done(self, req: SimRequest) -> None:
        """Decode fetched the KV (or gave up on it): the slot is free again."""
        self.in_flight[req.peer] = max(0, self.in_flight.get(req.peer, 0) - 1)
        self._release(req)

    @property
    def idle(self) -> bool:
        return self.slots.busy == 0 and not self.fifo

    def leak_check(self) -> None:
        if self.slots.busy or self.fifo or self.work.busy or self.stepping:
            raise AssertionError(f"{self.name}: {self.slots.busy} slots busy, {len(self.fifo)} "
                                 f"queued, {self.work.busy} in the engine at the end")
        if any(self.in_flight.values()):
            raise AssertionError(f"{self.name}: hand-offs still in flight {self.in_flight}")
