"""The gateway's operator routes (no API key): /health, /stats (open streams, rejections and
per-scenario metrics as JSON), /stats/samples?since=N (finished requests after cursor N, for the
orchestrator), /metrics (Prometheus text) and /debug/requests[/{id}] (request timelines from the
bounded ring)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from pd_serve.api.errors import APIError
from pd_serve.api.http import PROMETHEUS_TYPE
from pd_serve.gateway.forward import Forwarder
from pd_serve.gateway.metrics import GatewayMetrics
from pd_serve.gateway.samples import SampleLog
from pd_serve.gateway.timeline import TimelineRing


def operator_router(fwd: Forwarder, ring: TimelineRing, metrics: GatewayMetrics,
                    samples: SampleLog) -> APIRouter:
    router = APIRouter()

    @router.get("/stats/samples")
    async def finished(since: int = 0, limit: int = 10000) -> dict[str, Any]:
        return samples.since(since, max(1, min(limit, 100000)))

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "prefill_instances": fwd.urls}

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        scenarios = {name: {"instances": list(sc.instances), "policy": sc.policy,
                            "ttft_slo": [{"max_prompt_tokens": b.max_prompt_tokens,
                                          "deadline_s": b.deadline_s} for b in sc.ttft_slo],
                            "batch_forwarding_target": fwd.states[name].target}
                     for name, sc in fwd.scenarios.items()}
        return {"open_streams": dict(fwd.open_streams), "prefill_rejections": fwd.rejections,
                "scenarios": scenarios, "metrics": metrics.snapshot()}

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.prometheus(), media_type=PROMETHEUS_TYPE)

    @router.get("/debug/requests")
    async def recent(n: int = 20) -> dict[str, Any]:
        return {"requests": [tl.to_json() for tl in ring.recent(max(0, min(n, ring.capacity)))]}

    @router.get("/debug/requests/{request_id}")
    async def one(request_id: str) -> dict[str, Any]:
        tl = ring.get(request_id)
        if tl is None:
            raise APIError(404, f"no timeline for request `{request_id}` (it is unknown or "
                           f"older than the last {ring.capacity})", param="request_id",
                           code="not_found")
        return tl.to_json()

    return router
