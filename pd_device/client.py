"""Client of the cloud assist API (`POST /v1/device/assist`, wire format in
pd_serve.gateway.assist_protocol): typed events of one request, streamed on a thread of its own
so that closing the stream from any thread cancels the request on the cloud.

Lifecycle of an AssistStream:
1. constructed with the gateway's base URL, the AssistRequest and a callback; nothing is sent;
2. `start()` starts a thread running an asyncio loop that POSTs the request and parses events;
3. the callback receives each event on that thread, in order; the last one is an AssistEnd, an
   AssistError or a CloudFailure (HTTP error such as the 409 of a model or tokenizer mismatch,
   connection refused or lost, malformed event, a stream that stops without `end`);
4. `cancel()` (any thread, idempotent) cancels the read and closes the connection, which makes
   the cloud abort the request and free its resources; nothing is delivered after the thread
   has ended, though a callback may be running while `cancel` is called (callers ignore it);
5. `join()` waits for the thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx

from pd_serve.gateway.assist_protocol import (
    ASSIST_PATH,
    AssistEnd,
    AssistError,
    AssistEvent,
    AssistRequest,
    parse_event,
)
from pd_serve.gateway.sse import events


@dataclass(frozen=True)
class CloudFailure:
    """The assist stream failed outside the protocol's own `error` event. `code`: the error
    body's code for an HTTP error (e.g. tokenizer_mismatch), else unreachable | disconnected |
    bad_event | http_<status>; `status`: the HTTP status, if one came."""

    message: str
    code: str
    status: int | None = None


class CloudError(Exception):
    """Raised by `assist_events`; carries the CloudFailure."""

    def __init__(self, failure: CloudFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def assist_url(base_url: str) -> str:
    """The assist endpoint under a gateway's base URL (with or without a trailing /v1)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base + ASSIST_PATH


async def assist_events(client: httpx.AsyncClient, base_url: str,
                        request: AssistRequest) -> AsyncIterator[AssistEvent]:
    """Yields the typed events of one assist request, up to and including `end` or `error`;
    CloudError for an HTTP error, a lost or refused connection, a malformed event or a stream
    that stops early. Closing the generator closes the connection (the cloud cancels)."""
    try:
        async with client.stream("POST", assist_url(base_url),
                                 json=request.model_dump()) as resp:
            if resp.status_code != 200:
                raise CloudError(await _http_failure(resp))
            async for name, data in events(resp):
                try:
                    event = parse_event(name, data)
                except ValueError as exc:
                    raise CloudError(CloudFailure(f"malformed {name!r} event: {exc}",
                                                  "bad_event")) from exc
                yield event
                if isinstance(event, (AssistEnd, AssistError)):
                    return
    except httpx.ConnectError as exc:
        raise CloudError(CloudFailure(f"cloud unreachable: {exc}", "unreachable")) from exc
    except (httpx.TransportError, ValueError) as exc:
        raise CloudError(CloudFailure(f"cloud stream lost: {exc!r}", "disconnected")) from exc
    raise CloudError(CloudFailure("cloud stream ended without an end event", "disconnected"))


async def _http_failure(resp: httpx.Response) -> CloudFailure:
    await resp.aread()
    message, code = resp.text[:500], f"http_{resp.status_code}"
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or message)
        code = str(err.get("code") or code)
    return CloudFailure(f"cloud refused the request ({resp.status_code}): {message}", code,
                        resp.status_code)


StreamEvent = AssistEvent | CloudFailure


class AssistStream:
    """One assist request streamed on its own thread (see the module docstring)."""

    def __init__(self, base_url: str, request: AssistRequest,
                 on_event: Callable[[StreamEvent], None], connect_timeout_s: float = 5.0) -> None:
        self._base_url = base_url
        self._request = request
        self._on_event = on_event
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=None, write=30.0,
                                      pool=connect_timeout_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._cancelled = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name="assist-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._loop is not None and self._task is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._task.cancel)

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            with self._lock:
                self._loop = loop
                self._task = loop.create_task(self._run())
                if self._cancelled:
                    self._task.cancel()
            self._ready.set()
            try:
                loop.run_until_complete(self._task)
            except asyncio.CancelledError:
                pass
            loop.run_until_complete(loop.shutdown_asyncgens())  # closes the HTTP stream
        finally:
            with self._lock:
                loop.close()
            self._ready.set()

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout, trust_env=False) as client:
            try:
                async for event in assist_events(client, self._base_url, self._request):
                    self._on_event(event)
            except CloudError as exc:
                self._on_event(exc.failure)
            except Exception as exc:  # the consumer must always learn that the stream ended
                self._on_event(CloudFailure(f"assist client failed: {exc!r}", "client_error"))
