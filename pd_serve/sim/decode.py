"""A simulated decode instance, following pd_serve.instance.decode: hand-offs queue; the queue
head reserves KV blocks and a batch place when both are free (`max_num_seqs` counting running,
reserved and fetching requests); fetches run one at a time (one staging buffer) and take the
hand-off model's time; a fetched request joins the running batch at the next step boundary and
decodes with continuous batching, advanced analytically (pd_serve.sim.batch).

Lifecycle of one hand-off (who frees what):
1. `handoff_offer(req)`: refused while draining (prefill tries its next peer), else queued;
   the gateway's prefill stream closes (it now follows the decode stream);
2. reserve: blocks for the whole sequence (prompt + output) are taken at once, so decode never
   preempts (the real engine grows blocks per token and preempts by recompute when they run
   out); a request that could never fit fails and prefill is told at once;
3. fetched after the hand-off time: prefill hears `handoff_done` (half an RTT later) and frees
   its slot; the request joins the batch;
4. finished at the boundary of its last step: blocks and batch place are freed, the next
   hand-offs are reserved.
On a shared host (pd_serve.sim.host) the batch runs in the instance's work time: boundaries are
mapped to virtual time at the current speed and re-scheduled when a neighbour starts or stops;
the instance counts as computing while its batch is not empty.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pd_serve.sim.batch import DecodeRun
from pd_serve.sim.context import SimContext
from pd_serve.sim.records import FAILED, FINISHED
from pd_serve.sim.request import SimRequest


class SimDecode:
    role = "decode"

    def __init__(self, name: str, ctx: SimContext) -> None:
        self.name = name
        self.ctx = ctx
        self.loop = ctx.loop
        self.spec = ctx.spec
        self.kv_free = ctx.spec.kv_blocks
        self.admitted = 0  # reserved + fetching + waiting to join + running
        self.queue: deque[SimRequest] = deque()
        self.fetch_queue: deque[SimRequest] = deque()
        self.fetching: SimRequest | None = None
        self.pending: list[SimRequest] = []  # fetched, joining at the next boundary
        self.run = DecodeRun(ctx.profile.decode, ctx.noise)
        self.token = 0
        self.next_k = 0
        self.scheduled = False
        self.draining = False
        self.on_idle: Callable[[object], None] | None = None
        self.served = 0  # requests finished
        # shared host (None: own cores): the batch then runs in this instance's work time
        self.clock = None if ctx.hosts is None else ctx.hosts.clock(name, self.role, self._retime)

    def handoff_offer(self, req: SimRequest) -> None:
        if self.draining:
            self.loop.after(self.ctx.half_rtt, req.prefill.handoff_refused, req)
            return
        req.decode = self
        req.prefill.handoff_accepted(req)
        self.ctx.gateway.close_prefill_stream(req)
        self.queue.append(req)
        self._reserve()

    def _reserve(self) -> None:
        ctx, queue = self.ctx, self.queue
        while queue:
            req = queue[0]
            need = ctx.kv_blocks_for(req.input_len, req.output_len)
            if need > self.spec.kv_blocks:
                queue.popleft()
                self.loop.after(ctx.half_rtt, req.prefill.handoff_done, req)
                ctx.gateway.end(req, FAILED, self.loop.now + ctx.half_rtt, 1)
                continue
            if self.admitted >= self.spec.max_num_seqs or need > self.kv_free:
                break
            queue.popleft()
            self.kv_free -= need
            self.admitted += 1
            self.fetch_queue.append(req)
        if self.fetching is None and self.fetch_queue:
            self._fetch()

    def _fetch(self) -> None:
        req = self.fetch_queue.popleft()
        self.fetching = req
        self.loop.after(self.ctx.handoff_time(req.input_len), self._fetched, req)

    def _fetched(self, req: SimRequest) -> None:
        self.fetching = None
        self.loop.after(self.ctx.half_rtt, req.prefill.handoff_done, req)
        run, clock = self.run, self.clock
        now = self.loop.now if clock is None else clock.local(self.loop.now)
        if run.size == 0 and not self.scheduled:
            run.restart(now)
            run.add(req, req.output_len - 1)
            if clock is not None:
                clock.set_busy(True)
            self._schedule(run.steps_to_finish())
        else:
            self.pending.append(req)
            k = run.steps_to(now)
            if k < self.next_k:
                self._schedule(k)
        if self.fetch_queue:
            self._fetch()

    def _schedule(self, k: int) -> None:
        self.next_k = k
        self.token += 1
        self.scheduled = True
        t = self.run.boundary(k)
        if self.clock is not None:  # boundaries are in work time on a shared host
            t = max(self.loop.now, self.clock.real(t))
        self.loop.at(t, self._tick, self.token)

    def _retime(self) -> None:
        """A neighbour on the host started or stopped: the next boundary moves."""
        if self.scheduled:
            self._schedule(self.next_k)

    def _tick(self, token: int) -> None:
        if token != self.token:
            return  # superseded by an earlier boundary
        self.scheduled = False
        now, run = self.loop.now, self.run
        t = now if self.clock is None else run.boundary(self.next_k)  # exact, in work time
        run.advance(self.next_k, t)
        finished = run.pop_finished()
        if self.pending:
            for req in self.pending:
                run.add(req, req.output_len - 1)
            self.pending.clear()
        run.restart(t)
        if run.size:
            self._schedule(run.steps_to_finish())
        elif self.clock is not None:
            self.clock.set_busy(False)
        if finished:
            ctx = self.ctx
            end = now + ctx.half_rtt
            for req in finished:
                self.kv_free += ctx.kv_blocks_for(req.input_len, req.output_len)
                self.admitted -= 1
                self.served += 1
                ctx.gateway.end(req, FINISHED, end, req.output_len)
            self._reserve()
            if self.on_idle is not None and self.idle:
                self.on_idle(self)

    @property
    def idle(self) -> bool:
        return self.admitted == 0 and not self.queue

    def leak_check(self) -> None:
        if self.kv_free != self.spec.kv_blocks or self.admitted or self.queue or self.run.size:
            raise AssertionError(f"{self.name}: {self.spec.kv_blocks - self.kv_free} KV blocks "
                                 f"held, {self.admitted} admitted, {len(self.queue)} queued, "
                                 f"{self.run.size} running at the end")
