"""The aggregated OpenAI-compatible HTTP server: prefill and decode of every request on this one
instance (the baseline the disaggregated system is compared with).

Routes: POST /v1/completions, POST /v1/chat/completions (both with or without SSE streaming),
GET /v1/models, GET /v1/models/{model}; unauthenticated operator routes GET /health, GET /stats
(engine statistics and the idle leak check) and GET /metrics (Prometheus text format).

Lifecycle:
1. `build_app(engine, tokenizer, cfg)` wires the routes; nothing runs yet.
2. On ASGI startup the lifespan starts the AsyncEngine's thread.
3. Requests are parsed, prepared and admitted (a rejection is a clean 4xx before any stream
   starts); a client that disconnects, streaming or not, aborts its request in the engine.
4. On ASGI shutdown the lifespan stops the engine thread; the caller closes the runner.
"""

from __future__ import annotations

import asyncio
import hmac
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pd_serve.api import generation as gen
from pd_serve.api.errors import (
    APIError,
    bad_request,
    from_validation_errors,
    install_error_handlers,
    invalid_api_key,
    model_not_found,
    parse_json,
)
from pd_serve.api.prepare import Limits, Prepared, prepare_chat, prepare_completion
from pd_serve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from pd_serve.api.protocol import new_id as _new_id
from pd_serve.config import ServeConfig
from pd_serve.engine.async_engine import AsyncEngine
from pd_serve.models.tokenizer import Tokenizer

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
KNOWN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                         "/stats", "/metrics"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_app(engine: AsyncEngine, tokenizer: Tokenizer, cfg: ServeConfig) -> FastAPI:
    """FastAPI app serving `engine` under the model name `cfg.model.name`."""
    limits = Limits(cfg.model.name, engine.max_model_len, tokenizer.vocab_size,
                    cfg.server.max_tokens_default)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="pd-serve", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    responses: Counter[tuple[str, int]] = Counter()
    app.add_middleware(_CountResponses, counter=responses)
    app.include_router(_openai_router(engine, tokenizer, limits, cfg.server.api_keys))
    app.include_router(_operator_router(engine, responses))
    return app


def _openai_router(engine: AsyncEngine, tok: Tokenizer, limits: Limits,
                   api_keys: tuple[str, ...]) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_auth(api_keys))])

    @router.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        prep = prepare_completion(req, tok, limits)
        return await _respond(request, engine, _new_id("cmpl"), limits.model_name, prep,
                              bool(req.stream), req.include_usage, gen.complete_text,
                              gen.stream_text)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        prep = prepare_chat(req, tok, limits)
        return await _respond(request, engine, _new_id("chatcmpl"), limits.model_name, prep,
                              bool(req.stream), req.include_usage, gen.complete_chat,
                              gen.stream_chat)

    @router.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=limits.model_name, max_model_len=limits.max_model_len)])

    @router.get("/v1/models/{model:path}")
    async def model(model: str) -> ModelCard:
        if model != limits.model_name:
            raise model_not_found(model)
        return ModelCard(id=model, max_model_len=limits.max_model_len)

    return router


def _operator_router(engine: AsyncEngine, responses: Counter[tuple[str, int]]) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        h = engine.health()
        return JSONResponse({"status": "ok" if h["ok"] else "unhealthy", **h},
                            status_code=200 if h["ok"] else 503)

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @router.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_prometheus(engine.stats(), responses))

    return router


class _CountResponses:
    """ASGI middleware counting responses per known path and status, for /metrics."""

    def __init__(self, app: ASGIApp, counter: Counter[tuple[str, int]]) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counter[(path, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def _auth(api_keys: tuple[str, ...]) -> Callable[[Request], Awaitable[None]]:
    """Bearer-token check; with no keys configured every request passes."""
    keys = [k.encode() for k in api_keys]

    async def check(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in keys):
            raise invalid_api_key()

    return check


async def _parse(request: Request, model: type[M]) -> M:
    data = parse_json(await request.body())
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from exc


async def _respond(request: Request, engine: AsyncEngine, request_id: str, model: str,
                   prep: Prepared, stream: bool, include_usage: bool,
                   complete: Callable[[gen.Run], Awaitable[BaseModel]],
                   streamer: Callable[[gen.Run, bool], AsyncIterator[str]]) -> Response:
    run = await _until_disconnect(request, gen.admit(engine, request_id, model, prep))
    if stream:
        return StreamingResponse(streamer(run, include_usage), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        body = await _until_disconnect(request, complete(run))
    finally:
        await run.close()
    return JSONResponse(body.model_dump(mode="json"))


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
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


def _prometheus(stats: dict[str, Any], responses: Counter[tuple[str, int]]) -> str:
    lines = []
    for key, value in sorted(stats.items()):
        if isinstance(value, (int, float)) and not key.endswith("_time"):
            lines.append(f"pd_serve_{_metric_name(key)} {float(value)}")
    lines.append("# TYPE pd_serve_http_responses_total counter")
    for (path, status), n in sorted(responses.items()):
        lines.append(f'pd_serve_http_responses_total{{path="{path}",status="{status}"}} {n}')
    return "\n".join(lines) + "\n"


def _metric_name(key: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in key)
