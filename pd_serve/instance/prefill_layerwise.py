"""The prefill role's layer-wise hand-off (`pd.handoff_layerwise`): decode is engaged while the
prefill runs and reads each layer's K/V while the following layers compute.

Lifecycle of one request (who frees what), replacing steps 2-3 of `prefill.py`'s:
1. the slot is claimed layer-wise (`KVSender.begin_layerwise`: progress trailer RUNNING); the
   hand-off offer to a decode peer goes out concurrently with the prefill, so its round trip
   stays off the TTFT;
2. once a peer accepted, the slot is freed only as for any handed-off slot: decode's HandoffDone
   (ok or not), the peer declared dead, or the hand-off timeout. If no peer accepts, the request
   ends with `handoff_failed` after its first token and the slot is freed here. Every staging
   call names the request, so a slot freed early (dead peer) and claimed again is never
   written by this request's later layers (they fail, and so does its hand-off);
3. the prefill runs with a per-layer hook that stages each layer into the slot (engine thread);
4. `first` is streamed; a finished request marks the trailer FINISHED, a failure FAILED (decode
   sees it, cancels its reservation and answers HandoffDone); otherwise the first token is
   published, the trailer says DONE, the parked blocks are released and `handoff` is streamed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from pd_serve.instance.messages import (
    ErrorEvent,
    HandoffEvent,
    PrefillRequest,
    sse,
)

if TYPE_CHECKING:
    from pd_serve.instance.prefill import PrefillRole

log = logging.getLogger(__name__)


class _Offer:
    """The hand-off offer running beside the prefill; `placed()` settles it exactly once."""

    def __init__(self, role: PrefillRole, req: PrefillRequest, slot: int, source: Any) -> None:
        self.role, self.rid, self.slot = role, req.request_id, slot
        self.task = asyncio.ensure_future(role.offer_handoff(req, -1, source))
        self.peer: str | None = None
        self.error: str | None = None

    async def placed(self) -> str | None:
        """The peer that took the hand-off (now holding the slot), or None (error set)."""
        if self.peer is None and self.error is None:
            try:  # shielded: a cancelled caller must not cancel an offer decode may accept
                self.peer = await asyncio.shield(self.task)
            except Exception as exc:  # noqa: BLE001 - reported as the request's error
                self.error = str(exc)
                log.warning("layer-wise hand-off of %s not placed: %s", self.rid, exc)
                self.role.events.handoff_failed("not_accepted")
            else:
                self.role.hold_for_decode(self.rid, self.slot, self.peer)
        return self.peer


async def run_layerwise(role: PrefillRole, req: PrefillRequest, slot: int,
                        deadline: float | None) -> AsyncGenerator[str, None]:
    """SSE body of one request holding `slot` (see the module docstring)."""
    rid, sender, engine = req.request_id, role.rt.sender, role.rt.engine
    prompt = list(req.prompt_token_ids)
    try:
        source = await engine.call(lambda _e: sender.begin_layerwise(slot, len(prompt), rid))
    except Exception as exc:  # noqa: BLE001 - a prompt the slot cannot hold, engine down
        await role.free_slot(slot, None)
        yield sse("error", ErrorEvent(message=str(exc), code="prefill_failed"))
        return
    offer, runner = _Offer(role, req, slot, source), role.rt.runner

    def stage(layer: int, table: list[int], _num_tokens: int) -> None:
        sender.stage_layer(slot, rid, runner, table, layer)

    started, last_q = time.monotonic(), req.refine.last_q if req.refine is not None else 0
    outputs = engine.stream(rid, lambda e: e.add_request(
        rid, prompt, req.sampling.params(), prefill_only=True, importance_q=last_q,
        on_layer=stage))
    parked = published = finished = False
    try:
        first, event = await role.first_output(outputs, started, deadline, req)
        if first is not None:
            finished, parked = first.finished, not first.finished
        yield event
        peer = await offer.placed()
        if first is None or finished:
            return
        if peer is None:
            yield sse("error", ErrorEvent(message=f"hand-off failed: {offer.error}",
                                          code="handoff_failed"))
            return
        try:
            await engine.call(lambda e: _publish(e, sender, slot, rid, first.new_token_ids[0]))
            parked, published = False, True
        except Exception as exc:  # noqa: BLE001 - a layer was not staged
            log.warning("layer-wise hand-off of %s failed: %s", rid, exc)
            role.events.handoff_failed("stage_failed")
            yield sse("error", ErrorEvent(message=f"hand-off failed: {exc}",
                                          code="handoff_failed"))
            return
        yield sse("handoff", HandoffEvent(decode_url=peer, request_id=rid))
    finally:
        await outputs.aclose()
        await _settle(role, offer, published, parked, finished)


async def _settle(role: PrefillRole, offer: _Offer, published: bool, parked: bool,
                  finished: bool) -> None:
    """After the stream: unless published, the reader is told (FINISHED or FAILED) and the
    parked blocks go; the slot is freed here only if no decode peer holds it."""
    peer = await offer.placed()
    rid, slot, sender = offer.rid, offer.slot, role.rt.sender
    if published:
        return
    try:
        await role.rt.engine.call(lambda e: _give_up(e, sender, slot, rid, parked, finished))
    except Exception:  # a held slot is still freed by HandoffDone, peer loss or timeout
        log.exception("ending the layer-wise hand-off of %s failed", rid)
    if peer is None:
        await role.free_slot(slot, None)


def _publish(engine: Any, sender: Any, slot: int, rid: str, first_token: int) -> None:
    """Engine thread: every layer is staged during the prefill; DONE, then the blocks go."""
    try:
        sender.finish_layerwise(slot, rid, first_token)
    finally:
        engine.release_handoff(rid)


def _give_up(engine: Any, sender: Any, slot: int, rid: str, parked: bool,
             finished: bool) -> None:
    """Engine thread: tells the reader (FINISHED or FAILED); the slot waits for HandoffDone."""
    if parked:
        engine.release_handoff(rid)
    sender.abort_layerwise(slot, rid, finished)
