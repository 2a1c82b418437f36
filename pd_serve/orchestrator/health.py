"""Health checks of registered instances (GET /health, as MLOps polls each instance in the
paper): consecutive failures are counted only for instances that answered at least once, so a
process still starting is not declared failed; `failures` consecutive failures report it.

Lifecycle: `HealthChecker(failures, timeout_s)`; `await check(client, instances)` each interval
returns the ids that just crossed the threshold, with the reason; `forget(id)` when an
instance leaves.
"""

from __future__ import annotations

import asyncio

import httpx


class HealthChecker:
    def __init__(self, failures: int, timeout_s: float) -> None:
        self.failures = failures
        self.timeout_s = timeout_s
        self.counts: dict[str, int] = {}
        self.seen_ok: set[str] = set()
        self.last_error: dict[str, str] = {}

    async def check(self, client: httpx.AsyncClient,
                    instances: dict[str, str]) -> list[tuple[str, str]]:
        """`instances`: id -> url. Returns [(id, reason)] of instances that just failed."""
        ids = list(instances)
        results = await asyncio.gather(*(self._probe(client, instances[i]) for i in ids))
        crossed = []
        for iid, err in zip(ids, results):
            if err is None:
                self.counts[iid] = 0
                self.seen_ok.add(iid)
                continue
            self.last_error[iid] = err
            if iid not in self.seen_ok:
                continue
            self.counts[iid] = self.counts.get(iid, 0) + 1
            if self.counts[iid] == self.failures:
                crossed.append((iid, f"health check failed {self.failures} times: {err}"))
        for gone in set(self.counts) - set(ids):
            self.forget(gone)
        return crossed

    async def _probe(self, client: httpx.AsyncClient, url: str) -> str | None:
        try:
            r = await client.get(f"{url}/health", timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return None if r.status_code == 200 else f"HTTP {r.status_code}"

    def forget(self, iid: str) -> None:
        self.counts.pop(iid, None)
        self.seen_ok.discard(iid)
        self.last_error.pop(iid, None)
