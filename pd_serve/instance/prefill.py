"""The prefill role: admission by `b_p` slots (optionally behind a local FIFO, the baseline),
TTFT deadline checked before and after prefill, first token streamed at once, KV staged into the
slot's buffer, hand-off offered to a decode peer, slot held until decode confirms. As the
`aggregated` role (the baseline at equal hardware) the same instance decodes too: `delta` events
follow `first` on the same stream and the slot is held until the request finishes.

Lifecycle of one request (who frees what):
1. `offer()` decides (`decide_offer`, pure): 429 `draining` | `no_free_slot` | `queue_full`
   (nothing allocated); an SSE body that only says `deadline_exceeded` (budget gone on arrival;
   nothing allocated); a slot now; or a place in the FIFO (`SlotQueue`), where the request
   waits silently for a freed slot and ends `deadline_exceeded` if its budget runs out first;
2. `run()` streams `first` (`late` when the budget ran out during prefill; with `refine`, the
   kept prompt positions, scored by the engine right after the prefill); a finished request
   frees its blocks in the engine and the slot here;
3. otherwise the parked request's blocks are staged into the slot's buffer (KVSender) and
   released in the engine at once (`release_handoff`); the buffer and slot stay held;
4. decode accepts the hand-off (`handoff` event, stream ends) and later POSTs HandoffDone, or the
   decode peer is declared dead by the PeerWatch probes, or the hand-off timeout passes: then
   `sender.release(slot)` and the slot returns to the pool.
A decode peer that refuses the hand-off (no connection, any non-202) is skipped for the next one;
dead peers are not offered hand-offs until they answer /health again.
Any failure or client disconnect before step 4 frees blocks, buffer and slot the same way.
Frees are ordered behind the stage by running them as engine-thread calls. A freed slot goes
to the head of the FIFO at once. Draining: new offers get 429 `draining`; queued, running and
handed-off work finishes; `idle` says when nothing is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx

from pd_serve.api.errors import APIError
from pd_serve.config import PDConfig
from pd_serve.engine.async_engine import EngineError
from pd_serve.engine.outputs import RequestOutput
from pd_serve.instance.admission import (
    REJECTIONS,
    decide_offer,
    past_deadline,
    rank_decode_peers,
)
from pd_serve.instance.messages import (
    ErrorEvent,
    HandoffDone,
    HandoffEvent,
    HandoffRequest,
    PrefillRequest,
    delta_event,
    first_event,
    sse,
)
from pd_serve.instance.metrics import PrefillEvents
from pd_serve.instance.peer_watch import PeerWatch
from pd_serve.instance.prefill_layerwise import run_layerwise
from pd_serve.instance.prefill_queue import SlotQueue, Ticket, Waiter
from pd_serve.instance.runtime import Runtime, source_to_json

log = logging.getLogger(__name__)
_REFUSALS = {"draining": "this prefill instance is draining",
             "no_decode_peer": "this prefill instance has no live decode peer",
             "no_free_slot": "all {b_p} prefill slots are busy",
             "queue_full": "all {b_p} prefill slots are busy and {q} requests are queued"}


@dataclass
class _Pending:
    slot: int
    peer: str
    deadline: float


class PrefillRole:
    def __init__(self, rt: Runtime, pd: PDConfig, self_url: str, peers: list[str],
                 aggregated: bool = False) -> None:
        self.rt = rt
        self.aggregated = aggregated  # decode here too: deltas on the same stream, no hand-off
        self.pd = pd
        self.self_url = self_url
        self.peers = list(peers)
        self.queue = SlotQueue(pd.b_p, pd.prefill_queue_max)
        self.slots = self.queue.slots
        self.draining = False
        self.in_flight: dict[str, int] = {}
        self._rotation = 0  # where rank_decode_peers starts breaking ties
        self._pending: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http = httpx.AsyncClient(timeout=10.0)
        self._sweeper: asyncio.Task[None] | None = None
        self.rejected = dict.fromkeys(REJECTIONS, 0)
        self.events = PrefillEvents()
        self.deadline_exceeded = 0
        self.late = 0
        self.timed_out = 0
        self.lost_to_dead_peers = 0
        self.watch = PeerWatch(pd, lambda: {p.peer for p in self._pending.values()},
                               self._peer_lost)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self.watch.start()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.watch.stop()
        await self._http.aclose()

    def set_peers(self, peers: list[str]) -> None:
        self.peers = list(peers)
        self.watch.health.forget([*peers, *(p.peer for p in self._pending.values())])

    def offer(self, req: PrefillRequest,
              arrived: float) -> tuple[AsyncIterator[str], Ticket]:
        """429 APIError, or the SSE body of the offered request (`arrived`: time.monotonic())
        and the Ticket the caller must `abandon()` once the response is over."""
        if req.refine is not None and not self.rt.runner.supports_importance:
            raise APIError(400, f"prompt refinement is unavailable: the "
                           f"{type(self.rt.runner).__name__} backend cannot score prompt "
                           f"tokens (send refine_ratio 1)", param="refine",
                           code="refine_unsupported")
        deadline = None if req.deadline_s is None else arrived + req.deadline_s
        verdict = decide_offer(free_slots=self.slots.free, queued=self.queue.queued,
                               queue_max=self.queue.queue_max, wants_queue=req.queue,
                               draining=self.draining,
                               expired=past_deadline(deadline, time.monotonic()),
                               has_decode=self.aggregated or bool(self.watch.alive(self.peers)))
        if verdict in REJECTIONS:
            self.rejected[verdict] += 1
            raise APIError(429, _REFUSALS[verdict].format(b_p=self.slots.size,
                                                          q=self.queue.queued),
                           type="server_error", code=verdict)
        if verdict == "deadline_exceeded":
            return self._expired(req), Ticket()
        if verdict == "start":
            slot = self.queue.acquire()
            ticket = Ticket(lambda: self._spawn(self.free_slot(slot, None)))
            return self.run(req, slot, deadline, ticket), ticket
        waiter = self.queue.push(deadline)
        ticket = Ticket(lambda: self.queue.abandon(waiter))
        return self._queued(req, waiter, deadline, ticket), ticket

    async def _queued(self, req: PrefillRequest, waiter: Waiter, deadline: float | None,
                      ticket: Ticket) -> AsyncIterator[str]:
        """Silent until a slot comes up, then the request's run; or `deadline_exceeded`."""
        ticket.claim()  # from here `wait` gives the place (or a handed slot) back itself
        slot = await self.queue.wait(waiter)
        body = self._expired(req) if slot is None else self.run(req, slot, deadline)
        async with aclosing(body):
            async for event in body:
                yield event

    async def _expired(self, req: PrefillRequest) -> AsyncGenerator[str, None]:
        self.deadline_exceeded += 1
        yield sse("error", ErrorEvent(
            message=f"the TTFT budget of {req.request_id} ran out before its prefill started",
            code="deadline_exceeded"))

    async def run(self, req: PrefillRequest, slot: int, deadline: float | None = None,
                  ticket: Ticket | None = None) -> AsyncGenerator[str, None]:
        """SSE body of one request holding `slot`; frees what it holds unless decode took over."""
        if ticket is not None:
            ticket.claim()  # no await until the `try` below, whose `finally` frees the slot
        if self.pd.handoff_layerwise and not self.aggregated:
            body = run_layerwise(self, req, slot, deadline)
            async with aclosing(body):
                async for event in body:
                    yield event
            return
        rid, params = req.request_id, req.sampling.params()
        started = time.monotonic()
        prompt = list(req.prompt_token_ids)
        last_q = req.refine.last_q if req.refine is not None else 0
        outputs = self.rt.engine.stream(rid, lambda e: e.add_request(
            rid, prompt, params, prefill_only=not self.aggregated, importance_q=last_q))
        parked = handed = False
        try:
            first, event = await self.first_output(outputs, started, deadline, req)
            yield event
            if first is None or first.finished:
                return
            if self.aggregated:
                async for out in outputs:
                    yield sse("delta", delta_event(out))
                return
            parked = True
            try:
                source = await self.rt.engine.call(lambda e: self._stage(e, slot, rid))
                parked = False
                peer = await self.offer_handoff(req, first.new_token_ids[0], source)
            except Exception as exc:  # noqa: BLE001 - becomes the stream's error event
                log.warning("hand-off of %s failed: %s", rid, exc)
                self.events.handoff_failed("stage_failed" if parked else "not_accepted")
                yield sse("error", ErrorEvent(message=f"hand-off failed: {exc}",
                                              code="handoff_failed"))
                return
            self.hold_for_decode(rid, slot, peer)
            handed = True
            yield sse("handoff", HandoffEvent(decode_url=peer, request_id=rid))
        finally:
            await outputs.aclose()
            if not handed:
                self._spawn(self.free_slot(slot, rid if parked else None))

    async def first_output(self, outputs: AsyncIterator[RequestOutput], started: float,
                           deadline: float | None, req: PrefillRequest,
                           ) -> tuple[RequestOutput | None, str]:
        """The request's first output and its `first` SSE event (timed, checked against the
        deadline), or None and a `prefill_failed` error event."""
        try:
            first = await outputs.__anext__()
        except (ValueError, EngineError) as exc:
            return None, sse("error", ErrorEvent(message=str(exc), code="prefill_failed"))
        self.events.prefill_seconds.observe(time.monotonic() - started)
        late = past_deadline(deadline, time.monotonic())
        self.late += late
        return first, sse("first", first_event(first, late, req))

    def _stage(self, engine: Any, slot: int, rid: str) -> Any:
        """Engine thread: copies the parked request's KV into the slot buffer, frees its blocks."""
        table, num_tokens = engine.handoff_blocks(rid)
        try:
            return self.rt.sender.stage(slot, self.rt.runner, table, num_tokens, rid)
        finally:
            engine.release_handoff(rid)

    def hold_for_decode(self, rid: str, slot: int, peer: str) -> None:
        """`peer` took the hand-off: the slot is freed by its HandoffDone, its death or the
        hand-off timeout, whichever comes first."""
        self._pending[rid] = _Pending(slot, peer, time.monotonic() + self.pd.handoff_timeout_s)

    async def offer_handoff(self, req: PrefillRequest, first_token_id: int, source: Any) -> str:
        """POSTs the hand-off to the least busy decode peer that accepts it; its URL
        (`first_token_id` -1: layer-wise, decode reads it from the progress trailer)."""
        body = HandoffRequest(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
            first_token_id=first_token_id, sampling=req.sampling,
            source=source_to_json(source), prefill_url=self.self_url).model_dump_json()
        reasons = [f"{peer}: dead" for peer in self.watch.health.dead() if peer in self.peers]
        start, self._rotation = self._rotation, self._rotation + 1
        for peer in rank_decode_peers(self.watch.alive(self.peers), self.in_flight, start):
            try:
                r = await self._http.post(f"{peer}/internal/handoff", content=body,
                                          headers={"content-type": "application/json"})
            except httpx.HTTPError as exc:
                self.watch.failed(peer)
                reasons.append(f"{peer}: {type(exc).__name__}")
                continue
            if r.status_code == 202:
                self.in_flight[peer] = self.in_flight.get(peer, 0) + 1
                return peer
            reasons.append(f"{peer}: HTTP {r.status_code} {r.text[:200]}")
        raise RuntimeError("no decode instance took the hand-off"
                           + (f" ({'; '.join(reasons)})" if reasons else " (no decode peers)"))

    def handoff_done(self, msg: HandoffDone) -> bool:
        pending = self._pending.pop(msg.request_id, None)
        if pending is None:
            return False
        if not msg.ok:
            log.warning("decode reported hand-off %s failed: %s", msg.request_id, msg.error)
        self._settle(msg.request_id, pending)
        return True

    def _settle(self, rid: str, pending: _Pending) -> None:
        self.in_flight[pending.peer] = max(0, self.in_flight.get(pending.peer, 0) - 1)
        self._spawn(self.free_slot(pending.slot, None))

    def _peer_lost(self, peer: str) -> None:
        """The watch declared `peer` dead: every slot handed to it is freed now."""
        lost = [rid for rid, pending in self._pending.items() if pending.peer == peer]
        for rid in lost:
            self._settle(rid, self._pending.pop(rid))
        self.lost_to_dead_peers += len(lost)
        if lost:
            log.warning("decode peer %s died with %d hand-off(s) pending; their slots are freed: "
                        "%s", peer, len(lost), ", ".join(lost))

    async def free_slot(self, slot: int, parked_rid: str | None) -> None:
        """Engine thread: releases the parked request's blocks (if any) and the slot buffer;
        then the slot returns to the pool."""
        def release(engine: Any) -> None:
            if parked_rid is not None:
                engine.release_handoff(parked_rid)
            self.rt.sender.release(slot)

        try:
            await self.rt.engine.call(release)
        except Exception:
            log.exception("freeing slot %d failed", slot)
        self.queue.release(slot)

    @property
    def idle(self) -> bool:
        """Nothing queued, running, handed off or being freed."""
        return not (self.slots.busy or self.queue.queued or self._pending or self._tasks)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for rid, pending in list(self._pending.items()):
                if pending.deadline <= now:
                    del self._pending[rid]
                    self.timed_out += 1
                    log.warning("hand-off %s to %s not confirmed within %.0f s; slot %d freed",
                                rid, pending.peer, self.pd.handoff_timeout_s, pending.slot)
                    self._settle(rid, pending)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stats(self) -> dict[str, Any]:
        leak = "busy"
        if self.slots.busy == 0 and not self._tasks:
            try:
                sender = self.rt.sender  # None as the aggregated role: no slot buffers
                await self.rt.engine.call(lambda e: sender and sender.leak_check())
                leak = "ok"
            except Exception as exc:  # noqa: BLE001 - reported
                leak = f"{type(exc).__name__}: {exc}"
        return {"slots_busy": self.slots.busy, "slots_total": self.slots.size,
                "queued": self.queue.queued, "queue_max": self.queue.queue_max,
                "waiting_handoffs": len(self._pending), "decode_peers": self.peers,
                "rejected": sum(self.rejected.values()), "rejected_by_code": self.rejected,
                "deadline_exceeded": self.deadline_exceeded, "late_first_tokens": self.late,
                "handoff_timeouts": self.timed_out,
                "dead_decode_peers": self.watch.health.dead(),
                "handoffs_lost_to_dead_peers": self.lost_to_dead_peers,
                "kv_leak_check": leak}
