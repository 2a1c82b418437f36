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
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pd_serve.api import generation as gen
from pd_serve.api.errors import (
    install_error_handlers,
)
from pd_serve.api.http import (
    SSE_HEADERS,
    models_router,
    parse_body,
    require_api_key,
    until_disconnect,
)
from pd_serve.api.prepare import Limits, Prepared, prepare_chat, prepare_completion
from pd_serve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from pd_serve.api.protocol import new_id as _new_id
from pd_serve.config import ServeConfig
from pd_serve.engine.async_engine import AsyncEngine
from pd_serve.models.tokenizer import Tokenizer

KNOWN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                         "/stats", "/metrics"})


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
    router = APIRouter(dependencies=[Depends(require_api_key(api_keys))])

    @router.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        prep = prepare_completion(req, tok, limits)
        return await _respond(request, engine, _new_id("cmpl"), limits.model_name, prep,
                              bool(req.stream), req.include_usage, gen.complete_text,
                              gen.stream_text)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest)
        prep = prepare_chat(req, tok, limits)
        return await _respond(request, engine, _new_id("chatcmpl"), limits.model_name, prep,
                              bool(req.stream), req.include_usage, gen.complete_chat,
                              gen.stream_chat)

    router.include_router(models_router(limits))
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


async def _respond(request: Request, engine: AsyncEngine, request_id: str, model: str,
                   prep: Prepared, stream: bool, include_usage: bool,
                   complete: Callable[[gen.Run], Awaitable[BaseModel]],
                   streamer: Callable[[gen.Run, bool], AsyncIterator[str]]) -> Response:
    run = await until_disconnect(request, gen.admit(engine, request_id, model, prep))
    if stream:
        return StreamingResponse(streamer(run, include_usage), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        body = await until_disconnect(request, complete(run))
    finally:
        await run.close()
    return JSONResponse(body.model_dump(mode="json"))


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
