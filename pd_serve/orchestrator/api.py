"""The orchestrator's HTTP API (the console's client is pd_serve.console.client): /health,
/status, /metrics (Prometheus), operator actions under /scenarios/{name}/... and
/instances/{id}/..., /rollout; with an embedded registry also its /registry routes.

Lifecycle: `build_orchestrator_app(orch, self_url, store)`; ASGI startup starts the
orchestrator's loops, shutdown stops them and closes the registry client (and the embedded
store's dispatcher).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from pd_serve.api.errors import install_error_handlers
from pd_serve.api.http import PROMETHEUS_TYPE, read_object
from pd_serve.orchestrator import control
from pd_serve.orchestrator.embedded import EmbeddedStore
from pd_serve.orchestrator.registry_routes import registry_router
from pd_serve.orchestrator.service import Orchestrator


def build_orchestrator_app(orch: Orchestrator, self_url: str,
                           store: EmbeddedStore | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await orch.start(self_url)
        yield
        await orch.stop()
        orch.registry.close()
        if store is not None:
            store.shutdown()

    app = FastAPI(title="pd-serve orchestrator", lifespan=lifespan)
    install_error_handlers(app)
    if store is not None:
        app.include_router(registry_router(store))

    app.include_router(_view_router(orch))
    app.include_router(_action_router(orch))
    return app


def _view_router(orch: Orchestrator) -> APIRouter:
    """Health, the status report, Prometheus metrics."""
    router = APIRouter()
    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "registry_ok": orch.registry_ok}

    @router.get("/status")
    async def status() -> dict[str, Any]:
        return control.status(orch)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(orch.metrics.render(), media_type=PROMETHEUS_TYPE)

    return router


def _action_router(orch: Orchestrator) -> APIRouter:
    """Operator actions (pd_serve.orchestrator.control), as the console calls them."""
    router = APIRouter()

    @router.post("/scenarios/{name}/ratio")
    async def ratio(name: str, request: Request) -> dict[str, Any]:
        body = await read_object(request)
        return await control.set_target(orch, name, body.get("n_p"), body.get("n_d"))

    @router.post("/scenarios/{name}/scale")
    async def scale(name: str, request: Request) -> dict[str, Any]:
        body = await read_object(request)
        return await control.scale(orch, name, body.get("instances"))

    @router.post("/scenarios/{name}/profile")
    async def profile(name: str, request: Request) -> dict[str, Any]:
        from pd_serve.orchestrator.adjusting import profile_and_plan

        return await profile_and_plan(orch, name, await read_object(request))

    @router.post("/instances/{iid}/drain")
    async def drain(iid: str) -> dict[str, Any]:
        return await control.drain(orch, iid, True)

    @router.post("/instances/{iid}/undrain")
    async def undrain(iid: str) -> dict[str, Any]:
        return await control.drain(orch, iid, False)

    @router.post("/instances/{iid}/replace")
    async def replace(iid: str) -> dict[str, Any]:
        return await control.replace(orch, iid)

    @router.post("/rollout")
    async def rollout(request: Request) -> dict[str, Any]:
        body = await read_object(request)
        return await control.rollout(orch, body.get("model_path"))

    return router
