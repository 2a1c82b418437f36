"""The front end's HTTP app: OpenAI-compatible /v1/completions and /v1/chat/completions
(validated and prepared exactly as the aggregated server does, same error bodies), /v1/models,
/health and /stats; each request is forwarded to a prefill instance and relayed from decode.

Lifecycle:
1. `build_frontend_app(cfg, tokenizer, max_model_len, prefill_urls)` wires routes and a Forwarder;
2. requests: parse -> prepare -> forward (retry on 429 until the deadline) -> relay; a client
   that goes away closes the remote streams, which aborts the request where it is;
3. ASGI shutdown closes the HTTP client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from pd_serve.api import generation as gen
from pd_serve.api.errors import install_error_handlers, model_not_found
from pd_serve.api.prepare import Limits, Prepared, prepare_chat, prepare_completion
from pd_serve.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from pd_serve.api.protocol import new_id as _new_id
from pd_serve.api.server import SSE_HEADERS, _auth, _parse, _until_disconnect
from pd_serve.config import ServeConfig
from pd_serve.frontend.forward import Forwarder
from pd_serve.frontend.remote_run import admit_remote
from pd_serve.models.tokenizer import Tokenizer


def build_frontend_app(cfg: ServeConfig, tok: Tokenizer, max_model_len: int,
                       prefill_urls: list[str]) -> FastAPI:
    limits = Limits(cfg.model.name, max_model_len, tok.vocab_size, cfg.server.max_tokens_default)
    fwd = Forwarder(prefill_urls, cfg.pd)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await fwd.aclose()

    app = FastAPI(title="pd-serve front end", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(_openai_router(fwd, tok, limits, cfg.server.api_keys))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "prefill_instances": fwd.urls}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {"open_streams": fwd.open_streams, "prefill_rejections": fwd.rejections}

    return app


def _openai_router(fwd: Forwarder, tok: Tokenizer, limits: Limits,
                   api_keys: tuple[str, ...]) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_auth(api_keys))])

    @router.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        prep = prepare_completion(req, tok, limits)
        return await _respond(request, fwd, _new_id("cmpl"), limits.model_name, prep,
                              bool(req.stream), req.include_usage, gen.complete_text,
                              gen.stream_text)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        prep = prepare_chat(req, tok, limits)
        return await _respond(request, fwd, _new_id("chatcmpl"), limits.model_name, prep,
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


async def _respond(request: Request, fwd: Forwarder, request_id: str, model: str,
                   prep: Prepared, stream: bool, include_usage: bool,
                   complete: Callable[[gen.Run], Awaitable[BaseModel]],
                   streamer: Callable[[gen.Run, bool], AsyncIterator[str]]) -> Response:
    run = await _until_disconnect(request, admit_remote(fwd, request_id, model, prep))
    if stream:
        return StreamingResponse(streamer(run, include_usage), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        body = await _until_disconnect(request, complete(run))
    finally:
        await run.close()
    return JSONResponse(body.model_dump(mode="json"))
