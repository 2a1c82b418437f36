"""Shared state of one P/D-Device request between the cloud stream thread, the device worker
thread and the display (the caller's thread); every field is guarded by `cond`.

Lifecycle:
1. created by DeviceRuntime.generate with the prompt, the output budget G and the cloud cap
   (the cloud tokens the stream may use: min(1 + N, G), fewer under the `handover_after` hook);
2. the cloud stream thread adds events (`on_cloud`): cloud tokens, the refined prompt, the end;
3. the worker reads them, records its progress (`computed`, speeds) and fixes the stream's
   split once with `cut_at(cut)`: the first `cut` tokens come from the cloud, the rest from the
   device, and every later cloud event is ignored; then it adds local tokens (`add_local`);
4. the display asks for the token at each stream index (`token_at`, `ended`) and for the
   controller's inputs (`controller_state`); `close` (stream over, consumer gone) tells the
   worker to stop.
Invariant: a cloud token at an index >= `cut` is never returned by `token_at`, so the user sees
every token exactly once, in order, whatever the timing.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pd_device.client import CloudFailure, StreamEvent
from pd_device.controller import ControllerState
from pd_serve.engine.refine import keep_count
from pd_serve.gateway.assist_protocol import (
    AssistEnd,
    AssistError,
    AssistFirst,
    AssistMeta,
    AssistRefined,
    AssistToken,
)

PRIOR_WEIGHT_TOKENS = 64  # the warm-up's prefill speed counts as this many measured tokens
DECODE_EMA = 0.3  # weight of the newest decode step in the measured step time


class Session:
    """Token streams, cloud status and device progress of one request (see module docstring)."""

    def __init__(self, prompt: list[int], max_tokens: int, cloud_cap: int, rho: float,
                 prefill_tps: float, decode_step_s: float, refine_window: int) -> None:
        self.cond = threading.Condition()
        self.prompt = prompt
        self.max_tokens = max_tokens  # G
        self.cloud_cap = cloud_cap
        self.rho = rho
        self.refine_window = refine_window
        self.cloud: list[int] = []  # received cloud tokens; index 0 is `first`
        self.cloud_finish: list[str | None] = []  # reason a cloud token ends the user's stream
        self.cloud_times: list[float] = []
        self.refined: list[int] | None = None  # kept prompt positions
        self.cloud_done = False  # no cloud event will be used any more
        self.cloud_end: str | None = None  # the `end` event's reason
        self.cloud_failure: str | None = None
        self.cut: int | None = None  # cloud tokens in the stream, fixed by the worker
        self.local: list[int] = []
        self.local_finish: str | None = None  # reason the last local token ends the stream
        self.end_reason: str | None = None  # set when the stream ends with no token to say so
        self.worker_done = False
        self.closed = False
        self.reason: str | None = None  # fallback or early cloud end, for the report
        self.fallback = False
        self.base_len: int | None = None  # tokens of the device's prompt, once known
        self.computed = 0  # leading tokens of the device's sequence with K/V cached
        self.tail = 0  # tokens the hand-over step computes
        self.prefill_tokens = 0
        self.prefill_time = 0.0
        self._prior_tps = prefill_tps
        self.decode_step_s = decode_step_s
        self.trace: list[dict[str, Any]] = []  # timed events for the report (monotonic `t`)

    def note(self, kind: str, **fields: Any) -> None:
        """Records a timed event of this request (cloud arrivals, chunks, hand-over, display
        decisions) for the report; cheap, so always on."""
        with self.cond:
            self.trace.append({"t": time.monotonic(), "kind": kind, **fields})

    # ----- cloud stream thread ---------------------------------------------------------------

    def on_cloud(self, event: StreamEvent) -> None:
        with self.cond:
            if self.cloud_done:
                return
            if isinstance(event, AssistFirst) and not self.cloud:
                self._add_cloud(event.token_id, event.finish_reason)
            elif isinstance(event, AssistToken) and event.index == len(self.cloud) >= 1:
                self._add_cloud(event.token_id, event.finish_reason)
            elif isinstance(event, AssistRefined):
                self._set_refined(event.keep_indices)
            elif isinstance(event, AssistEnd):
                self.cloud_end = event.reason
                self.cloud_done = True
            elif isinstance(event, AssistError):
                self._fail(f"cloud error {event.code}: {event.message}")
            elif isinstance(event, CloudFailure):
                self._fail(f"{event.code}: {event.message}")
            elif not isinstance(event, AssistMeta):
                self._fail(f"cloud event out of order: {event!r}"[:300])
            self.cond.notify_all()

    def _add_cloud(self, token_id: int, finish_reason: str | None) -> None:
        self.cloud.append(token_id)
        self.cloud_times.append(time.monotonic())
        n = len(self.cloud)
        self.note("cloud", index=n - 1)
        self.cloud_finish.append("stop" if finish_reason == "stop"
                                 else "length" if n >= self.max_tokens else None)

    def _set_refined(self, keep: list[int]) -> None:
        n = len(self.prompt)
        if not keep or any(b <= a for a, b in zip(keep, keep[1:])) or keep[0] < 0 \
                or keep[-1] >= n:
            self._fail(f"cloud sent invalid keep indices for a {n}-token prompt")
            return
        self.refined = list(keep)
        self.note("refined", kept=len(keep))

    def _fail(self, message: str) -> None:
        self.cloud_failure = message
        self.cloud_done = True

    # ----- worker thread ---------------------------------------------------------------------

    def received(self) -> int:
        """Cloud tokens the stream may use now."""
        return min(len(self.cloud), self.cloud_cap)

    def more_cloud_expected(self) -> bool:
        return not self.cloud_done and self.received() < self.cloud_cap

    def cloud_ends_stream(self) -> int | None:
        """Stream length if a usable cloud token already ends the user's stream, else None."""
        for i in range(self.received()):
            if self.cloud_finish[i] is not None:
                return i + 1
        return None

    def cut_at(self, cut: int, tail: int = 0) -> None:
        """Fixes the split (once): cloud tokens [0, cut), then the device's."""
        assert self.cut is None, "the stream's split is fixed once"
        self.cut = cut
        self.tail = tail
        self.cloud_done = True
        self.cond.notify_all()

    def add_local(self, token_ids: list[int], finish_reason: str | None) -> None:
        with self.cond:
            self.local.extend(token_ids)
            if finish_reason is not None:
                self.local_finish = finish_reason
            self.cond.notify_all()

    def record_prefill(self, tokens: int, seconds: float) -> None:
        with self.cond:
            self.prefill_tokens += tokens
            self.prefill_time += seconds

    def record_decode(self, seconds: float) -> None:
        with self.cond:
            self.decode_step_s += DECODE_EMA * (seconds - self.decode_step_s)

    def finish_worker(self, end_reason: str | None) -> None:
        with self.cond:
            if self.cut is None:  # failed before the split: keep what was shown possible
                self.cut_at(self.received())
            if end_reason is not None and self.end_reason is None:
                self.end_reason = end_reason
            self.worker_done = True
            self.cond.notify_all()

    @property
    def prefill_tps(self) -> float:
        tokens = self.prefill_tokens + PRIOR_WEIGHT_TOKENS
        return tokens / (self.prefill_time + PRIOR_WEIGHT_TOKENS / self._prior_tps)

    # ----- display (caller's thread; lock held) ----------------------------------------------

    def token_at(self, i: int) -> tuple[int, str, str | None] | None:
        """(token id, source, reason it ends the stream) at stream index `i`, if there yet."""
        cap = self.cloud_cap if self.cut is None else self.cut
        if i < min(len(self.cloud), cap):
            return self.cloud[i], "cloud", self.cloud_finish[i]
        if self.cut is not None and i >= self.cut and i - self.cut < len(self.local):
            last = i - self.cut == len(self.local) - 1
            finish = self.local_finish if last else None
            if finish is None and i + 1 >= self.max_tokens:
                finish = "length"
            return self.local[i - self.cut], "local", finish
        return None

    def ended(self, i: int) -> str | None:
        """Why no token will ever come at index `i` (None: one may still come)."""
        if self.closed:
            return "abort"
        if self.token_at(i) is not None:
            return None
        if self.cut is None:  # cloud-only: the cloud's end says why
            if not (self.worker_done and self.cloud_done):
                return None
            if self.cloud_failure:
                return "error"
            return self.cloud_end if self.cloud_end in ("stop", "length") else "abort"
        if self.worker_done:
            return self.end_reason or ("error" if self.cloud_failure else "abort")
        return None

    def controller_state(self, shown: int, last: float | None, now: float) -> ControllerState:
        local_started = self.cut is not None and bool(self.local)
        if self.cut is not None:
            available = self.cut + len(self.local)
            to_prefill = 0 if local_started else self.tail
            expected = 0
        else:
            available = self.received()
            base = self.base_len if self.base_len is not None else self._base_estimate()
            to_prefill = max(base + available - self.computed, 0)
            expected = self.cloud_cap - available if self.more_cloud_expected() else 0
        return ControllerState(
            now=now, last_display=last, buffered=max(available - shown, 0),
            prefill_tps=self.prefill_tps, decode_step_s=self.decode_step_s,
            to_prefill=to_prefill, cloud_expected=expected, cloud_gap_s=self._cloud_gap(),
            local_started=local_started)

    def _base_estimate(self) -> int:
        """The device's prompt length before the refined prompt arrives (the cloud's rule)."""
        return keep_count(len(self.prompt), self.rho, self.refine_window)

    def _cloud_gap(self) -> float | None:
        t = self.cloud_times[1:]  # the first token's time is the TTFT, not a gap
        if len(t) < 2:
            return None
        return (t[-1] - t[0]) / (len(t) - 1)
