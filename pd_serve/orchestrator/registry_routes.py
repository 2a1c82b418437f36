"""The orchestrator's /registry routes: its embedded store served to instances and gateways in
other processes (their client is pd_serve.orchestrator.http_registry.HttpRegistry).

Routes (JSON; errors in the OpenAI error shape):
* POST   /registry/sessions {"ttl_s"}          -> {"session"}
* POST   /registry/sessions/{sid}/touch         -> {} | 410 session_expired
* DELETE /registry/sessions/{sid}               -> {} (its ephemeral nodes vanish)
* PUT    /registry/node?path=&session=&ephemeral= body: the value -> {}
* GET    /registry/node?path=                   -> {"value"} | 404
* DELETE /registry/node?path=                   -> {}
* GET    /registry/children?path=               -> {"children"}
* GET    /registry/wait?path=&since=&timeout_s= -> {"version"} once the subtree version of
  `path` exceeds `since` (long poll, at most `timeout_s`, capped at MAX_WAIT_S so that a
  graceful shutdown never waits on idle watchers)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from pd_serve.api.errors import APIError, bad_request
from pd_serve.api.http import read_object
from pd_serve.orchestrator.embedded import EmbeddedStore
from pd_serve.orchestrator.registry import RegistryError, check_path

MAX_WAIT_S = 3.0


def _path(path: str) -> str:
    try:
        return check_path(path)
    except ValueError as exc:
        raise bad_request(str(exc), param="path") from exc


def registry_router(store: EmbeddedStore) -> APIRouter:
    router = APIRouter(prefix="/registry")

    @router.post("/sessions")
    async def open_session(request: Request) -> dict[str, Any]:
        body = await read_object(request)
        ttl = body.get("ttl_s", store.session_timeout_s)
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0.1 <= ttl <= 600:
            raise bad_request("ttl_s: expected a number of seconds in [0.1, 600]", param="ttl_s")
        return {"session": store.open_session(float(ttl))}

    @router.post("/sessions/{sid}/touch")
    async def touch(sid: str) -> dict[str, Any]:
        try:
            store.touch(sid)
        except RegistryError as exc:
            raise APIError(410, str(exc), code="session_expired") from exc
        return {}

    @router.delete("/sessions/{sid}")
    async def close_session(sid: str) -> dict[str, Any]:
        store.close_session(sid)
        return {}

    @router.put("/node")
    async def put(request: Request, path: str, session: str,
                  ephemeral: bool = False) -> dict[str, Any]:
        value = await read_object(request)
        try:
            store.put(session, _path(path), value, ephemeral)
        except RegistryError as exc:
            raise APIError(410, str(exc), code="session_expired") from exc
        return {}

    @router.get("/node")
    async def get(path: str) -> dict[str, Any]:
        value = store.get(_path(path))
        if value is None:
            raise APIError(404, f"no registry node at {path}", param="path", code="not_found")
        return {"value": value}

    @router.delete("/node")
    async def delete(path: str) -> dict[str, Any]:
        store.delete(_path(path))
        return {}

    @router.get("/children")
    async def children(path: str) -> dict[str, Any]:
        return {"children": store.children(_path(path))}

    @router.get("/wait")
    async def wait(path: str, since: int = 0, timeout_s: float = 10.0) -> dict[str, Any]:
        _path(path)
        deadline = time.monotonic() + max(0.0, min(timeout_s, MAX_WAIT_S))
        while store.version(path) <= since and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        store.reap()
        return {"version": store.version(path)}

    return router
