"""The device side of one request, on its own thread: local prefill in chunks over the refined
prompt plus the cloud tokens received so far, the hand-over, then local decoding.

The worker is the only thread that touches the engine while a request runs. Chunks go through
the engine's own prefix cache: each chunk is a one-token request over the device's sequence so
far, cut at a block boundary, so its blocks stay cached and the next chunk (and the hand-over
request) computes only what is new. A chunk covers at least one block of new tokens (amortised:
many received tokens per chunk) and at most `chunk_max_tokens`.

Lifecycle:
1. constructed over the runtime's idle engine, the session and the request's parameters;
2. `start()`; the thread loops: plan under the session lock (chunk | hand over | fall back |
   stop | wait for the cloud), then run the chunk or the local request outside the lock;
3. it hands over once its cached K/V cover all but less than one block of the cloud tokens
   received (caught up), or when no more cloud tokens will come; it falls back to device-only
   when the cloud fails or is silent past the TTFT target before its first token. Either way it
   fixes the stream's split, closes the cloud stream and runs one local request over the
   device's prompt + the cloud tokens kept, adding its tokens to the session;
4. it ends with the engine idle (its requests finished or aborted) and `worker_done` set.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pd_device.config import DeviceConfig
from pd_device.session import Session
from pd_serve.backends.base import ModelRunner
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.outputs import FinishReason, RequestOutput
from pd_serve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
CHUNK_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True)
class _Action:
    kind: str  # wait | chunk | local | stop
    seq: list[int] = field(default_factory=list)
    max_tokens: int = 0
    timeout: float | None = None


_STOP = _Action("stop")


class DeviceWorker:
    """Runs the device's part of one request (see the module docstring)."""

    def __init__(self, engine: LLMEngine, runner: ModelRunner, session: Session,
                 params: SamplingParams,
                 cfg: DeviceConfig, mode: str, deadline: float,
                 cancel_cloud: Callable[[], None], request_id: str) -> None:
        self._engine = engine
        self._runner = runner
        self._s = session
        self._params = params
        self._cfg = cfg
        self._mode = mode
        self._deadline = deadline
        self._cancel_cloud = cancel_cloud
        self._rid = request_id
        self._bs = engine.block_manager.block_size
        self._base: list[int] | None = None
        self._active: set[str] = set()
        self._chunk_ids = itertools.count()
        self._thread = threading.Thread(target=self._main, name="device-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _main(self) -> None:
        end: str | None = None
        try:
            end = self._loop()
        except Exception as exc:  # the stream must still end cleanly for the user
            log.exception("device worker failed")
            with self._s.cond:
                self._s.reason = self._s.reason or f"device failed: {exc!r}"
            end = "error"
        finally:
            try:
                self._drain()
            finally:
                self._s.finish_worker(end)

    def _loop(self) -> str | None:
        while True:
            act = self._next_action()
            if act.kind == "stop":
                return None
            if act.kind == "chunk":
                self._chunk(act.seq)
            else:
                return self._local(act.seq, act.max_tokens)

    # ----- planning (session lock held) ------------------------------------------------------

    def _next_action(self) -> _Action:
        s = self._s
        with s.cond:
            while True:
                if s.closed:
                    return _STOP
                act = self._plan(time.monotonic())
                if act.kind != "wait":
                    return act
                s.cond.wait(act.timeout)

    def _plan(self, now: float) -> _Action:
        s = self._s
        if self._mode == "device_only":
            s.cut_at(0, tail=len(s.prompt))
            return _Action("local", list(s.prompt), s.max_tokens)
        if not s.cloud:
            if s.cloud_done or now >= self._deadline:
                return self._fall_back()
            if s.rho >= 1.0:  # the device's prompt is known: start before the cloud answers
                chunk = self._chunk_action(self._base_tokens() or [])
                if chunk is not None:
                    return chunk
            return _Action("wait", timeout=max(self._deadline - now, 0.0))
        n = s.cloud_ends_stream()
        if n is not None:  # the cloud's tokens end the user's stream: nothing to do locally
            s.cut_at(n)
            self._cancel_cloud()
            return _STOP
        base = self._base_tokens()
        if base is None:
            return _Action("wait", timeout=None)  # the refined prompt comes next
        r = s.received()
        seq = base + s.cloud[:r]
        if s.more_cloud_expected():
            chunk = self._chunk_action(seq)
            if chunk is not None:
                return chunk
            if self._cfg.handover_after is not None:
                return _Action("wait", timeout=None)  # the hook's token is not here yet
        return self._hand_over(seq, r)

    def _base_tokens(self) -> list[int] | None:
        """The device's prompt: the refined one (kept positions, renumbered 0..n-1), the whole
        prompt with rho = 1, or when the cloud ended without sending the refined prompt."""
        s = self._s
        if self._base is None:
            if s.rho >= 1.0:
                self._base = list(s.prompt)
            elif s.refined is not None:
                self._base = [s.prompt[i] for i in s.refined]
            elif s.cloud_done:
                self._base = list(s.prompt)
                s.reason = s.reason or "no refined prompt came: the device keeps the whole prompt"
            else:
                return None
            s.base_len = len(self._base)
        return self._base

    def _chunk_action(self, seq: list[int]) -> _Action | None:
        limit = self._s.computed + self._cfg.chunk_max_tokens
        end = (min(len(seq), limit) // self._bs) * self._bs
        if end - self._s.computed < self._bs:
            return None
        return _Action("chunk", seq[:end])

    def _hand_over(self, seq: list[int], cut: int) -> _Action:
        s = self._s
        s.cut_at(cut, tail=max(len(seq) - s.computed, 1))
        s.note("handover", cut=cut, tail=s.tail, seq=len(seq))
        self._cancel_cloud()
        if s.max_tokens - cut <= 0:
            return _STOP
        return _Action("local", seq, s.max_tokens - cut)

    def _fall_back(self) -> _Action:
        s = self._s
        s.reason = s.cloud_failure or (
            f"no first cloud token within the TTFT target ({self._cfg.ttft_target_s:g}s)")
        s.fallback = True
        computed = s.computed if s.rho >= 1.0 else 0  # chunks so far were over the prompt
        s.cut_at(0, tail=max(len(s.prompt) - computed, 1))
        self._cancel_cloud()
        return _Action("local", list(s.prompt), s.max_tokens)

    # ----- engine work (no lock held) --------------------------------------------------------

    def _chunk(self, seq: list[int]) -> None:
        rid = f"{self._rid}-chunk-{next(self._chunk_ids)}"
        self._add(rid, seq, CHUNK_PARAMS)
        seconds, cached, compiled = 0.0, 0, False
        while rid in self._active:
            outs, dt, new_graph = self._step()
            seconds, compiled = seconds + dt, compiled or new_graph
            for out in outs:
                if out.request_id == rid and out.finished:
                    self._active.discard(rid)
                    cached = out.cached_tokens
        if not compiled:  # a graph compile says nothing about the device's speed
            self._s.record_prefill(len(seq) - cached, seconds)
        self._s.note("chunk", tokens=len(seq) - cached, upto=len(seq), seconds=seconds,
                     compiled=compiled)
        with self._s.cond:
            self._s.computed = len(seq)
            self._s.cond.notify_all()

    def _local(self, seq: list[int], max_tokens: int) -> str | None:
        """Runs the local request to its end; returns the stream's end reason if it ends with
        no token to carry it."""
        rid = f"{self._rid}-local"
        try:
            self._add(rid, seq, replace(self._params, max_tokens=max_tokens))
        except ValueError as exc:
            with self._s.cond:
                self._s.reason = f"the device cannot continue: {exc}"
            return "length" if "max_model_len" in str(exc) else "error"
        seconds, first, compiled = 0.0, True, False
        while rid in self._active:
            outs, dt, new_graph = self._step()
            seconds, compiled = seconds + dt, compiled or new_graph
            for out in (o for o in outs if o.request_id == rid):
                if out.new_token_ids and first:
                    if not compiled:
                        self._s.record_prefill(len(seq) - out.cached_tokens, seconds)
                    self._s.note("first_local", tokens=len(seq) - out.cached_tokens,
                                 seconds=seconds, compiled=compiled)
                    first = False
                elif out.new_token_ids and not new_graph:
                    self._s.record_decode(dt)
                self._s.add_local(out.new_token_ids, _finish(out))
                if out.finished:
                    self._active.discard(rid)
        return None

    def _add(self, rid: str, seq: list[int], params: SamplingParams) -> None:
        self._engine.add_request(rid, seq, params)
        self._active.add(rid)

    def _step(self) -> tuple[list[RequestOutput], float, bool]:
        """One engine step: (outputs, seconds, whether the runner compiled a new graph)."""
        if self._s.closed:
            for rid in self._active:
                self._engine.abort(rid)
        graphs = len(getattr(self._runner, "compiled_shapes", ()))
        t0, c0 = time.monotonic(), time.process_time()
        outs = self._engine.step()
        time.sleep(stretch_s(time.monotonic() - t0, time.process_time() - c0,
                             self._cfg.slowdown))
        compiled = len(getattr(self._runner, "compiled_shapes", ())) != graphs
        return outs, time.monotonic() - t0, compiled

    def _drain(self) -> None:
        """Leaves the engine idle: aborts this request's unfinished engine requests."""
        for rid in self._active:
            self._engine.abort(rid)
        self._active.clear()
        while self._engine.has_unfinished():
            self._engine.step()


def stretch_s(wall_s: float, cpu_s: float, slowdown: float) -> float:
    """Sleep that makes a step `slowdown` times longer (DeviceConfig.slowdown): (slowdown - 1)
    times the step's own work, taken as the smaller of its wall time and this process's CPU
    time, so time lost to other processes on a shared host (the local cloud) is not stretched
    with it."""
    return max(slowdown - 1.0, 0.0) * max(min(wall_s, cpu_s), 0.0)


def _finish(out: RequestOutput) -> str | None:
    if not out.finished or out.finish_reason in (None, FinishReason.ABORT):
        return None
    return str(out.finish_reason.value)
