"""The simulated gateway: per scenario a real `RouterState`, and per request the loop of
pd_serve.gateway.forward.Forwarder.open driven by the real policy functions (`join`, `decide`,
`note_offer`, `note_accept`, `note_reject`, `note_wait`, `note_done`, `note_close`); only the
I/O is simulated: an offer reaches its instance half an RTT after it is sent and the answer
comes back half an RTT later, a Wait is a timer.

Lifecycle of one request: `arrive` (Attempt.start with the scenario's TTFT deadline, `join`);
`_step` applies `decide`: Offer -> the instance's `offer`; Wait -> a timer, then `note_wait`
and `_step` again; Terminate -> the request ends `terminated`. `answer`: a rejection is noted
and the loop continues; an acceptance opens the prefill stream (`note_accept`, `note_done`).
The stream closes (`note_close`) when the hand-off is accepted (the gateway then follows the
decode stream), when prefill ends the request, or when an aggregated instance finishes it.

Parked waiters (`GatewaySpec.park_waiters`): a request in the waiting line behind its head
gets Wait on every retry and nothing changes, so it is not woken for those decisions; it is
woken on the same retry grid when it becomes the head or when `decide` would terminate it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pd_serve.config import TTFTBand
from pd_serve.gateway import policy as pol
from pd_serve.instance.admission import REJECTIONS
from pd_serve.sim.config import GatewaySpec
from pd_serve.sim.events import EventLoop
from pd_serve.sim.records import FAILED, FINISHED, TERMINATED, Recorder
from pd_serve.sim.request import SimRequest

_REJECT_REASONS = {"no_free_slot": "all slots busy", "queue_full": "local queue full",
                   "draining": "draining"}


class GatewayScenario:
    """One scenario at the gateway: policy, TTFT bands, router state and its instances."""

    def __init__(self, name: str, index: int, policy: str, bands: Sequence[TTFTBand],
                 open_streams: dict[str, int]) -> None:
        self.name = name
        self.index = index
        self.policy = policy
        self.bands = tuple(bands)
        self.state = pol.RouterState((), open_streams)
        self.instances: dict[str, Any] = {}
        self.parked: dict[int, SimRequest] = {}


class SimGateway:
    def __init__(self, loop: EventLoop, spec: GatewaySpec, recorder: Recorder) -> None:
        self.loop = loop
        self.spec = spec
        self.half = spec.rtt_s / 2
        self.retry = spec.retry_interval_s
        self.recorder = recorder
        self.open_streams: dict[str, int] = {}  # shared by the scenarios, as in Forwarder
        self.scenarios: dict[str, GatewayScenario] = {}
        self.rejections = 0
        self.offers = 0

    def add_scenario(self, name: str, policy: str, bands: Sequence[TTFTBand]) -> GatewayScenario:
        sc = GatewayScenario(name, len(self.scenarios), policy, bands, self.open_streams)
        self.scenarios[name] = sc
        return sc

    def set_instances(self, name: str, instances: Sequence[Any]) -> None:
        """The scenario's prefill (or aggregated) instances changed (meta info)."""
        sc = self.scenarios[name]
        sc.instances.update((i.name, i) for i in instances)
        pol.set_instances(sc.state, [i.name for i in instances])

    def arrive(self, req: SimRequest) -> None:
        sc = req.scenario
        att = pol.Attempt.start(req.arrival, pol.ttft_deadline(sc.bands, req.input_len))
        pol.join(sc.state, att)
        req.attempt = att
        self._step(req)

    def _step(self, req: SimRequest) -> None:
        sc, att, now = req.scenario, req.attempt, self.loop.now
        d = pol.decide(sc.policy, sc.state, att, now, self.retry)
        if type(d) is pol.Offer:
            req.wait_k = 0
            pol.note_offer(sc.policy, sc.state, att, d.instance)
            req.deadline = now + self.half + d.deadline_s if d.queue else None
            self.offers += 1
            self.loop.after(self.half, sc.instances[d.instance].offer, req)
        elif type(d) is pol.Wait:
            if req.wait_k == 0:
                req.wait_origin = now
            req.wait_k += 1
            st = sc.state
            if self.spec.park_waiters and st.waiting and st.waiting[0] != att.id:
                self._park(req, d.seconds)
            else:
                self.loop.at(req.wait_origin + req.wait_k * d.seconds, self._wake, req)
        else:
            assert isinstance(d, pol.Terminate)
            self._done(req)
            self.end(req, TERMINATED, now, 0)

    def _wake(self, req: SimRequest) -> None:
        pol.note_wait(req.attempt)
        self._step(req)

    def _park(self, req: SimRequest, interval: float) -> None:
        """Sleeps until the retry at which `decide` terminates a non-head waiter."""
        att, origin = req.attempt, req.wait_origin

        def ends(k: int) -> bool:  # decide's own test, with the same float arithmetic
            t = origin + k * interval
            return t >= att.deadline or t + interval >= att.deadline

        k = max(req.wait_k, math.ceil((att.deadline - origin) / interval) - 1)
        while not ends(k):
            k += 1
        while k > req.wait_k and ends(k - 1):
            k -= 1
        req.wait_k = k
        req.park_token += 1
        req.scenario.parked[att.id] = req
        self.loop.at(req.wait_origin + k * interval, self._unpark, (req, req.park_token))

    def _unpark(self, arg: tuple[SimRequest, int]) -> None:
        req, token = arg
        if token == req.park_token:
            req.scenario.parked.pop(req.attempt.id, None)
            self._wake(req)

    def _done(self, req: SimRequest) -> None:
        """`note_done`, then wakes a parked request that became the head of the line."""
        sc = req.scenario
        pol.note_done(sc.state, req.attempt)
        if sc.parked and sc.state.waiting:
            head = sc.parked.pop(sc.state.waiting[0], None)
            if head is not None:
                now, interval = self.loop.now, self.retry
                k = max(1, math.ceil((now - head.wait_origin) / interval))
                while head.wait_origin + k * interval < now:
                    k += 1
                head.wait_k = k
                head.park_token += 1
                self.loop.at(head.wait_origin + k * interval, self._unpark,
                             (head, head.park_token))

    def answer(self, req: SimRequest) -> None:
        """The instance's answer to the last offer reached the gateway."""
        sc, att = req.scenario, req.attempt
        inst = att.tried[-1]
        verdict = req.verdict
        if verdict in REJECTIONS:
            self.rejections += 1
            pol.note_reject(sc.state, att, inst, _REJECT_REASONS[verdict])
            self._step(req)
            return
        pol.note_accept(sc.state, att, inst)
        self._done(req)
        if verdict == "deadline_exceeded":  # the stream only carries the error
            pol.note_close(sc.state, inst)
            self.end(req, TERMINATED, self.loop.now, 0)

    def close_prefill_stream(self, req: SimRequest) -> None:
        pol.note_close(req.scenario.state, req.attempt.accepted or "")

    def expired_on_instance(self, req: SimRequest) -> None:
        """A queued request's budget ran out on the instance (baselines)."""
        self.close_prefill_stream(req)
        self.end(req, TERMINATED, self.loop.now, 0)

    def finished_at_prefill(self, req: SimRequest) -> None:
        self.close_prefill_stream(req)
        self.end(req, FINISHED, self.loop.now, 1)

    def failed_at_prefill(self, req: SimRequest) -> None:
        self.close_prefill_stream(req)
        self.end(req, FAILED, self.loop.now, 1)

    def end(self, req: SimRequest, outcome: str, t: float, output_tokens: int) -> None:
        self.recorder.end(req, outcome, t, output_tokens)

    def leak_check(self) -> None:
        busy = {i: n for i, n in self.open_streams.items() if n}
        waiting = {n: len(sc.state.waiting) for n, sc in self.scenarios.items()
                   if sc.state.waiting}
        if busy or waiting:
            raise AssertionError(f"gateway: open streams {busy}, waiting lines {waiting}")
