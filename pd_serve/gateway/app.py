"""The gateway's HTTP app: OpenAI-compatible /v1/completions and /v1/chat/completions (validated
and prepared exactly as the aggregated server does, same error bodies), /v1/models, the
P/D-Device assist /v1/device/assist (pd_serve.gateway.assist); operator
routes /health, /stats (JSON metrics per scenario), /metrics (Prometheus) and
/debug/requests/{id} (one request's timeline). Each request is routed by its scenario, forwarded
to a prefill instance under the scenario's policy and relayed from decode.

Lifecycle:
1. `build_gateway_app(cfg, tokenizer, max_model_len, instances)` builds the scenario tables and
   a Forwarder (ValueError for a scenario naming an unknown instance);
2. requests: auth -> parse -> scenario -> prepare -> forward (until the TTFT deadline) -> relay;
   a client that goes away closes the remote streams, which aborts the request where it is;
   every request's timeline is kept in a bounded ring and recorded in the metrics when it ends;
3. ASGI shutdown closes the HTTP client.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from pd_serve.api import generation as gen
from pd_serve.api.errors import (
    APIError,
    install_error_handlers,
)
from pd_serve.api.http import (
    SSE_HEADERS,
    models_router,
    read_object,
    require_api_key,
    until_disconnect,
    validate,
)
from pd_serve.api.prepare import Limits, Prepared, prepare_chat, prepare_completion
from pd_serve.api.protocol import ChatCompletionRequest, CompletionRequest
from pd_serve.api.protocol import new_id as _new_id
from pd_serve.config import ServeConfig
from pd_serve.gateway.assist import assist_router
from pd_serve.gateway.follow import MetaFollower
from pd_serve.gateway.forward import Forwarder
from pd_serve.gateway.metrics import GatewayMetrics
from pd_serve.gateway.ops import operator_router
from pd_serve.gateway.policy import ttft_deadline
from pd_serve.gateway.remote_run import DEADLINE, admit_remote
from pd_serve.gateway.samples import SampleLog
from pd_serve.gateway.scenarios import Scenario, build_scenarios, scenario_of
from pd_serve.gateway.timeline import CANCELLED, FAILED, TERMINATED, Timeline, TimelineRing
from pd_serve.models.tokenizer import Tokenizer, tokenizer_hash

Shaper = Callable[[gen.Run], Awaitable[BaseModel]]
Streamer = Callable[[gen.Run, bool], AsyncIterator[str]]


@dataclass
class Gateway:
    """Everything the routes share."""

    fwd: Forwarder
    scenarios: dict[str, Scenario]
    default: str
    ring: TimelineRing
    metrics: GatewayMetrics
    tok: Tokenizer
    limits: Limits
    samples: SampleLog
    failure_text: str | None = None

    def ended(self, tl: Timeline) -> None:
        self.metrics.record(tl)
        self.samples.add(tl)


def build_gateway_app(cfg: ServeConfig, tok: Tokenizer, max_model_len: int,
                      instances: Mapping[str, str], registry_url: str | None = None) -> FastAPI:
    """With `registry_url` the prefill instances of every scenario come from the orchestrator's
    meta info (pd_serve.gateway.follow) and `instances` is ignored."""
    gw_cfg = cfg.gateway
    scenarios = build_scenarios(gw_cfg, instances, cfg.pd.forward_deadline_s,
                                dynamic=registry_url is not None)
    gw = Gateway(Forwarder(scenarios, cfg.pd.retry_interval_s), scenarios,
                 gw_cfg.default_scenario, TimelineRing(gw_cfg.timeline_capacity),
                 GatewayMetrics(list(scenarios), gw_cfg.max_stats_samples), tok,
                 Limits(cfg.model.name, max_model_len, tok.vocab_size,
                        cfg.server.max_tokens_default), SampleLog(gw_cfg.max_stats_samples),
                 gw_cfg.failure_text)

    follower = (MetaFollower(gw.fwd, registry_url, cfg.orchestrator.session_timeout_s,
                             f"http://{cfg.server.host}:{cfg.server.port}")
                if registry_url is not None else None)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if follower is not None:
            follower.start()
        yield
        if follower is not None:
            await follower.stop()
        await gw.fwd.aclose()

    app = FastAPI(title="pd-serve gateway", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(_openai_router(gw, cfg.server.api_keys))
    app.include_router(assist_router(gw, cfg.server.api_keys, tokenizer_hash(tok.model_dir)))
    app.include_router(operator_router(gw.fwd, gw.ring, gw.metrics, gw.samples))
    return app


def _openai_router(gw: Gateway, api_keys: tuple[str, ...]) -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key(api_keys))])
    limits = gw.limits

    @router.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        data = await read_object(request)
        req = validate(CompletionRequest, data)
        sc = scenario_of(request.headers, data, gw.default, gw.scenarios)
        prep = prepare_completion(req, gw.tok, limits)
        return await _respond(request, gw, sc, arrival, _new_id("cmpl"), prep, bool(req.stream),
                              req.include_usage, gen.complete_text, gen.stream_text)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        data = await read_object(request)
        req = validate(ChatCompletionRequest, data)
        sc = scenario_of(request.headers, data, gw.default, gw.scenarios)
        prep = prepare_chat(req, gw.tok, limits)
        return await _respond(request, gw, sc, arrival, _new_id("chatcmpl"), prep,
                              bool(req.stream), req.include_usage, gen.complete_chat,
                              gen.stream_chat)

    router.include_router(models_router(limits))
    return router


async def _respond(request: Request, gw: Gateway, sc: Scenario, arrival: float, request_id: str,
                   prep: Prepared, stream: bool, include_usage: bool, complete: Shaper,
                   streamer: Streamer) -> Response:
    n = len(prep.prompt_token_ids)
    tl = Timeline(request_id, sc.name, arrival, n, arrival + ttft_deadline(sc.ttft_slo, n))
    gw.ring.add(tl)
    try:
        run = await until_disconnect(request, admit_remote(
            gw.fwd, sc, request_id, gw.limits.model_name, prep, tl, gw.ended, gw.failure_text))
    except APIError as exc:
        if tl.outcome is None:
            outcome = {DEADLINE: TERMINATED, "client_disconnected": CANCELLED}.get(
                exc.code or "", FAILED)
            tl.finish(outcome, time.monotonic(), exc.message)
            gw.ended(tl)
        raise
    if stream:
        return StreamingResponse(streamer(run, include_usage), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        body = await until_disconnect(request, complete(run))
    finally:
        await run.close()
    return JSONResponse(body.model_dump(mode="json"))
