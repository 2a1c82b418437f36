"""One request run remotely: the prefill instance's `first` event, then the decode instance's
deltas, as the RequestOutputs the API's response shapers (pd_serve.api.generation) consume.

Lifecycle:
1. `admit_remote()` forwards the request (Forwarder.open) and waits for `first`; a termination
   or bad input is still a clean HTTP error;
2. iterating `RemoteRest` reads the `handoff` event, closes the prefill stream, attaches to the
   decode stream and yields one output per delta (text deltas from the cumulative text); when an
   instance fails after the first token the request ends with a clear error, or, with
   `gateway.failure_text` configured, with that text as its last delta;
3. `aclose()` (client gone, error, or done) closes both streams, which aborts the request on
   whichever instance holds it, and asks decode to abort a hand-off not yet attached to, then
   ends the request's timeline (finished, failed or cancelled) and hands it to `on_end`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from pd_serve.api import generation as gen
from pd_serve.api.errors import SERVER_ERROR, APIError
from pd_serve.api.prepare import Prepared
from pd_serve.engine.outputs import FinishReason, RequestOutput
from pd_serve.gateway.forward import Forwarder, PrefillStream
from pd_serve.gateway.scenarios import Scenario
from pd_serve.gateway.sse import events
from pd_serve.gateway.timeline import CANCELLED, FAILED, OK, TERMINATED, Timeline
from pd_serve.instance.messages import (
    AbortRequest,
    DeltaEvent,
    FirstEvent,
    HandoffEvent,
    PrefillRequest,
    SamplingWire,
)

log = logging.getLogger(__name__)
DEADLINE = "ttft_deadline_exceeded"


async def admit_remote(fwd: Forwarder, sc: Scenario, request_id: str, model: str,
                       prep: Prepared, tl: Timeline, on_end: Callable[[Timeline], None],
                       failure_text: str | None = None) -> gen.Run:
    body = PrefillRequest(request_id=request_id, prompt_token_ids=prep.prompt_token_ids,
                          sampling=SamplingWire.of(prep.params)).model_dump(mode="json")
    prefill = await fwd.open(sc, body, tl)
    rest = RemoteRest(fwd, request_id, prefill, tl, on_end, failure_text)
    try:
        first = FirstEvent.model_validate(await rest.expect("first"))
    except BaseException:
        await rest.aclose()
        raise
    tl.token(time.monotonic(), 1)
    rest.first = first
    out = RequestOutput(request_id, [first.token_id], first.text, first.text, first.finished,
                        _reason(first.finish_reason), first.prompt_tokens, 1, first.cached_tokens)
    return gen.Run(request_id, model, out, rest)


class RemoteRest:
    """Async iterator over the outputs after the first; `aclose()` releases everything."""

    def __init__(self, fwd: Forwarder, request_id: str, prefill: PrefillStream, tl: Timeline,
                 on_end: Callable[[Timeline], None], failure_text: str | None = None) -> None:
        self.fwd = fwd
        self.timeline = tl
        self.on_end = on_end
        self.error: str | None = None
        self.error_code: str | None = None
        self.request_id = request_id
        self.prefill: PrefillStream | None = prefill
        self.prefill_events = events(prefill.response)
        self.first: FirstEvent | None = None
        self.decode_url: str | None = None
        self.decode: httpx.Response | None = None
        self.finished = False
        self.failure_text = failure_text
        self._substituted = False
        self._last: RequestOutput | None = None
        self._gen: AsyncIterator[RequestOutput] | None = None

    def __aiter__(self) -> RemoteRest:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._gen is None:
            self._gen = self._outputs()
        if self._substituted:
            raise StopAsyncIteration
        try:
            out = await self._gen.__anext__()
        except APIError as exc:
            self.error = exc.message
            if self.failure_text is not None:
                return self._substitute()
            raise
        except httpx.HTTPError as exc:
            self.error = repr(exc)
            if self.failure_text is not None:
                return self._substitute()
            raise APIError(502, f"lost the instance serving the request: {exc!r}",
                           type=SERVER_ERROR, code="instance_unavailable") from exc
        self._last = out
        return out

    def _substitute(self) -> RequestOutput:
        """The configured default text ends a request whose instance failed mid-way (the
        paper's "answer the user with default text"); the timeline still records a failure."""
        assert self.failure_text is not None and self.first is not None
        log.warning("request %s failed after its first token (%s); answering with the "
                    "configured default text", self.request_id, self.error)
        self._substituted = True
        last = self._last
        text = (last.text if last is not None else self.first.text) + self.failure_text
        tokens = last.completion_tokens if last is not None else 1
        return RequestOutput(self.request_id, [], self.failure_text, text, True,
                             FinishReason.STOP, self.first.prompt_tokens, tokens,
                             self.first.cached_tokens)

    async def expect(self, *names: str) -> dict[str, Any]:
        """The next prefill event, which must be one of `names` (the name comes back under
        the key `_event` when more than one is allowed); `error` becomes APIError."""
        assert self.prefill is not None
        async for event, data in self.prefill_events:
            if event in names:
                return data if len(names) == 1 else {**data, "_event": event}
            if event == "error":
                err = _remote_error(data, "prefill")
                self.error, self.error_code = err.message, err.code
                raise err
        raise APIError(502, f"prefill stream ended before its {'/'.join(names)!r} event",
                       type=SERVER_ERROR, code="prefill_failed")

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        assert self.first is not None
        if self.first.finished:
            self.finished = True
            return
        nxt = await self.expect("handoff", "delta")
        if nxt.pop("_event") == "delta":  # an aggregated instance decodes the request itself
            async for out in self._deltas(self._prefill_deltas(nxt), "prefill"):
                yield out
            return
        handoff = HandoffEvent.model_validate(nxt)
        self.decode_url = handoff.decode_url
        self.timeline.handoff = (time.monotonic(), handoff.decode_url)
        await self._close_prefill()
        req = self.fwd.client.build_request(
            "GET", f"{handoff.decode_url}/internal/stream/{self.request_id}")
        self.decode = await self.fwd.client.send(req, stream=True)
        if self.decode.status_code != 200:
            await self.decode.aread()
            raise APIError(502, f"decode stream refused: HTTP {self.decode.status_code} "
                           f"{self.decode.text[:200]}", type=SERVER_ERROR, code="decode_failed")
        async for out in self._deltas(events(self.decode), "decode"):
            yield out

    async def _prefill_deltas(self, head: dict[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        yield "delta", head
        async for item in self.prefill_events:
            yield item

    async def _deltas(self, stream: AsyncIterator[tuple[str, Any]],
                      where: str) -> AsyncIterator[RequestOutput]:
        """RequestOutputs of the `delta` events of `stream` until the finished one."""
        assert self.first is not None
        sent = self.first.text
        async for event, data in stream:
            if event == "error":
                raise _remote_error(data, where)
            d = DeltaEvent.model_validate(data)
            delta = d.text[len(sent):] if d.text.startswith(sent) else ""
            sent = d.text if d.text.startswith(sent) else sent
            self.finished = d.finished
            self.timeline.token(time.monotonic(), d.completion_tokens)
            yield RequestOutput(self.request_id, d.token_ids, delta, sent, d.finished,
                                _reason(d.finish_reason), self.first.prompt_tokens,
                                d.completion_tokens, self.first.cached_tokens)
            if d.finished:
                return
        raise APIError(502, f"the {where} stream ended before the request finished",
                       type=SERVER_ERROR, code=f"{where}_failed")

    async def _close_prefill(self) -> None:
        if self.prefill is not None:
            await self.prefill.close()
            self.prefill = None

    async def aclose(self) -> None:
        await self._close_prefill()
        if self.decode is not None:
            await self.decode.aclose()
        elif self.decode_url is not None and not self.finished:
            await self._abort_on_decode()
        self.decode_url = None  # idempotent: abort at most once
        if self.timeline.outcome is None:
            outcome = (OK if self.finished else TERMINATED if self.error_code == DEADLINE
                       else FAILED if self.error else CANCELLED)
            self.timeline.finish(outcome, time.monotonic(), self.error)
            self.on_end(self.timeline)

    async def _abort_on_decode(self) -> None:
        body = AbortRequest(request_id=self.request_id).model_dump_json()
        try:
            await self.fwd.client.post(f"{self.decode_url}/internal/abort", content=body,
                                       headers={"content-type": "application/json"}, timeout=5.0)
        except httpx.HTTPError as exc:
            log.warning("abort of %s on %s failed: %s", self.request_id, self.decode_url, exc)


def _reason(value: str | None) -> FinishReason | None:
    return FinishReason(value) if value else None


def _remote_error(data: dict[str, Any], where: str) -> APIError:
    message = str(data.get("message", f"the {where} instance failed"))
    code = str(data.get("code", f"{where}_failed"))
    if code == "deadline_exceeded":  # queued on the instance (baselines) past its TTFT budget
        return APIError(503, f"TTFT deadline exceeded while queued on {where}: {message}",
                        type=SERVER_ERROR, code=DEADLINE)
    return APIError(502, message, type=SERVER_ERROR, code=code)
