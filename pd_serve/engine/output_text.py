"""Per-request output text: incremental detokenization, stop-string matching and the hold-back
that keeps a partly matched stop string from being streamed before it is decided.

Lifecycle:
1. created per request with its tokenizer and stop strings;
2. `push(ids)` after each sampled token (stop tokens are not pushed: they never show as text);
   returns True once a stop string matched, after which the text is cut at the match;
3. `take_delta(finished)` returns the text released since the last call: all but the last
   `max(len(stop)) - 1` characters while running, everything once finished;
4. `text` is everything released so far (the concatenation of all deltas).
"""

from __future__ import annotations

from pd_serve.models.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputText:
    """Text of one request's generated tokens with stop strings applied."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (),
                 include_stop_str: bool = False) -> None:
        self._tok = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer)
        self._ids: list[int] = []
        self._stop = stop
        self._include_stop = include_stop_str
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._text = ""  # decoded so far, cut at a matched stop string
        self._released = 0  # characters of _text handed out by take_delta
        self.stopped = False  # a stop string matched

    @property
    def text(self) -> str:
        return self._text[:self._released]

    def push(self, ids: list[int]) -> bool:
        """Adds generated tokens; returns True if the text now contains a stop string."""
        if self.stopped:
            return True
        self._ids.extend(ids)
        self._detok.push(ids)
        return self._update(self._detok.text)

    def flush(self) -> None:
        """At finish: decodes any bytes the detokenizer held back (an incomplete character)."""
        if not self.stopped and self._ids:
            self._detok.flush()
            self._update(self._detok.text)

    def take_delta(self, finished: bool) -> str:
        if finished or self.stopped:
            limit = len(self._text)
        else:
            limit = max(self._released, len(self._text) - self._hold)
        delta = self._text[self._released:limit]
        self._released = limit
        return delta

    def _update(self, text: str) -> bool:
        # A match can start at most len(stop) - 1 characters before the newly decoded text.
        start = max(0, len(self._text) - self._hold)
        best: tuple[int, int] | None = None
        for s in self._stop:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, len(s))
        if best is not None:
            text = text[:best[0] + (best[1] if self._include_stop else 0)]
            self.stopped = True
        self._text = text
        return self.stopped
