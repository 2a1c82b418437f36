"""Pure policies of an instance: what a prefill does with an offered request (start it in a
free slot, reject it, or, only when the offer asks for the baseline local FIFO, queue it), the
TTFT deadline check before and after prefill, the choice of a decode peer (fewest hand-offs in
flight first, dead peers never) and the liveness of decode peers from probe results (state +
clock in, decisions out; no I/O, so a simulator can drive it with its own clock).

SlotPool lifecycle: `acquire()` returns a free slot index or None (the caller answers 429);
the holder calls `release(slot)` exactly once, when the slot's hand-off is done, failed or timed
out. Releasing a free slot is an error (a double free is a bug, not a no-op).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Offer = Literal["start", "queue", "deadline_exceeded", "draining", "no_decode_peer",
                "no_free_slot", "queue_full"]
REJECTIONS: tuple[Offer, ...] = ("draining", "no_decode_peer", "no_free_slot",
                                 "queue_full")  # answered with 429


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

    @property
    def free(self) -> int:
        return len(self._free)


def past_deadline(deadline: float | None, now: float) -> bool:
    """True when a TTFT budget ending at `deadline` (same clock as `now`; None: no budget) has
    run out. Before prefill: the request must not start; after: its first token is late."""
    return deadline is not None and now >= deadline


def decide_offer(*, free_slots: int, queued: int, queue_max: int, wants_queue: bool,
                 draining: bool, expired: bool, has_decode: bool = True) -> Offer:
    """What a prefill instance does with one offered request.

    Draining instances refuse everything (the gateway moves on), and so does an instance with no
    live decode peer (it could prefill but never hand off: the request waits at the gateway
    instead of failing after its first token); a request whose budget is gone ends at once
    without a slot; a free slot is taken only when nobody queues ahead (FIFO);
    otherwise the request is rejected (on-demand forwarding: it waits at the gateway) unless it
    asked for the local queue and the queue has room.
    """
    if draining:
        return "draining"
    if not has_decode:
        return "no_decode_peer"
    if expired:
        return "deadline_exceeded"
    if free_slots > 0 and queued == 0:
        return "start"
    if not wants_queue:
        return "no_free_slot"
    if queued >= queue_max:
        return "queue_full"
    return "queue"


def rank_decode_peers(peers: Sequence[str], in_flight: Mapping[str, int],
                      start: int = 0) -> list[str]:
    """Peers ordered by this prefill's hand-offs in flight, ties in configured order rotated to
    begin at index `start` (callers advance it on every hand-off). Without the rotation every
    prefill instance found an idle peer among the first `b_p` (it never has more hand-offs in
    flight) and decode instances past the `b_p`-th got no work (found by the simulator)."""
    n = len(peers)
    order = {p: i for i, p in enumerate(peers)}
    return sorted(peers, key=lambda p: (in_flight.get(p, 0), (order[p] - start) % max(n, 1)))


@dataclass
class _PeerState:
    failures: int = 0  # consecutive
    dead: bool = False
    last_probe: float = float("-inf")


class PeerHealth:
    """Liveness of decode peers, decided from probe (or request) outcomes.

    Lifecycle of one peer:
    1. unknown peers are alive; `take_due(watched, now)` names the peers to probe now: those the
       caller waits on (pending hand-offs), suspects (a recent failure) and dead ones, each at
       most once per `interval_s`;
    2. `record(peer, ok)` after each probe: `failures_to_dead` consecutive failures turn it dead
       (returns "dead" once: the caller frees what it handed to that peer), a success resets
       the count and revives a dead peer (returns "alive" once);
    3. `alive(peers)` filters dead ones out of selection; `forget(keep)` drops removed peers.
    """

    def __init__(self, failures_to_dead: int, interval_s: float) -> None:
        if failures_to_dead <= 0 or interval_s <= 0:
            raise ValueError("failures_to_dead and interval_s must be positive")
        self.failures_to_dead = failures_to_dead
        self.interval_s = interval_s
        self._peers: dict[str, _PeerState] = {}

    def take_due(self, watched: Iterable[str], now: float) -> list[str]:
        """Peers to probe at `now` (marked probed); in first-seen order."""
        wanted = dict.fromkeys(watched)
        wanted.update((p, None) for p, s in self._peers.items() if s.dead or s.failures)
        due = []
        for peer in wanted:
            state = self._peers.setdefault(peer, _PeerState())
            if now - state.last_probe >= self.interval_s:
                state.last_probe = now
                due.append(peer)
        return due

    def record(self, peer: str, ok: bool) -> str | None:
        """One outcome; "dead" or "alive" when the peer's state flips, else None."""
        state = self._peers.setdefault(peer, _PeerState())
        if ok:
            state.failures = 0
            if state.dead:
                state.dead = False
                return "alive"
            return None
        state.failures += 1
        if not state.dead and state.failures >= self.failures_to_dead:
            state.dead = True
            return "dead"
        return None

    def is_dead(self, peer: str) -> bool:
        state = self._peers.get(peer)
        return state is not None and state.dead

    def alive(self, peers: Sequence[str]) -> list[str]:
        return [p for p in peers if not self.is_dead(p)]

    def dead(self) -> list[str]:
        return [p for p, s in self._peers.items() if s.dead]

    def forget(self, keep: Iterable[str]) -> None:
        """Drops the state of peers not in `keep` (removed from the configured peers)."""
        kept = set(keep)
        for peer in [p for p in self._peers if p not in kept]:
            del self._peers[peer]
