"""Step trace: one JSON line per engine step of a serving process (what ran, when, how long),
for latency profiles measured on real runs (`pd-serve sim profile-steps`, read by
pd_serve.sim.steps) and for diagnosis.

Format (JSONL; `server.step_trace_dir` turns it on, one file per engine,
`steps-<role>-<pid>.jsonl`):
* line 1, the header: {"schema": "pd-serve/steps/v1", "role", "pid", "started"};
* then per step that computed something:
  {"t": wall-clock start (time.time(), s), "s": the step's own seconds, "idle": whether the
  engine thread waited for work since the previous step, "kind": "prefill" | "decode",
  "chunks": [[prior tokens, new tokens], ...] (prefill) or "ctx": [context per sequence, ...]
  (decode: the tokens each sequence attends over)}.

A step's *period* is from its start to the next step's start when the engine thread did not
wait in between: the step plus everything the engine thread did before the next one (adding
requests, hand-off calls, handing outputs to the event loop, waiting for the GIL). That is the
time a simulator step must last for the instance to keep the real pace.

Writing never fails the engine: an I/O error is logged once and the trace stops. Lines are
buffered and flushed at most every `flush_s` seconds, and on close.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)
SCHEMA = "pd-serve/steps/v1"
Batch = tuple[str, list[Any]]  # ("prefill", [[prior, new], ...]) | ("decode", [ctx, ...])


class StepTrace:
    """Appends one engine's steps to a JSONL file; used by the engine thread only."""

    def __init__(self, path: str | Path, role: str, flush_s: float = 1.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] | None = self.path.open("a", encoding="utf-8")
        self._flush_s = flush_s
        self._last_flush = time.monotonic()
        self._write({"schema": SCHEMA, "role": role, "pid": os.getpid(),
                     "started": time.time()})

    @classmethod
    def in_dir(cls, directory: str | Path, role: str) -> StepTrace:
        return cls(Path(directory) / f"steps-{role}-{os.getpid()}.jsonl", role)

    def record(self, start: float, seconds: float, idle: bool, batch: Batch) -> None:
        kind, shape = batch
        key = "chunks" if kind == "prefill" else "ctx"
        self._write({"t": round(start, 6), "s": round(seconds, 7), "idle": idle, "kind": kind,
                     key: shape})

    def _write(self, obj: dict[str, Any]) -> None:
        if self._f is None:
            return
        try:
            self._f.write(json.dumps(obj, separators=(",", ":")) + "\n")
            now = time.monotonic()
            if now - self._last_flush >= self._flush_s:
                self._f.flush()
                self._last_flush = now
        except (OSError, ValueError) as exc:
            log.error("step trace %s: writing failed, tracing stops (%s)", self.path, exc)
            self._close_quietly()

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.flush()
            except OSError as exc:
                log.error("step trace %s: final flush failed (%s)", self.path, exc)
            self._close_quietly()

    def _close_quietly(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
