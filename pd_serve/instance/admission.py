"""Pure policies of an instance: prefill batch slots (accept or reject, never queue) and the
choice of a decode peer (fewest hand-offs in flight first).

SlotPool lifecycle: `acquire()` returns a free slot index or None (the caller answers 429);
the holder calls `release(slot)` exactly once, when the slot's hand-off is done, failed or timed
out. Releasing a free slot is an error (a double free is a bug, not a no-op).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class SlotPool:
    """`size` batch slots of one prefill instance."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"slot pool size must be positive, got {size}")
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # pop() hands out slot 0 first

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.size or slot in self._free:
            raise AssertionError(f"slot {slot} released twice or out of range")
        self._free.append(slot)

    @property
    def busy(self) -> int:
        return self.size - len(self._free)


def rank_decode_peers(peers: Sequence[str], in_flight: Mapping[str, int]) -> list[str]:
    """Peers ordered by hand-offs in flight, ties in the configured order."""
    order = {p: i for i, p in enumerate(peers)}
    return sorted(peers, key=lambda p: (in_flight.get(p, 0), order[p]))
