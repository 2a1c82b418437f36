"""The display: turns a session's cloud and local tokens into the user's one stream of
DisplayEvents, each token once and in order, at the times the speed controller picks.

Lifecycle:
1. created per request over the session, the tokenizer and the request's stop rules;
2. `events()` yields one DisplayEvent per token (text by incremental detokenisation over the
   whole stream, so the cloud-to-device seam is invisible and stop strings spanning it match)
   and returns once a token ends the stream (stop token or string, the output budget) or no
   token can come any more (error, abort);
3. afterwards `shown` and `finish_reason` hold the result, and `wake_late_s` how late the
   display woke after each timed wait that ran out (the controller's `jitter_s` must cover it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from pd_device.controller import ControllerConfig, next_display_time, prefill_eta_s
from pd_device.report import DisplayEvent
from pd_device.session import Session
from pd_serve.engine.output_text import OutputText
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer

IDLE_WAIT_S = 0.5  # re-check for a vanished producer this often while nothing is buffered


class Display:
    """The user's stream of one request (see the module docstring)."""

    def __init__(self, session: Session, tokenizer: Tokenizer, params: SamplingParams,
                 eos_token_ids: frozenset[int], controller: ControllerConfig | None,
                 t0: float) -> None:
        self._s = session
        self._params = params
        self._eos = eos_token_ids
        self._ctrl = controller  # None: show every token as soon as it is there
        self._t0 = t0
        self._text = OutputText(tokenizer, params.stop, params.include_stop_str_in_output)
        self.shown: list[DisplayEvent] = []
        self.finish_reason: str | None = None
        self.wake_late_s: list[float] = []

    def events(self) -> Iterator[DisplayEvent]:
        last: float | None = None
        while True:
            nxt = self._next(len(self.shown), last)
            if isinstance(nxt, str):
                self.finish_reason = nxt
                return
            token_id, source, finish = nxt
            last = time.monotonic()
            finish, text = self._release(token_id, finish)
            event = DisplayEvent(len(self.shown), token_id, text, last - self._t0, source,
                                 finish)
            self.shown.append(event)
            yield event
            if finish is not None:
                self.finish_reason = finish
                return

    def _next(self, i: int, last: float | None) -> tuple[int, str, str | None] | str:
        """The token at stream index `i` once it is due, or why the stream is over."""
        s = self._s
        with s.cond:
            while True:
                end = s.ended(i)
                if end is not None:
                    return end
                token = s.token_at(i)
                now = time.monotonic()
                if token is None:
                    s.cond.wait(IDLE_WAIT_S)
                    continue
                if self._ctrl is None:
                    return token
                state = s.controller_state(i, last, now)
                due = next_display_time(state, self._ctrl)
                if due is None or due <= now:
                    s.note("show", index=i, source=token[1], buffered=state.buffered,
                           to_prefill=state.to_prefill, expected=state.cloud_expected,
                           eta_s=prefill_eta_s(state), prefill_tps=state.prefill_tps,
                           local_started=state.local_started)
                    return token
                if not s.cond.wait(due - now):  # woken early when the state changes
                    self.wake_late_s.append(max(time.monotonic() - due, 0.0))

    def _release(self, token_id: int, finish: str | None) -> tuple[str | None, str]:
        """Pushes the token through the stop-string matcher; returns (finish reason, text)."""
        p = self._params
        stop_token = token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self._eos)
        if not stop_token and self._text.push([token_id]):
            finish = "stop"
        if finish is not None:
            self._text.flush()
        return finish, self._text.take_delta(finish is not None)
