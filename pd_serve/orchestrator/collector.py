"""Collects finished-request samples from every gateway registered under /pd/gateways (their
`GET /stats/samples?since=N` cursor API) into a per-scenario window, and summarises it: TTFT,
TPOT, E2E percentiles, the T_p/E2E share, TTFT-SLO success and throughput. The online adjuster
and the operator's status read from here.

Lifecycle: `SampleCollector(window_s)`; `await poll(client, gateway_urls)` every second or so
(a gateway that does not answer is skipped; a restarted one is re-read from its start);
`take_fresh(scenario)` hands each new sample to the adjuster once;
`window(scenario, now, seconds)` and `summary(scenario, now)` at any time.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import httpx

from pd_serve.gateway.metrics import percentiles

log = logging.getLogger(__name__)


class SampleCollector:
    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.cursors: dict[str, int] = {}
        self.samples: dict[str, deque[dict[str, Any]]] = {}
        self.fresh: dict[str, list[dict[str, Any]]] = {}  # not yet taken by the adjuster
        self.total = 0

    async def poll(self, client: httpx.AsyncClient, gateways: list[str]) -> None:
        for url in gateways:
            since = self.cursors.get(url, 0)
            try:
                r = await client.get(f"{url}/stats/samples", params={"since": since},
                                     timeout=2.0)
                r.raise_for_status()
                body = r.json()
                batch, nxt = list(body["samples"]), int(body["next"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                log.debug("samples from %s: %s", url, exc)
                continue
            self.cursors[url] = nxt
            for s in batch:
                if isinstance(s, dict) and isinstance(s.get("scenario"), str):
                    self.samples.setdefault(s["scenario"], deque()).append(s)
                    self.fresh.setdefault(s["scenario"], []).append(s)
                    self.total += 1
        self._trim(time.time())

    def take_fresh(self, scenario: str) -> list[dict[str, Any]]:
        """Samples of `scenario` collected since the last call (each is returned once)."""
        return self.fresh.pop(scenario, [])

    def _trim(self, now: float) -> None:
        for q in self.samples.values():
            while q and now - float(q[0].get("finished_at", now)) > self.window_s:
                q.popleft()

    def window(self, scenario: str, now: float, seconds: float) -> list[dict[str, Any]]:
        """Samples of `scenario` finished in the last `seconds` (unix clock `now`)."""
        return [s for s in self.samples.get(scenario, ())
                if now - float(s.get("finished_at", 0.0)) <= seconds]

    def summary(self, scenario: str, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        win = self.window(scenario, now, self.window_s)
        ok = [s for s in win if s.get("outcome") == "finished"]
        ttft = [s["ttft_s"] for s in ok if s.get("ttft_s") is not None]
        e2e = [s["e2e_s"] for s in ok if s.get("e2e_s") is not None]
        judged = [s["ttft_slo_met"] for s in win if s.get("ttft_slo_met") is not None
                  and s.get("outcome") != "cancelled"]
        span = (now - min(float(s["finished_at"]) for s in win)) if win else 0.0
        return {
            "requests": len(win), "window_s": self.window_s,
            "ttft": percentiles(ttft),
            "tpot": percentiles(s["tpot_s"] for s in ok if s.get("tpot_s") is not None),
            "e2e": percentiles(e2e),
            "tp_share": (sum(ttft) / sum(e2e)) if ttft and e2e and sum(e2e) > 0 else None,
            "slo_success": (sum(bool(x) for x in judged) / len(judged)) if judged else None,
            "throughput_rps": (len(ok) / max(span, 1.0)) if ok else None,
            "failed": sum(1 for s in win if s.get("outcome") not in ("finished", "cancelled")),
        }
