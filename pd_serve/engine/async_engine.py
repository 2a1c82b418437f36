"""Asyncio front of the single-threaded LLMEngine: one background thread steps the engine and
streams each request's outputs to its caller through a per-request asyncio queue.

Lifecycle:
1. `AsyncEngine(engine)` wraps a constructed engine; nothing runs yet.
2. `start()` launches the engine thread. Its loop drains the command queue (add / abort, posted
   by the event loop), steps the engine while it has unfinished work, and otherwise sleeps on a
   condition until the next command arrives (waking once a second to refresh stats).
3. `generate()` (any number, concurrently, from one or more event loops) posts an add command and
   yields the request's `RequestOutput`s until one is finished. The engine thread delivers them
   with `loop.call_soon_threadsafe`. A caller that stops early (client disconnect, cancellation)
   posts an abort; the engine reports the request finished with ABORT on its next step and frees
   its blocks.
4. `stop()` asks the loop to exit, fails every open request with EngineDeadError and joins the
   thread. The wrapped engine is not closed: its owner (the CLI) closes the runner afterwards.

Only the engine thread touches the engine. `stats()` and `health()` read snapshots that thread
refreshes, so they never block on a running step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pd_serve.engine.outputs import RequestOutput
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.engine.step_trace import StepTrace

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 1.0
_IDLE_REFRESH_S = 1.0  # an idle engine still refreshes stats and its leak check this often
_UNHEALTHY_AFTER = 3  # consecutive failed steps; one transient failure is not an outage


class EngineProtocol(Protocol):
    """The part of LLMEngine the wrapper uses (the engine itself, or a Fake in unit tests)."""

    max_model_len: int

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> Any: ...  # a dict or a dataclass of numbers
    def leak_check(self) -> Any: ...


class EngineError(RuntimeError):
    """A request failed inside the engine (a step raised); the server itself keeps running."""


class EngineDeadError(EngineError):
    """The engine thread is not running (stopped, or never started)."""


@dataclass
class _Stream:
    """Where one request's outputs go: a queue living on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncEngine:
    """Runs an LLMEngine on one background thread and serves it to asyncio callers."""

    def __init__(self, engine: EngineProtocol, step_trace: StepTrace | None = None) -> None:
        self.engine = engine
        self.step_trace = step_trace  # one line per step (pd_serve.engine.step_trace)
        if step_trace is not None:  # the engine keeps what each step ran only when traced
            engine.record_batches = True  # type: ignore[attr-defined]
        self._waited = True  # the thread waited for work since the last traced step
        self.max_model_len: int = int(engine.max_model_len)
        self._cond = threading.Condition()
        self._commands: deque[tuple[str, str, Any]] = deque()  # guarded by _cond
        self._streams: dict[str, _Stream] = {}  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._running = False
        self._steps = 0
        self._failed_steps = 0
        self._caller_aborts = 0
        self._consecutive_failures = 0
        self._last_error: str | None = None
        self._engine_stats: dict[str, Any] = {}
        self._leak_check: str = "not run"
        self._leak_check_time = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._running = True
        self._refresh_stats(idle=True)
        self._thread = threading.Thread(target=self._run, name="pd-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the loop after the current step, fails open requests, joins the thread."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.step_trace is not None and not self.alive:  # only the engine thread writes it
            self.step_trace.close()
        with self._cond:
            streams, self._streams = dict(self._streams), {}
            self._commands.clear()
        for stream in streams.values():
            _post(stream, EngineDeadError("the engine was stopped"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- callers (event loop) ----------------------------------------------------------------

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncGenerator[RequestOutput, None]:
        """Yields the request's incremental outputs; the last has `finished` set.

        Raises ValueError if the engine rejects the request (bad input, prompt over the
        context, duplicate id), EngineError if it fails while running. Closing or cancelling
        the iterator early aborts the request in the engine.
        """
        return self._open_stream(request_id, "add", (list(prompt_token_ids), params),
                                 lambda out: out.finished)

    async def _open_stream(self, request_id: str, kind: str, payload: Any,
                           is_last: Callable[[RequestOutput], bool],
                           ) -> AsyncGenerator[RequestOutput, None]:
        """Registers a stream for `request_id`, queues the engine command that adds it and
        yields its outputs up to the one `is_last` accepts; leaving earlier aborts it."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cond:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._commands.append((kind, request_id, payload))
            self._cond.notify()
        done = False
        try:
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = is_last(item)
                yield item
        finally:
            if not done:
                self._abort(request_id)
            else:
                with self._cond:  # e.g. a parked hand-off: nobody listens any more
                    self._streams.pop(request_id, None)

    def health(self) -> dict[str, Any]:
        """Liveness of the engine thread and of its recent steps; `ok` False means unhealthy."""
        ok = self.alive and self._consecutive_failures < _UNHEALTHY_AFTER
        return {"ok": ok, "engine_thread_alive": self.alive,
                "consecutive_step_failures": self._consecutive_failures,
                "last_error": self._last_error}

    def stats(self) -> dict[str, Any]:
        """Engine statistics as of the last step, plus the wrapper's own counters.

        `leak_check` is "ok" or the failure message, as of `leak_check_time`: the last time the
        engine went idle.
        """
        with self._cond:
            open_requests = len(self._streams)
        return {**self._engine_stats, "open_requests": open_requests, "steps": self._steps,
                "failed_steps": self._failed_steps, "caller_aborts": self._caller_aborts,
                "leak_check": self._leak_check,
                "leak_check_time": self._leak_check_time, "engine_thread_alive": self.alive}

    def _abort(self, request_id: str) -> None:
        with self._cond:
            if self._streams.pop(request_id, None) is None:
                return
            self._commands.append(("abort", request_id, None))
            self._cond.notify()

    # -- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._running and not self._commands and not self.engine.has_unfinished():
                    self._waited = True
                    self._cond.wait(timeout=_IDLE_REFRESH_S)
                if not self._running:
                    return
                commands = list(self._commands)
                self._commands.clear()
            self._apply(commands)
            if self.engine.has_unfinished():
                self._step()
            if not self.engine.has_unfinished():
                self._refresh_stats(idle=True)

    def _apply(self, commands: list[tuple[str, str, Any]]) -> None:
        for kind, request_id, payload in commands:
            if kind == "abort":
                self._caller_aborts += 1
                self._guarded(self.engine.abort, request_id)
                continue
            prompt, params = payload
            try:
                self.engine.add_request(request_id, prompt, params)
            except ValueError as exc:
                self._fail(request_id, exc)
            except Exception as exc:
                log.exception("add_request(%s) failed", request_id)
                self._fail(request_id, EngineError(f"the engine could not add the request: {exc}"))
                self._guarded(self.engine.abort, request_id)

    def _step(self) -> None:
        trace = self.step_trace
        if trace is not None:
            start, t0 = time.time(), time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - fail the affected requests, keep serving
            self._on_step_failure(exc)
            return
        if trace is not None:
            batch = getattr(self.engine, "last_batch", None)
            if batch is not None:
                trace.record(start, time.perf_counter() - t0, self._waited, batch)
                self._waited = False
        self._steps += 1
        self._consecutive_failures = 0
        self._deliver(outputs)
        if self._steps % 16 == 0:
            self._refresh_stats(idle=False)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        with self._cond:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # aborted by its caller; nobody is listening
                if out.finished:
                    del self._streams[out.request_id]
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _on_step_failure(self, exc: Exception) -> None:
        """Every request in the engine may be affected: fail them all and abort them."""
        self._failed_steps += 1
        self._consecutive_failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        log.error("engine step failed:\n%s", traceback.format_exc())
        with self._cond:
            streams, self._streams = dict(self._streams), {}
        for request_id, stream in streams.items():
            self._guarded(self.engine.abort, request_id)
            _post(stream, EngineError(f"the engine failed while running the request: {exc}"))
        # A step that keeps failing must not spin the CPU: back off before the next attempt.
        backoff = min(_MAX_BACKOFF_S, 0.01 * 2 ** self._consecutive_failures)
        with self._cond:
            self._cond.wait_for(lambda: not self._running, timeout=backoff)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        with self._cond:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            _post(stream, exc)

    def _refresh_stats(self, idle: bool) -> None:
        raw = self._guarded(self.engine.stats)
        if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
            raw = dataclasses.asdict(raw)
        self._engine_stats = dict(raw or {})
        if idle:
            try:
                self.engine.leak_check()
                self._leak_check = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, never raised
                self._leak_check = f"{type(exc).__name__}: {exc}"
            self._leak_check_time = time.time()
        self._engine_stats["stats_time"] = time.time()

    def _guarded(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            log.exception("engine call %s failed", getattr(fn, "__name__", fn))
            return None


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


def _post(stream: _Stream, item: RequestOutput | BaseException) -> None:
    _call_soon(stream.loop, stream.queue.put_nowait, item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the caller's loop is closed; nobody is waiting any more
