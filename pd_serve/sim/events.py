"""The simulator's event loop: a heap of timed callbacks on a virtual clock.

Lifecycle:
1. `EventLoop()`; `at(t, fn, arg)` / `after(dt, fn, arg)` schedule `fn(arg)`;
2. `run(until)` pops events in time order (ties in the order they were scheduled), sets `now`
   and calls them; callbacks schedule further events;
3. `events` counts the callbacks run so far.
Nothing is ever removed from the heap: a caller that may want to cancel keeps a token and its
callback ignores a stale one (cheaper than deleting heap entries).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

Callback = Callable[[Any], None]


class EventLoop:
    __slots__ = ("now", "events", "_heap", "_seq")

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self._heap: list[tuple[float, int, Callback, Any]] = []
        self._seq = 0

    def at(self, t: float, fn: Callback, arg: Any = None) -> None:
        """Runs `fn(arg)` at virtual time `t` (not before `now`)."""
        if not t >= self.now:  # also catches NaN
            raise ValueError(f"event at {t!r} is before the clock ({self.now!r})")
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    def after(self, dt: float, fn: Callback, arg: Any = None) -> None:
        """Runs `fn(arg)` `dt` (>= 0) seconds from now."""
        self._seq += 1
        heapq.heappush(self._heap, (self.now + dt, self._seq, fn, arg))

    @property
    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float = math.inf) -> int:
        """Runs events up to and including time `until`; returns how many ran."""
        heap, pop = self._heap, heapq.heappop
        ran = 0
        while heap:
            if heap[0][0] > until:
                break
            t, _, fn, arg = pop(heap)
            self.now = t
            fn(arg)
            ran += 1
        self.events += ran
        if until != math.inf and until > self.now:
            self.now = until
        return ran
