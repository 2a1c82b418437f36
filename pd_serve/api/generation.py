"""Runs one prepared request on the AsyncEngine and shapes its outputs into an OpenAI response:
a full completion / chat completion, or a stream of SSE chunks ending in `data: [DONE]`."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pd_serve.api.errors import SERVER_ERROR, APIError, bad_request
from pd_serve.api.prepare import Prepared
from pd_serve.api.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    FinishReasonStr,
    Usage,
)
from pd_serve.engine.async_engine import AsyncEngine, EngineDeadError, EngineError
from pd_serve.engine.outputs import FinishReason, RequestOutput

SSE_DONE = "data: [DONE]\n\n"


@dataclass
class Run:
    """One admitted request: its first output and the iterator over the rest."""

    request_id: str
    model: str
    first: RequestOutput
    rest: AsyncIterator[RequestOutput]
    created: int = field(default_factory=lambda: int(time.time()))

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        yield self.first
        try:
            async for out in self.rest:
                yield out
        except (ValueError, EngineError) as exc:
            raise _api_error(exc) from exc

    async def close(self) -> None:
        """Aborts the request in the engine if it is still running (idempotent)."""
        aclose = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()


async def admit(engine: AsyncEngine, request_id: str, model: str, prep: Prepared) -> Run:
    """Submits the request and waits for its first output, so a rejection is still a clean
    HTTP error rather than an error inside an already started stream."""
    agen = engine.generate(request_id, prep.prompt_token_ids, prep.params)
    try:
        first = await agen.__anext__()
    except (ValueError, EngineError) as exc:
        raise _api_error(exc) from exc
    return Run(request_id, model, first, agen)


def _api_error(exc: Exception) -> APIError:
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), type=SERVER_ERROR, code="engine_unavailable")
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), type=SERVER_ERROR, code="engine_error")
    return bad_request(str(exc))


def finish_reason(out: RequestOutput) -> FinishReasonStr:
    if out.finish_reason == FinishReason.LENGTH:
        return "length"
    if out.finish_reason == FinishReason.STOP:
        return "stop"
    raise APIError(500, "the engine aborted the request", type=SERVER_ERROR, code="aborted")


def usage(out: RequestOutput) -> Usage:
    return Usage.of(out.prompt_tokens, out.completion_tokens, out.cached_tokens)


async def _last(run: Run) -> RequestOutput:
    last = run.first
    async for out in run.outputs():
        last = out
    return last


async def complete_text(run: Run) -> CompletionResponse:
    last = await _last(run)
    choice = CompletionChoice(text=last.text, finish_reason=finish_reason(last))
    return CompletionResponse(id=run.request_id, created=run.created, model=run.model,
                              choices=[choice], usage=usage(last))


async def complete_chat(run: Run) -> ChatCompletionResponse:
    last = await _last(run)
    choice = ChatChoice(message=ChatMessageOut(content=last.text),
                        finish_reason=finish_reason(last))
    return ChatCompletionResponse(id=run.request_id, created=run.created, model=run.model,
                                  choices=[choice], usage=usage(last))


async def stream_text(run: Run, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[CompletionChoice], u: Usage | None = None) -> str:
        return _sse(CompletionResponse(id=run.request_id, created=run.created, model=run.model,
                                       choices=choices, usage=u))

    async def body() -> AsyncIterator[str]:
        async for out in run.outputs():
            if out.finished:
                yield chunk([CompletionChoice(text=out.text_delta,
                                              finish_reason=finish_reason(out))])
                if include_usage:
                    yield chunk([], usage(out))
            elif out.text_delta:
                yield chunk([CompletionChoice(text=out.text_delta)])

    async for line in _guarded(run, body()):
        yield line


async def stream_chat(run: Run, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChatStreamChoice], u: Usage | None = None) -> str:
        return _sse(ChatCompletionChunk(id=run.request_id, created=run.created, model=run.model,
                                        choices=choices, usage=u))

    async def body() -> AsyncIterator[str]:
        yield chunk([ChatStreamChoice(delta=ChatDelta(role="assistant", content=""))])
        async for out in run.outputs():
            if out.text_delta:
                yield chunk([ChatStreamChoice(delta=ChatDelta(content=out.text_delta))])
            if out.finished:
                yield chunk([ChatStreamChoice(delta=ChatDelta(),
                                              finish_reason=finish_reason(out))])
                if include_usage:
                    yield chunk([], usage(out))

    async for line in _guarded(run, body()):
        yield line


async def _guarded(run: Run, body: AsyncIterator[str]) -> AsyncIterator[str]:
    """Ends every stream with `[DONE]`; an error mid-stream becomes one error event first.
    Whatever way the stream ends (including the client going away), the request is closed."""
    try:
        async for line in body:
            yield line
    except APIError as exc:
        yield _sse_json(exc.body())
    finally:
        await run.close()
    yield SSE_DONE


def _sse(model: CompletionResponse | ChatCompletionChunk) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _sse_json(body: dict[str, object]) -> str:
    return f"data: {json.dumps(body)}\n\n"
