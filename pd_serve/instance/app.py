"""HTTP face of one instance: stateless until `POST /internal/assign` (or `--role`) gives it a
role, then the prefill or decode routes of pd_serve.instance.messages.

Lifecycle:
1. `build_app(cfg, self_url, role, decode_peers)`: nothing loaded; with `role` the ASGI startup
   assigns it before the server accepts connections;
2. assign: loads the model on a worker thread (Runtime.build), creates the role object; a second
   assign with the same role updates group and decode peers; another role drains the instance,
   waits until its work is done and switches the role in place (the model stays loaded); another
   model path reloads; `release` returns it to stateless (pd_serve.instance.agent drives these
   from the registry when the orchestrator assigns);
3. `POST /internal/drain` makes the role refuse new work with 429 `draining` while queued,
   running and handed-off work finishes (`/stats` `idle`); `/internal/undrain` reverses it;
4. ASGI shutdown stops the role object and closes the runtime (engine thread, KV, runner).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pd_serve.api.errors import (
    APIError,
    bad_request,
    install_error_handlers,
)
from pd_serve.api.http import PROMETHEUS_TYPE, SSE_HEADERS, parse_body
from pd_serve.config import ServeConfig
from pd_serve.instance.agent import RegistryAgent
from pd_serve.instance.decode import DecodeRole
from pd_serve.instance.messages import (
    AbortRequest,
    AssignRequest,
    HandoffDone,
    HandoffRequest,
    PrefillRequest,
)
from pd_serve.instance.metrics import InstanceMetrics
from pd_serve.instance.prefill import PrefillRole
from pd_serve.instance.prefill_queue import Ticket
from pd_serve.instance.runtime import Runtime
from pd_serve.orchestrator.registry import Registry

log = logging.getLogger(__name__)


class _TicketedStream(StreamingResponse):
    """SSE response whose body holds a prefill slot or queue place (a Ticket): if the client
    leaves before the body starts, the body's own cleanup never runs, so the ticket is
    abandoned here once the response is over (a no-op when the body claimed it)."""

    def __init__(self, body: AsyncIterator[str], ticket: Ticket) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._ticket = ticket

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._ticket.abandon()


class Instance:
    """The role state of this process (one event loop; role changes serialise on `_assigning`).
    Who frees what: `_stop_role` stops the role object after its work drained (or the drain
    timed out: the role's stop then fails what is left); `close`/`release` close the runtime."""

    def __init__(self, cfg: ServeConfig, self_url: str) -> None:
        self.cfg = cfg
        self.self_url = self_url
        self.role: str | None = None
        self.group: str | None = None
        self.model_path: str = cfg.model.path
        self.runtime: Runtime | None = None
        self.prefill: PrefillRole | None = None
        self.decode: DecodeRole | None = None
        self.draining = False
        self.state = "stateless"  # stateless | loading | ready | switching | releasing
        self.switches = 0
        self.metrics = InstanceMetrics()
        self._assigning = asyncio.Lock()

    async def assign(self, msg: AssignRequest) -> dict[str, Any]:
        """Takes the role (loading the model), switches role in place (drain, wait for idle,
        swap the KV side, rejoin) or reloads for a new model path; same role: updates group
        and decode peers."""
        async with self._assigning:
            model_path = msg.model_path or self.model_path
            if self.runtime is not None and model_path != self.model_path:
                await self._release_locked()
            if self.role is not None and self.role != msg.role:
                self.state = "switching"
                await self._stop_role()
                assert self.runtime is not None
                await asyncio.to_thread(self.runtime.switch_role, msg.role)
                self._start_role(msg.role)
                self.switches += 1
            elif self.role is None:
                self.state = "loading"
                self.model_path = model_path
                cfg = dataclasses.replace(
                    self.cfg, model=dataclasses.replace(self.cfg.model, path=model_path))
                try:
                    self.runtime = await asyncio.to_thread(Runtime.build, cfg, msg.role)
                except BaseException:
                    self.state = "stateless"
                    raise
                self._start_role(msg.role)
            self.group = msg.group
            self.state = "ready"
            if self.prefill is not None:
                self.prefill.set_peers([p.rstrip("/") for p in msg.decode_peers])
            return {"role": self.role, "group": self.group, "decode_peers": msg.decode_peers}

    def _start_role(self, role: str) -> None:
        assert self.runtime is not None
        if role in ("prefill", "aggregated"):
            self.prefill = PrefillRole(self.runtime, self.cfg.pd, self.self_url, [],
                                       aggregated=role == "aggregated")
            self.prefill.start()
        else:
            self.decode = DecodeRole(self.runtime, self.cfg.pd)
            self.decode.start()
        self.role = role
        self.drain(self.draining)

    async def _stop_role(self) -> None:
        """Drain, wait until idle (at most orchestrator.drain_timeout_s), stop the role."""
        was_draining = self.draining
        self.drain(True)
        await self.wait_idle(self.cfg.orchestrator.drain_timeout_s)
        for part in (self.prefill, self.decode):
            if part is not None:
                await part.stop()
        self.prefill = self.decode = None
        self.role = None
        self.draining = was_draining

    async def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.idle:
            if time.monotonic() > deadline:
                log.warning("still busy after %.0f s of draining; stopping anyway", timeout_s)
                return False
            await asyncio.sleep(0.05)
        return True

    async def release(self) -> dict[str, Any]:
        """Back to stateless: drain, wait for idle, stop the role, free the model."""
        async with self._assigning:
            await self._release_locked()
            return {"role": None, "state": self.state}

    async def _release_locked(self) -> None:
        if self.runtime is None:
            return
        self.state = "releasing"
        await self._stop_role()
        runtime, self.runtime = self.runtime, None
        await asyncio.to_thread(runtime.close)
        self.group = None
        self.state = "stateless"

    def drain(self, on: bool) -> dict[str, Any]:
        """Drain (`on`) or undrain; the role reads its own flag on every offer."""
        self.draining = on
        for part in (self.prefill, self.decode):
            if part is not None:
                part.draining = on
        return {"draining": on, "idle": self.idle}

    @property
    def idle(self) -> bool:
        return all(part.idle for part in (self.prefill, self.decode) if part is not None)

    async def close(self) -> None:
        for part in (self.prefill, self.decode):
            if part is not None:
                await part.stop()
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.close)

    def need_prefill(self) -> PrefillRole:
        if self.prefill is None:
            raise APIError(409, f"this instance is {self.role or 'not assigned'}, not prefill",
                           code="wrong_role")
        return self.prefill

    def need_decode(self) -> DecodeRole:
        if self.decode is None:
            raise APIError(409, f"this instance is {self.role or 'not assigned'}, not decode",
                           code="wrong_role")
        return self.decode

    async def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "group": self.group, "state": self.state,
                               "draining": self.draining, "idle": self.idle,
                               "model_path": self.model_path, "role_switches": self.switches}
        if self.runtime is not None:
            out["engine"] = self.runtime.engine.stats()
        if self.prefill is not None:
            out.update(await self.prefill.stats())
        if self.decode is not None:
            out.update(await self.decode.stats())
        return out


