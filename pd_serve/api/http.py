"""HTTP-edge helpers shared by the aggregated server, the gateway and the instances: bearer
API keys, strict JSON body parsing, client-disconnect handling, SSE headers and the model routes.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from pd_serve.api.errors import (
    APIError,
    bad_request,
    from_validation_errors,
    invalid_api_key,
    model_not_found,
    parse_json,
)
from pd_serve.api.prepare import Limits
from pd_serve.api.protocol import ModelCard, ModelList

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # every process's /metrics


def require_api_key(api_keys: tuple[str, ...]) -> Callable[[Request], Awaitable[None]]:
    """Bearer-token check (a FastAPI dependency); with no keys configured every request passes."""
    keys = [k.encode() for k in api_keys]

    async def check(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in keys):
            raise invalid_api_key()

    return check


async def read_object(request: Request) -> dict[str, Any]:
    """The JSON object body; malformed JSON or another JSON type is a 400 (OpenAI-style)."""
    data = parse_json(await request.body())
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    """`data` as `model`; invalid fields are a 400 naming them."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from exc


async def parse_body(request: Request, model: type[M]) -> M:
    """The request's JSON object body validated as `model` (400 otherwise)."""
    return validate(model, await read_object(request))


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (which aborts its request) if the client goes away."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "client disconnected", code="client_disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def models_router(limits: Limits) -> APIRouter:
    """GET /v1/models and /v1/models/{model} for the one served model."""
    router = APIRouter()

    @router.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=limits.model_name, max_model_len=limits.max_model_len)])

    @router.get("/v1/models/{model:path}")
    async def model(model: str) -> ModelCard:
        if model != limits.model_name:
            raise model_not_found(model)
        return ModelCard(id=model, max_model_len=limits.max_model_len)

    return router
