"""AsyncEngine with the two things a P/D instance needs beyond `generate`: running a function on
the engine thread between steps (`call`), and streams whose request is added by a custom
function (prefill-only requests, prefilled hand-offs).

Lifecycle: as AsyncEngine (start, streams, stop). A `stream(...)` of a prefill-only request ends
at its hand-off-ready output without aborting the request: the parked request keeps its blocks
until the caller runs `release_handoff` through `call`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from pd_serve.engine.async_engine import AsyncEngine, EngineDeadError, EngineError
from pd_serve.engine.outputs import RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")
Adder = Callable[[Any], None]


def handoff_ready(out: RequestOutput) -> bool:
    return bool(getattr(out, "handoff_ready", False))


class RoleEngine(AsyncEngine):
    """The engine of one prefill or decode instance; only its thread touches the engine."""

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Runs `fn(engine)` on the engine thread between steps and returns its result (or
        raises its exception). Blocking work inside `fn` delays the next step."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._cond:
            self._commands.append(("call", "", (fn, fut, loop)))
            self._cond.notify()
        return await fut

    def stream(self, request_id: str, add: Adder) -> AsyncGenerator[RequestOutput, None]:
        """Like `generate`, but the request is added by `add(engine)` on the engine thread.
        Ends after a finished or hand-off-ready output; closing early aborts the request."""
        return self._open_stream(request_id, "add_fn", add,
                                 lambda out: out.finished or handoff_ready(out))

    def abort_request(self, request_id: str) -> None:
        """Aborts a request whatever its state (parked hand-offs included); idempotent."""
        with self._cond:
            self._streams.pop(request_id, None)
            self._commands.append(("abort", request_id, None))
            self._cond.notify()

    def _apply(self, commands: list[tuple[str, str, Any]]) -> None:
        rest = []
        for kind, request_id, payload in commands:
            if kind == "call":
                self._run_call(*payload)
            elif kind == "add_fn":
                self._run_add(request_id, payload)
            else:
                rest.append((kind, request_id, payload))
        if rest:
            super()._apply(rest)

    def _run_call(self, fn: Callable[[Any], Any], fut: asyncio.Future[Any],
                  loop: asyncio.AbstractEventLoop) -> None:
        try:
            result, exc = fn(self.engine), None
        except Exception as e:  # noqa: BLE001 - handed to the caller
            result, exc = None, e

        def settle() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the caller's loop is closed

    def _run_add(self, request_id: str, add: Adder) -> None:
        try:
            add(self.engine)
        except ValueError as exc:
            self._fail(request_id, exc)
        except Exception as exc:
            log.exception("adding %s failed", request_id)
            self._fail(request_id, EngineError(f"the engine could not add the request: {exc}"))
            self._guarded(self.engine.abort, request_id)
