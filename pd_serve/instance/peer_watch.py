"""Prefill's watch on its decode peers: probes GET /health of the peers holding its slots (and of
suspect and dead ones) and reports deaths and revivals; the policy is admission.PeerHealth.

Lifecycle:
1. `PeerWatch(pd, watched, on_dead)`: nothing runs; `start()` starts one probe loop task;
2. every `peer_probe_interval_s` the loop probes the due peers concurrently (a non-200 answer or
   none within `peer_probe_timeout_s` is a failure); a peer turning dead calls `on_dead(peer)`,
   which frees the slots handed to it; a dead peer answering again is chosen again;
3. `failed(peer)` records a failed request to a peer (a suspect: probed from then on);
4. `stop()` cancels the loop and closes its HTTP client.
The watch holds no slots or buffers; `on_dead` (the prefill role) frees them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import httpx

from pd_serve.config import PDConfig
from pd_serve.instance.admission import PeerHealth

log = logging.getLogger(__name__)


class PeerWatch:
    def __init__(self, pd: PDConfig, watched: Callable[[], Iterable[str]],
                 on_dead: Callable[[str], None]) -> None:
        self.health = PeerHealth(pd.peer_probe_failures, pd.peer_probe_interval_s)
        self.interval_s = pd.peer_probe_interval_s
        self._watched = watched
        self._on_dead = on_dead
        self._http = httpx.AsyncClient(timeout=pd.peer_probe_timeout_s)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._http.aclose()

    def alive(self, peers: Sequence[str]) -> list[str]:
        return self.health.alive(peers)

    def failed(self, peer: str) -> None:
        self._apply(peer, self.health.record(peer, False))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                due = self.health.take_due(self._watched(), time.monotonic())
                results = await asyncio.gather(*(self._probe(p) for p in due))
                for peer, ok in zip(due, results, strict=True):
                    self._apply(peer, self.health.record(peer, ok))
            except Exception:  # the watch must outlive any one bad round
                log.exception("decode peer probe round failed")

    async def _probe(self, peer: str) -> bool:
        try:
            r = await self._http.get(f"{peer}/health")
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def _apply(self, peer: str, change: str | None) -> None:
        if change == "dead":
            log.warning("decode peer %s is dead (%d failures in a row); not chosen until it "
                        "answers /health again", peer, self.health.failures_to_dead)
            self._on_dead(peer)
        elif change == "alive":
            log.warning("decode peer %s answers /health again; chosen again", peer)
