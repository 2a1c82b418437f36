"""HTTP face of one instance: stateless until `POST /internal/assign` (or `--role`) gives it a
role, then the prefill or decode routes of pd_serve.instance.messages.

Lifecycle:
1. `build_app(cfg, self_url, role, decode_peers)`: nothing loaded; with `role` the ASGI startup
   assigns it before the server accepts connections;
2. assign: loads the model on a worker thread (Runtime.build), creates the role object; a second
   assign with the same role updates group and decode peers, another role answers 409;
3. `POST /internal/drain` makes the role refuse new work with 429 `draining` while queued,
   running and handed-off work finishes (`/stats` `idle`); `/internal/undrain` reverses it;
4. ASGI shutdown stops the role object and closes the runtime (engine thread, KV, runner).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pd_serve.api.errors import (
    APIError,
    bad_request,
    install_error_handlers,
)
from pd_serve.api.http import SSE_HEADERS, parse_body
from pd_serve.config import ServeConfig
from pd_serve.instance.decode import DecodeRole
from pd_serve.instance.messages import (
    AbortRequest,
    AssignRequest,
    HandoffDone,
    HandoffRequest,
    PrefillRequest,
)
from pd_serve.instance.prefill import PrefillRole
from pd_serve.instance.prefill_queue import Ticket
from pd_serve.instance.runtime import Runtime


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
    """The role state of this process (one event loop; no locks needed besides `_assigning`)."""

    def __init__(self, cfg: ServeConfig, self_url: str) -> None:
        self.cfg = cfg
        self.self_url = self_url
        self.role: str | None = None
        self.group: str | None = None
        self.runtime: Runtime | None = None
        self.prefill: PrefillRole | None = None
        self.decode: DecodeRole | None = None
        self.draining = False
        self._assigning = asyncio.Lock()

    async def assign(self, msg: AssignRequest) -> dict[str, Any]:
        async with self._assigning:
            if self.role is not None and self.role != msg.role:
                raise APIError(409, f"this instance is already {self.role}; re-roling is not "
                               "supported yet", code="role_conflict")
            if self.role is None:
                self.runtime = await asyncio.to_thread(Runtime.build, self.cfg, msg.role)
                if msg.role == "prefill":
                    self.prefill = PrefillRole(self.runtime, self.cfg.pd, self.self_url, [])
                    self.prefill.start()
                else:
                    self.decode = DecodeRole(self.runtime, self.cfg.pd)
                    self.decode.start()
                self.role = msg.role
                self.drain(self.draining)
            self.group = msg.group
            if self.prefill is not None:
                self.prefill.set_peers([p.rstrip("/") for p in msg.decode_peers])
            return {"role": self.role, "group": self.group, "decode_peers": msg.decode_peers}

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
        out: dict[str, Any] = {"role": self.role, "group": self.group,
                               "draining": self.draining, "idle": self.idle}
        if self.runtime is not None:
            out["engine"] = self.runtime.engine.stats()
        if self.prefill is not None:
            out.update(await self.prefill.stats())
        if self.decode is not None:
            out.update(await self.decode.stats())
        return out


def build_app(cfg: ServeConfig, self_url: str, role: str | None = None,
              decode_peers: list[str] | None = None) -> FastAPI:
    inst = Instance(cfg, self_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if role is not None:
            await inst.assign(AssignRequest(role=role,  # type: ignore[arg-type]
                                            decode_peers=decode_peers or []))
        yield
        await inst.close()

    app = FastAPI(title="pd-serve instance", lifespan=lifespan)
    install_error_handlers(app)
    _routes(app, inst)
    return app


def _routes(app: FastAPI, inst: Instance) -> None:
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

    @app.post("/internal/assign")
    async def assign(request: Request) -> dict[str, Any]:
        return await inst.assign(await parse_body(request, AssignRequest))

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

    @app.post("/internal/drain")
    async def drain() -> dict[str, Any]:
        return inst.drain(True)

    @app.post("/internal/undrain")
    async def undrain() -> dict[str, Any]:
        return inst.drain(False)

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


