"""The cloud side of P/D-Device: `POST /v1/device/assist` runs a device's request on the P/D
deployment with a bounded decode and streams back the first token, the refined prompt (kept
positions, pd_serve.engine.refine) and at most N further tokens (wire format:
pd_serve.gateway.assist_protocol).

Lifecycle of one request:
1. handshake: the body is validated (400), its model and tokenizer hash must equal the served
   ones (409 `model_mismatch` / `tokenizer_mismatch`), its tokens and budget must fit (400);
2. admission as for /v1/completions (same Forwarder, scenario and TTFT deadline), with
   max_tokens = min(G, 1 + N) and, when rho < 1, a `refine` the prefill instance answers with
   keep indices in its `first` event; a failure up to here is an HTTP error;
3. the stream: `meta`, `first`, `refined`, one `token` per decode delta token, `end`; a failure
   later is one `error` event. The cloud frees the request right after its 1 + N-th token;
4. however the stream ends (done, error, the device closing it), the remote streams are closed
   (RemoteRest.aclose, shielded from the cancellation of a client disconnect), which aborts the
   request wherever it still is.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from pd_serve.api.errors import SERVER_ERROR, APIError, bad_request
from pd_serve.api.http import SSE_HEADERS, read_object, require_api_key, until_disconnect, validate
from pd_serve.api.protocol import new_id
from pd_serve.engine.refine import keep_all
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.gateway.assist_protocol import (
    ASSIST_PATH,
    AssistEnd,
    AssistError,
    AssistFirst,
    AssistMeta,
    AssistRefined,
    AssistRequest,
    AssistToken,
    end_reason,
    sse_event,
)
from pd_serve.gateway.policy import ttft_deadline
from pd_serve.gateway.remote_run import DEADLINE, RemoteRest
from pd_serve.gateway.scenarios import Scenario, scenario_of
from pd_serve.gateway.timeline import CANCELLED, FAILED, TERMINATED, Timeline
from pd_serve.instance.messages import FirstEvent, PrefillRequest, RefineWire, SamplingWire

if TYPE_CHECKING:
    from pd_serve.gateway.app import Gateway


def assist_router(gw: Gateway, api_keys: tuple[str, ...], tokenizer_hash: str) -> APIRouter:
    """The assist route over the gateway's forwarding state; `tokenizer_hash` is the served
    model's (pd_serve.models.tokenizer.tokenizer_hash)."""
    router = APIRouter(dependencies=[Depends(require_api_key(api_keys))])

    @router.post(ASSIST_PATH, response_model=None)
    async def assist(request: Request) -> StreamingResponse:
        arrival = time.monotonic()
        req = validate(AssistRequest, await read_object(request))
        sc = scenario_of(request.headers, {}, gw.default, gw.scenarios)
        params = handshake(req, gw, tokenizer_hash)
        n = len(req.prompt_token_ids)
        tl = Timeline(new_id("assist"), sc.name, arrival, n,
                      arrival + ttft_deadline(sc.ttft_slo, n))
        gw.ring.add(tl)
        try:
            rest = await until_disconnect(request, _admit(gw, sc, tl, req, params))
        except APIError as exc:
            if tl.outcome is None:
                outcome = {DEADLINE: TERMINATED, "client_disconnected": CANCELLED}.get(
                    exc.code or "", FAILED)
                tl.finish(outcome, time.monotonic(), exc.message)
                gw.ended(tl)
            raise
        meta = AssistMeta(request_id=tl.request_id, model=gw.limits.model_name,
                          tokenizer_hash=tokenizer_hash, prompt_tokens=n)
        return StreamingResponse(_events(rest, req, meta), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    return router


def handshake(req: AssistRequest, gw: Gateway, tokenizer_hash: str) -> SamplingParams:
    """The cloud's SamplingParams of a validated request (max_tokens = min(G, 1 + N)); 409 on
    a model or tokenizer mismatch, 400 on tokens or a budget the served model cannot take."""
    limits = gw.limits
    if req.model != limits.model_name:
        raise APIError(409, f"model mismatch: the device runs {req.model!r} but this cloud "
                       f"serves {limits.model_name!r}", param="model", code="model_mismatch")
    if req.tokenizer_hash != tokenizer_hash:
        raise APIError(409, f"tokenizer mismatch: the device's tokenizer hash "
                       f"{req.tokenizer_hash[:16]}... differs from the cloud's "
                       f"{tokenizer_hash[:16]}... (same model name, different tokenizer files)",
                       param="tokenizer_hash", code="tokenizer_mismatch")
    bad = [t for t in req.prompt_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary "
                          f"[0, {limits.vocab_size})", param="prompt_token_ids")
    n, budget = len(req.prompt_token_ids), req.sampling.max_tokens
    if n + budget > limits.max_model_len:
        raise bad_request(f"This model's maximum context length is {limits.max_model_len} "
                          f"tokens; the prompt has {n} and the output budget is {budget}",
                          param="sampling.max_tokens", code="context_length_exceeded")
    wire = req.sampling.model_copy(update={"max_tokens": req.cloud_max_tokens})
    try:
        return wire.params()
    except ValueError as exc:
        raise bad_request(str(exc), param="sampling") from exc


async def _admit(gw: Gateway, sc: Scenario, tl: Timeline, req: AssistRequest,
                 params: SamplingParams) -> RemoteRest:
    """Forwards the request and waits for its `first` event (keep indices checked); the
    RemoteRest, whose `aclose()` the caller owns, reads the rest."""
    refine = (RefineWire(ratio=req.refine_ratio, window=req.refine_window)
              if req.refine_ratio < 1.0 else None)
    body = PrefillRequest(request_id=tl.request_id, prompt_token_ids=req.prompt_token_ids,
                          sampling=SamplingWire.of(params), refine=refine)
    prefill = await gw.fwd.open(sc, body.model_dump(mode="json"), tl)
    # no failure_text: the device shows every token, a substituted text would be shown too
    rest = RemoteRest(gw.fwd, tl.request_id, prefill, tl, gw.ended)
    try:
        first = FirstEvent.model_validate(await rest.expect("first"))
        if refine is not None and first.keep_indices is None:
            raise APIError(502, "the prefill instance sent no keep indices for a refined "
                           "request", type=SERVER_ERROR, code="refine_failed")
    except BaseException:
        await rest.aclose()
        raise
    tl.token(time.monotonic(), 1)
    rest.first = first
    return rest


async def _events(rest: RemoteRest, req: AssistRequest, meta: AssistMeta) -> AsyncIterator[str]:
    """The SSE body after admission; closes `rest` however it ends."""
    first = rest.first
    assert first is not None
    n = meta.prompt_tokens
    keep = first.keep_indices if first.keep_indices is not None else keep_all(n)
    reason = first.finish_reason
    k = 0  # tokens streamed after the first
    try:
        yield sse_event(meta)
        yield sse_event(AssistFirst(token_id=first.token_id, text=first.text,
                                    finished=first.finished, finish_reason=reason))
        yield sse_event(AssistRefined(keep_indices=keep, ratio_kept=len(keep) / n))
        async for out in rest:
            ids = out.new_token_ids
            reason = out.finish_reason.value if out.finish_reason else None
            if reason == "abort":
                raise APIError(502, "the cloud aborted the request", code="aborted")
            for j, token_id in enumerate(ids):
                k += 1
                last = j == len(ids) - 1
                yield sse_event(AssistToken(
                    index=k, token_id=token_id, text=out.text_delta if last else "",
                    finished=out.finished and last, finish_reason=reason if last else None))
        yield sse_event(AssistEnd(reason=end_reason(reason, 1 + k, req.cloud_max_tokens,
                                                    req.sampling.max_tokens),
                                  cloud_tokens=1 + k))
    except APIError as exc:
        yield sse_event(AssistError(message=exc.message, code=exc.code or "cloud_failed"))
    finally:
        with anyio.CancelScope(shield=True):  # a disconnect cancels us; the frees must run
            await rest.aclose()
