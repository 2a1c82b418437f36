"""The decode role: queues hand-offs, retrieves their KV whenever blocks can be reserved, runs
them with continuous batching and streams the remaining deltas to whoever attaches.

Lifecycle of one hand-off (who frees what):
1. `accept()` validates it and queues it with a `_Stream` (buffered events, attach deadline);
2. the retrieval loop reserves blocks for the queue head (`reserve_handoff`; None means wait for
   a finished request) and starts `_retrieve`, which takes a free staging buffer (waiting
   while all `pd.decode_staging_buffers` are in use), reads the KV into it on a worker thread,
   so running decode steps never wait on the network, then scatters it into the reserved
   blocks with one short call on the engine thread (runners are not thread-safe);
3. fetched: prefill is told (HandoffDone ok) and frees its slot; `add_prefilled` turns the
   reservation into a running request whose outputs are buffered as `delta` events;
4. the request ends by finishing, by its consumer leaving, by `abort()`, or because nobody
   attached within `attach_timeout_s`: the engine frees its blocks (abort or finish).
A layer-wise hand-off (`source.layerwise`) arrives before its prefill runs: step 2 polls the
prefill's progress trailer and reads layers as they are staged (KVReceiver.read_layerwise),
takes the first token from it, and restarts the attach clock once fetched; if the prefill ended
it (failed, or finished at its first token) the reservation is cancelled, HandoffDone ok=false
is sent and the stream is dropped without an event (prefill told the client).
A failed fetch cancels the reservation, reports HandoffDone ok=false and ends the stream with an
`error` event. Prefill hears HandoffDone exactly once per accepted hand-off. While draining,
`accept()` answers 429 `draining` (prefill offers the hand-off to another peer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from functools import partial
from typing import Any

import httpx

from pd_serve.api.errors import APIError
from pd_serve.config import PDConfig
from pd_serve.engine.outputs import RequestOutput
from pd_serve.instance.messages import (
    ErrorEvent,
    HandoffDone,
    HandoffRequest,
    delta_event,
    sse,
)
from pd_serve.instance.metrics import DecodeEvents
from pd_serve.instance.runtime import Runtime, source_from_json
from pd_serve.kv.receiver import HandoffAborted

log = logging.getLogger(__name__)


class _Stream:
    """Buffered events of one hand-off until (and while) a consumer is attached."""

    def __init__(self, deadline: float) -> None:
        self.events: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()  # (sse text, terminal)
        self.deadline = deadline
        self.arrived = time.monotonic()
        self.attached = False
        self.cancelled = False
        self.pump: asyncio.Task[None] | None = None

    def put(self, text: str, terminal: bool = False) -> None:
        self.events.put_nowait((text, terminal))

    def fail(self, message: str, code: str) -> None:
        self.put(sse("error", ErrorEvent(message=message, code=code)), terminal=True)


class DecodeRole:
    def __init__(self, rt: Runtime, pd: PDConfig) -> None:
        self.rt = rt
        self.pd = pd
        self._queue: deque[tuple[HandoffRequest, Any]] = deque()
        self._streams: dict[str, _Stream] = {}
        self._fetching = 0
        # staging buffers of the receiver not in use: a fetch takes one for its read and the
        # scatter out of it (filled in `start`, on the running loop)
        self._staging: asyncio.Queue[int] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http = httpx.AsyncClient(timeout=10.0)
        self.failed = 0
        self.events = DecodeEvents()
        self.draining = False

    def start(self) -> None:
        for i in range(getattr(self.rt.receiver, "num_staging", 1)):
            self._staging.put_nowait(i)
        self._spawn(self._retrieval_loop())
        self._spawn(self._sweep())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._http.aclose()

    def accept(self, msg: HandoffRequest) -> int:
        """Queues a hand-off; 400 on a bad one, 409 on a request id in use, 429 while draining.
        Queue length."""
        if self.draining:
            raise APIError(429, "this decode instance is draining", type="server_error",
                           code="draining")
        if msg.request_id in self._streams:
            raise APIError(409, f"request {msg.request_id!r} is already here", code="conflict")
        try:
            msg.sampling.params()
            source = source_from_json(msg.source)
            if msg.first_token_id < 0 and not source.layerwise:
                raise ValueError(f"first_token_id {msg.first_token_id} is only allowed (as -1) "
                                 f"for a layer-wise source")
        except ValueError as exc:
            raise APIError(400, f"bad hand-off: {exc}", code="invalid_handoff") from exc
        self._streams[msg.request_id] = _Stream(time.monotonic() + self.pd.attach_timeout_s)
        self._queue.append((msg, source))
        self._wake.set()
        return len(self._queue)

    async def _retrieval_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
            except TimeoutError:
                pass
            self._wake.clear()
            while self._queue:
                msg, source = self._queue[0]
                rid, n = msg.request_id, len(msg.prompt_token_ids)
                try:
                    table = await self.rt.engine.call(partial(_reserve, rid=rid, n=n))
                except Exception as exc:  # noqa: BLE001 - can never fit, or engine down
                    if self._still_head(msg):
                        self._queue.popleft()
                        self.events.handoff_failed("reserve_failed")
                        await self._fail(msg, f"cannot reserve KV blocks: {exc}")
                    continue
                if not self._still_head(msg):  # aborted while we reserved: undo, go on
                    if table is not None:
                        await self._cancel_reservation(rid)
                    continue
                if table is None:
                    break  # a finishing request wakes us
                self._queue.popleft()
                self._fetching += 1
                self._spawn(self._retrieve(msg, source, table))

    def _read(self, msg: HandoffRequest, source: Any, table: Any,
              staging: int) -> tuple[Any, int]:
        """Worker thread: the request's K/V (a view of staging buffer `staging`) and its first
        token."""
        receiver, timeout = self.rt.receiver, self.pd.fetch_timeout_s
        if source.layerwise:
            return receiver.read_layerwise(source, table, timeout, staging)
        return (receiver.read(source, table, self.pd.handoff_mode, timeout, staging),
                msg.first_token_id)

    def _still_head(self, msg: HandoffRequest) -> bool:
        """`abort` may remove the queue's head while the loop awaits the engine; popping
        blindly then dropped the *next* hand-off (never answered, its prefill slot held)."""
        return bool(self._queue) and self._queue[0][0] is msg

    async def _retrieve(self, msg: HandoffRequest, source: Any, table: Any) -> None:
        rid = msg.request_id
        try:
            if self.pd.fetch_delay_s:  # fault-injection tests: a hand-off that stays pending
                await asyncio.sleep(self.pd.fetch_delay_s)
            staging = await self._staging.get()  # fetches beyond the buffers take turns
            try:
                kv, first = await asyncio.to_thread(self._read, msg, source, table, staging)
                # RecvScatter on the engine thread: runners are not thread-safe, and `kv` is a
                # view of the staging buffer, so the write finishes before it is given back.
                runner = self.rt.runner
                await self.rt.engine.call(lambda _e: runner.write_kv(table, kv))
            finally:
                self._staging.put_nowait(staging)
        except HandoffAborted as exc:  # layer-wise: prefill ended it and told its client
            await self._cancel_reservation(rid)
            self._streams.pop(rid, None)  # nobody will attach
            await self._done(msg, False, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - HandoffError and transport failures
            await self._cancel_reservation(rid)
            self.events.handoff_failed("fetch_failed")
            await self._fail(msg, f"KV fetch failed: {exc}")
            return
        finally:
            self._fetching -= 1
        arrived = self._streams[rid].arrived if rid in self._streams else None
        self.events.handoff_done(source.layout.total_bytes, arrived)
        # prefill frees its slot on this; the first decode step need not wait for the round trip
        self._spawn(self._done(msg, True, None))
        stream = self._streams.get(rid)
        if stream is None or stream.cancelled:
            await self._cancel_reservation(rid)
            self._wake.set()
            return
        if source.layerwise:  # the attach clock starts now, not before the prefill ran
            stream.deadline = time.monotonic() + self.pd.attach_timeout_s
        params, prompt = msg.sampling.params(), list(msg.prompt_token_ids)
        outputs = self.rt.engine.stream(
            rid, lambda e: _adopt(e, rid, prompt, first, params, table))
        stream.pump = asyncio.current_task()
        await self._pump(rid, stream, outputs)

    async def _pump(self, rid: str, stream: _Stream, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in outputs:
                self.events.decode_tokens += len(out.new_token_ids)
                stream.put(sse("delta", delta_event(out)), terminal=out.finished)
        except asyncio.CancelledError:
            stream.fail("the request was cancelled", "cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - the engine failed the request
            stream.fail(f"decode failed: {exc}", "decode_failed")
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]
            self._wake.set()

    async def attach(self, rid: str) -> AsyncIterator[str]:
        """SSE body for GET /internal/stream/{rid}; 404 unknown, 409 already attached."""
        stream = self._streams.get(rid)
        if stream is None:
            raise APIError(404, f"no hand-off {rid!r} on this instance", code="not_found")
        if stream.attached:
            raise APIError(409, f"request {rid!r} already has a consumer", code="conflict")
        stream.attached = True
        return self._relay(rid, stream)

    async def _relay(self, rid: str, stream: _Stream) -> AsyncIterator[str]:
        terminal = False
        try:
            while not terminal:
                text, terminal = await stream.events.get()
                yield text
        finally:
            if not terminal:
                self.abort(rid)
            self._streams.pop(rid, None)

    def abort(self, rid: str) -> bool:
        """Ends the request wherever it is (queued, fetching, running); its blocks are freed."""
        stream = self._streams.pop(rid, None)
        if stream is None:
            return False
        stream.cancelled = True
        for i, (msg, _) in enumerate(self._queue):
            if msg.request_id == rid:
                del self._queue[i]
                self._spawn(self._done(msg, False, "aborted before retrieval"))
                break
        if stream.pump is not None:
            stream.pump.cancel()
        return True

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for rid, stream in list(self._streams.items()):
                if not stream.attached and stream.deadline <= now:
                    log.warning("nobody attached to %s within %.0f s; aborted", rid,
                                self.pd.attach_timeout_s)
                    self.abort(rid)

    async def _fail(self, msg: HandoffRequest, error: str) -> None:
        self.failed += 1
        log.warning("hand-off %s failed: %s", msg.request_id, error)
        stream = self._streams.get(msg.request_id)
        if stream is not None:
            stream.fail(error, "handoff_failed")
        await self._done(msg, False, error)

    async def _cancel_reservation(self, rid: str) -> None:
        try:
            await self.rt.engine.call(lambda e: e.cancel_reservation(rid))
        except Exception:
            log.exception("cancel_reservation(%s) failed", rid)

    async def _done(self, msg: HandoffRequest, ok: bool, error: str | None) -> None:
        body = HandoffDone(request_id=msg.request_id, ok=ok, error=error).model_dump_json()
        try:
            await self._http.post(f"{msg.prefill_url}/internal/handoff_done", content=body,
                                  headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:  # prefill frees the slot at its timeout anyway
            log.warning("HandoffDone for %s not delivered: %s", msg.request_id, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def idle(self) -> bool:
        """No hand-off queued or being fetched and no stream open."""
        return not (self._queue or self._fetching or self._streams)

    async def stats(self) -> dict[str, Any]:
        leak = self.rt.engine.stats().get("leak_check", "not run")
        check = getattr(self.rt.receiver, "leak_check", None)
        if callable(check) and not self._fetching:
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - reported
                leak = f"{type(exc).__name__}: {exc}"
        return {"waiting_handoffs": len(self._queue), "fetching": self._fetching,
                "streams": len(self._streams), "failed_handoffs": self.failed,
                "kv_leak_check": leak}


def _reserve(engine: Any, rid: str, n: int) -> list[int] | None:
    return engine.reserve_handoff(rid, n)


def _adopt(engine: Any, rid: str, prompt: list[int], first: int, params: Any,
           table: Any) -> None:
    """Engine thread: reservation -> running request; a refused one frees its reservation."""
    try:
        engine.add_prefilled(rid, prompt, first, params, table)
    except ValueError:
        engine.cancel_reservation(rid)
        raise


