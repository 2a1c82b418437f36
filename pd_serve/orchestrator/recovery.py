"""Bookkeeping of failures and their recovery: one event per lost instance, from detection (its
registry session ended, or its health checks failed, or the operator replaced it) through the
assignment of a replacement to the moment the replacement is listed in the scenario's meta
info. Time to recover = that moment minus detection.

Lifecycle: `RecoveryLog()`; `open(...)` when the orchestrator detects the loss; `note_assign`
for every assignment it writes (the first one to the same scenario and role becomes the
replacement of the oldest open event); `note_serving(scenario, role, ids, now)` after each
meta publication closes events whose replacement is serving.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Recovery:
    failed: str
    role: str
    scenario: str
    reason: str
    detected_at: float  # unix time
    replacement: str | None = None
    recovery_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RecoveryLog:
    def __init__(self, keep: int = 100) -> None:
        self.events: list[Recovery] = []
        self.keep = keep
        self.failures = 0

    def open(self, failed: str, role: str, scenario: str, reason: str,
             now: float | None = None) -> Recovery:
        ev = Recovery(failed, role, scenario, reason, time.time() if now is None else now)
        self.events.append(ev)
        self.failures += 1
        del self.events[:-self.keep]
        return ev

    def note_assign(self, instance: str, role: str | None, scenario: str | None) -> None:
        for ev in self.events:
            if ev.replacement is None and (ev.role, ev.scenario) == (role, scenario):
                ev.replacement = instance
                return

    def note_serving(self, scenario: str, role: str, serving: set[str],
                     now: float | None = None) -> list[Recovery]:
        """Closes open events of (scenario, role) whose replacement is serving; returns them."""
        now = time.time() if now is None else now
        done = []
        for ev in self.events:
            if (ev.recovery_s is None and (ev.scenario, ev.role) == (scenario, role)
                    and ev.replacement in serving):
                ev.recovery_s = now - ev.detected_at
                done.append(ev)
        return done

    def to_json(self) -> list[dict[str, Any]]:
        return [ev.to_json() for ev in self.events]
