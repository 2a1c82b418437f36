"""A simulated aggregated instance (prefill and decode in one engine, as `pd-serve serve` runs
them): prefill-first continuous batching, i.e. a step is a prefill batch whenever prefill work
can run, else a decode step of every running request; decode is advanced analytically between
changes and paused while prefill steps run.

Admission mirrors a prefill instance so the same gateway policies apply: its "slots" are the
engine's `max_num_seqs` sequence places (the real SlotPool, held from acceptance to finish), an
offer is decided by the real `decide_offer`, and the baselines may queue in a local FIFO.

Lifecycle of one request (who frees what): offered -> rejected | queued | started (a place);
admitted into a prefill batch when KV blocks for its whole sequence are free (the queue head
waits otherwise); first token after its prefill; joins the decode batch; at its last step the
blocks and the place are freed and the stream to the gateway closes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pd_serve.instance import admission as adm
from pd_serve.sim.admit import SlotAdmission
from pd_serve.sim.batch import DecodeRun
from pd_serve.sim.context import SimContext
from pd_serve.sim.engine import Chunks, PrefillWork
from pd_serve.sim.records import FAILED, FINISHED
from pd_serve.sim.request import SimRequest

IDLE, PREFILL, DECODE = 0, 1, 2


class SimAggregated(SlotAdmission):
    role = "aggregated"

    def __init__(self, name: str, ctx: SimContext) -> None:
        self.name = name
        self.ctx = ctx
        self.loop = ctx.loop
        self.spec = ctx.spec
        self.slots = adm.SlotPool(ctx.spec.max_num_seqs)
        self.fifo: deque[SimRequest] = deque()
        self.work = PrefillWork(ctx.spec, ctx.profile.prefill, ctx.noise)
        self.run = DecodeRun(ctx.profile.decode, ctx.noise)
        self.kv_free = ctx.spec.kv_blocks
        self.phase = IDLE
        self.token = 0
        self.next_k = 0
        self.draining = False
        self.on_idle: Callable[[object], None] | None = None
        self.served = 0  # requests finished

    def _start(self, req: SimRequest) -> None:
        if self.ctx.kv_blocks_for(req.input_len, req.output_len) > self.spec.kv_blocks:
            self.loop.after(self.ctx.half_rtt, self._fail, req)  # after the acceptance
            return
        self.work.add(req)
        if self.phase == IDLE:
            self._next()
        elif self.phase == DECODE and self._prefill_ready():
            k = self.run.steps_to(self.loop.now)  # switch to prefill at the next boundary
            if k < self.next_k:
                self._schedule(k)

    def _fail(self, req: SimRequest) -> None:
        self._release(req)
        self.ctx.gateway.close_prefill_stream(req)
        self.ctx.gateway.end(req, FAILED, self.loop.now, 0)

    def _admit(self, req: SimRequest) -> bool:
        need = self.ctx.kv_blocks_for(req.input_len, req.output_len)
        if need > self.kv_free:
            return False
        self.kv_free -= need
        return True

    def _prefill_ready(self) -> bool:
        work = self.work
        return bool(work.running) or bool(work.waiting) and (
            self.ctx.kv_blocks_for(work.waiting[0].input_len, work.waiting[0].output_len)
            <= self.kv_free)

    def _next(self) -> None:
        """At a step boundary: a prefill step if prefill can run, else decode, else idle."""
        seq_room = self.spec.max_num_seqs - self.run.size - len(self.work.running)
        chunks = self.work.compose(seq_room, self._admit)
        if chunks is not None:
            self.phase = PREFILL
            self.loop.after(self.work.duration(chunks), self._prefill_done, chunks)
        elif self.run.size:
            self.phase = DECODE
            self.run.restart(self.loop.now)
            self._schedule(self.run.steps_to_finish())
        else:
            self.phase = IDLE

    def _prefill_done(self, chunks: Chunks) -> None:
        now = self.loop.now
        for req in self.work.complete(chunks):
            req.first_token = now + self.ctx.half_rtt
            if req.output_len <= 1:
                self._finish(req, now)
            else:
                self.run.add(req, req.output_len - 1)
        self._next()

    def _schedule(self, k: int) -> None:
        self.next_k = k
        self.token += 1
        self.loop.at(self.run.boundary(k), self._tick, self.token)

    def _tick(self, token: int) -> None:
        if token != self.token or self.phase != DECODE:
            return
        now = self.loop.now
        self.run.advance(self.next_k, now)
        for req in self.run.pop_finished():
            self._finish(req, now)
        self._next()

    def _finish(self, req: SimRequest, now: float) -> None:
        self.kv_free += self.ctx.kv_blocks_for(req.input_len, req.output_len)
        self.served += 1
        self._release(req)
        self.ctx.gateway.close_prefill_stream(req)
        self.ctx.gateway.end(req, FINISHED, now + self.ctx.half_rtt, req.output_len)

    @property
    def idle(self) -> bool:
        return self.slots.busy == 0 and not self.fifo

    def leak_check(self) -> None:
        if (self.kv_free != self.spec.kv_blocks or self.slots.busy or self.fifo
                or self.work.busy or self.run.size):
            raise AssertionError(f"{self.name}: {self.spec.kv_blocks - self.kv_free} KV blocks, "
                                 f"{self.slots.busy} places, {len(self.fifo)} queued at the end")
