"""The prefill role's layer-wise hand-off (`pd.handoff_layerwise`): decode is engaged before
the prefill runs and reads each layer's K/V while the following layers compute.

Lifecycle of one request (who frees what), replacing steps 2-3 of `prefill.py`'s:
1. the slot is claimed layer-wise (`KVSender.begin_layerwise`: progress trailer RUNNING) and the
   hand-off is offered at once; no decode peer taking it ends the request (`handoff_failed`)
   and frees the slot here;
2. from the accepted offer on, the slot is freed only as for any handed-off slot: decode's
   HandoffDone (ok or not), the peer declared dead, or the hand-off timeout;
3. the prefill runs with a per-layer hook that stages each layer into the slot (engine thread);
4. `first` is streamed; a finished request marks the trailer FINISHED, a failure FAILED (decode
   sees it, cancels its reservation and answers HandoffDone); otherwise the first token is
   published, the trailer says DONE, the parked blocks are released and `handoff` is streamed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from pd_serve.engine.async_engine import EngineError
from pd_serve.instance.admission import past_deadline
from pd_serve.instance.messages import (
    ErrorEvent,
    HandoffEvent,
    PrefillRequest,
    first_event,
    sse,
)

if TYPE_CHECKING:
    from pd_serve.instance.prefill import PrefillRole

log = logging.getLogger(__name__)


async def run_layerwise(role: PrefillRole, req: PrefillRequest, slot: int,
                        deadline: float | None) -> AsyncGenerator[str, None]:
    """SSE body of one request holding `slot` (see the module docstring)."""
    rid, sender, engine = req.request_id, role.rt.sender, role.rt.engine
    prompt = list(req.prompt_token_ids)
    try:
        source = await engine.call(lambda _e: sender.begin_layerwise(slot, len(prompt), rid))
        peer = await role.offer_handoff(req, -1, source)
    except Exception as exc:  # noqa: BLE001 - becomes the stream's error event
        log.warning("layer-wise hand-off of %s not placed: %s", rid, exc)
        role.events.handoff_failed("not_accepted")
        await role.free_slot(slot, None)
        yield sse("error", ErrorEvent(message=f"hand-off failed: {exc}", code="handoff_failed"))
        return
    role.hold_for_decode(rid, slot, peer)
    runner = role.rt.runner

    def stage(layer: int, table: list[int], _num_tokens: int) -> None:
        sender.stage_layer(slot, runner, table, layer)

    started, last_q = time.monotonic(), req.refine.last_q if req.refine is not None else 0
    outputs = engine.stream(rid, lambda e: e.add_request(
        rid, prompt, req.sampling.params(), prefill_only=True, importance_q=last_q,
        on_layer=stage))
    parked = published = finished = False
    try:
        try:
            first = await outputs.__anext__()
        except (ValueError, EngineError) as exc:
            yield sse("error", ErrorEvent(message=str(exc), code="prefill_failed"))
            return
        role.events.prefill_seconds.observe(time.monotonic() - started)
        late = past_deadline(deadline, time.monotonic())
        role.late += late
        finished, parked = first.finished, not first.finished
        yield sse("first", first_event(first, late, req))
        if finished:
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
        if not published:
            await engine.call(lambda e: _give_up(e, sender, slot, rid, parked, finished))


def _publish(engine: Any, sender: Any, slot: int, rid: str, first_token: int) -> None:
    """Engine thread: every layer is staged during the prefill; DONE, then the blocks go."""
    try:
        sender.finish_layerwise(slot, first_token)
    finally:
        engine.release_handoff(rid)


def _give_up(engine: Any, sender: Any, slot: int, rid: str, parked: bool,
             finished: bool) -> None:
    """Engine thread: tells the reader (FINISHED or FAILED); the slot waits for HandoffDone."""
    if parked:
        engine.release_handoff(rid)
    sender.abort_layerwise(slot, finished)