def build_app(cfg: ServeConfig, self_url: str, role: str | None = None,
              decode_peers: list[str] | None = None,
              registry: Callable[[], Registry] | None = None,
              instance_id: str | None = None) -> FastAPI:
    """With `registry` (a function that connects, raising RegistryError while it cannot) the
    instance registers as `instance_id` and follows its assignment (pd_serve.instance.agent);
    the registry is closed at shutdown."""
    inst = Instance(cfg, self_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if role is not None:
            await inst.assign(AssignRequest(role=role,  # type: ignore[arg-type]
                                            decode_peers=decode_peers or []))
        agent = None
        if registry is not None:
            agent = RegistryAgent(inst, registry, instance_id or self_url,
                                  cfg.orchestrator.report_interval_s)
            agent.start()
        yield
        if agent is not None:
            await agent.stop()
        await inst.close()

    app = FastAPI(title="pd-serve instance", lifespan=lifespan)
    install_error_handlers(app)
    _control_routes(app, inst)
    _serving_routes(app, inst)
    return app


def _control_routes(app: FastAPI, inst: Instance) -> None:
    """Health, statistics, metrics, and the orchestrator's role and drain controls."""

    @app.get("/health")
    async def health() -> JSONResponse:
        if inst.runtime is None:
            return JSONResponse({"status": "ok", "role": None})
        h = inst.runtime.engine.health()
        return JSONResponse({"status": "ok" if h["ok"] else "unhealthy", "role": inst.role, **h},
                            status_code=200 if h["ok"] else 503)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return await inst.stats()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(inst.metrics.render(inst), media_type=PROMETHEUS_TYPE)

    @app.post("/internal/assign")
    async def assign(request: Request) -> dict[str, Any]:
        return await inst.assign(await parse_body(request, AssignRequest))

    @app.post("/internal/release")
    async def release() -> dict[str, Any]:
        return await inst.release()

    @app.post("/internal/drain")
    async def drain() -> dict[str, Any]:
        return inst.drain(True)

    @app.post("/internal/undrain")
    async def undrain() -> dict[str, Any]:
        return inst.drain(False)


def _serving_routes(app: FastAPI, inst: Instance) -> None:
    """The request path: prefill offers, hand-offs and their confirmation, decode streams."""

    @app.post("/internal/prefill", response_model=None)
    async def prefill(request: Request) -> StreamingResponse:
        arrived = time.monotonic()  # deadline_s counts from here
        role = inst.need_prefill()
        msg = await parse_body(request, PrefillRequest)
        _check(lambda: msg.sampling.params())
        body, ticket = role.offer(msg, arrived)
        return _TicketedStream(body, ticket)

    @app.post("/internal/handoff")
    async def handoff(request: Request) -> JSONResponse:
        queued = inst.need_decode().accept(await parse_body(request, HandoffRequest))
        return JSONResponse({"queued": queued}, status_code=202)

    @app.post("/internal/handoff_done")
    async def handoff_done(request: Request) -> dict[str, bool]:
        msg = await parse_body(request, HandoffDone)
        return {"released": inst.need_prefill().handoff_done(msg)}

    @app.get("/internal/stream/{request_id}", response_model=None)
    async def stream(request_id: str) -> StreamingResponse:
        body = await inst.need_decode().attach(request_id)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/internal/abort")
    async def abort(request: Request) -> dict[str, bool]:
        msg = await parse_body(request, AbortRequest)
        if inst.decode is not None:
            return {"aborted": inst.decode.abort(msg.request_id)}
        if inst.runtime is not None:
            inst.runtime.engine.abort_request(msg.request_id)
        return {"aborted": inst.runtime is not None}


def _check(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except ValueError as exc:
        raise bad_request(str(exc), param="sampling") from exc


