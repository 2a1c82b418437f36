"""Per-request timelines at the gateway (arrival, offers with accept/reject, first token, hand-off,
tokens, finish or termination) and the bounded ring that keeps the latest for inspection.

Lifecycle:
1. `Timeline(request_id, scenario, arrival)` when a request arrives;
2. the forwarding and relay code appends events (`offer`, `first_token`, `handoff`, `tokens`);
3. `finish(outcome, now)` once, when the request ends (finished, terminated, failed, cancelled);
4. `TimelineRing.add` keeps it; the oldest is dropped beyond the capacity.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

OK, TERMINATED, FAILED, CANCELLED = "finished", "terminated", "failed", "cancelled"


@dataclass
class Timeline:
    """Times are seconds on the gateway's monotonic clock; `to_json` makes them relative."""

    request_id: str
    scenario: str
    arrival: float
    prompt_tokens: int = 0
    deadline: float | None = None
    offers: list[tuple[float, str, str]] = field(default_factory=list)  # (t, instance, answer)
    first_token: float | None = None
    handoff: tuple[float, str] | None = None  # (t, decode url)
    tokens: list[tuple[float, int]] = field(default_factory=list)  # (t, completion tokens)
    end: float | None = None
    outcome: str | None = None
    detail: str | None = None

    def offer(self, t: float, instance: str, answer: str) -> None:
        self.offers.append((t, instance, answer))

    def token(self, t: float, completion_tokens: int) -> None:
        if self.first_token is None:
            self.first_token = t
        self.tokens.append((t, completion_tokens))

    def finish(self, outcome: str, now: float, detail: str | None = None) -> None:
        if self.outcome is None:
            self.outcome, self.end, self.detail = outcome, now, detail

    @property
    def rejections(self) -> int:
        return sum(1 for _, _, answer in self.offers if answer != "accepted")

    @property
    def completion_tokens(self) -> int:
        return self.tokens[-1][1] if self.tokens else 0

    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def e2e(self) -> float | None:
        return None if self.end is None or self.outcome != OK else self.end - self.arrival

    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        n = self.completion_tokens
        if self.first_token is None or self.end is None or self.outcome != OK or n < 2:
            return None
        return (self.tokens[-1][0] - self.first_token) / (n - 1)

    def in_slo(self) -> bool | None:
        """First token by the deadline (None while it has neither)."""
        if self.first_token is not None and self.deadline is not None:
            return self.first_token <= self.deadline
        return False if self.outcome is not None else None

    def to_json(self) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.arrival, 6)
        return {
            "request_id": self.request_id, "scenario": self.scenario,
            "prompt_tokens": self.prompt_tokens, "deadline_s": rel(self.deadline),
            "offers": [{"t": rel(t), "instance": i, "answer": a} for t, i, a in self.offers],
            "first_token_s": rel(self.first_token),
            "handoff": None if self.handoff is None else
            {"t": rel(self.handoff[0]), "decode_url": self.handoff[1]},
            "tokens": [{"t": rel(t), "completion_tokens": n} for t, n in self.tokens],
            "end_s": rel(self.end), "outcome": self.outcome, "detail": self.detail,
            "ttft_slo_met": self.in_slo(),
        }


class TimelineRing:
    """The latest `capacity` timelines by request id (live ones included)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"timeline capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, Timeline] = OrderedDict()

    def add(self, timeline: Timeline) -> None:
        self._items[timeline.request_id] = timeline
        self._items.move_to_end(timeline.request_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> Timeline | None:
        return self._items.get(request_id)

    def __len__(self) -> int:
        return len(self._items)

    def recent(self, n: int) -> list[Timeline]:
        return list(self._items.values())[-n:] if n > 0 else []
