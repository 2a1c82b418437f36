"""A posted read of a collective-library transport (`read_batch_async`) and timeout checks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from pd_serve.kv.p2p_peer import P2PPeer
from pd_serve.kv.transport import TransportError


class P2PRead:
    """One posted read batch. `event` (recorded on the pair's transfer stream) lets a compute
    stream wait for it without blocking the host; it also completes when the pair is torn down,
    so trust the bytes only after `wait()` returned. Every read must be waited: its local
    region stays pinned until then."""

    def __init__(self, peer: P2PPeer, event: Any, deadline: float, what: str,
                 on_done: Callable[[bool], None]) -> None:
        self.event = event
        self._peer, self._deadline, self._what = peer, deadline, what
        self._on_done = on_done  # called once with `failed`: unpins, drops a failed pair
        self._error: TransportError | None = None
        self._finished = False

    def wait(self, timeout_s: float | None = None) -> None:
        """Blocks until the bytes landed, up to the read's own deadline or `timeout_s` from
        now. TransportTimeout or TransportError: the pair was torn down (a timeout here ends
        the read too) and dropped, the local region unpinned."""
        if self._finished:
            if self._error is not None:
                raise self._error
            return
        deadline = self._deadline if timeout_s is None else time.monotonic() + positive(timeout_s)
        try:
            self._peer.wait_event(self.event, deadline, self._what)
        except TransportError as exc:
            self._error = exc
            raise
        finally:
            self._finished = True
            self._on_done(self._error is not None)


def positive(timeout_s: float) -> float:
    """`timeout_s` as a float; ValueError unless a positive finite number."""
    if not isinstance(timeout_s, int | float) or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)
