"""Wire format of the P/D-Device cloud assist (`POST /v1/device/assist`): the request body and
the SSE events of its response, shared by the gateway (server) and the device runtime (client).

Response events, in this order: `meta`, `first` (the TTFT point), `refined` (always, before any
`token`), `token` for k = 1 .. min(N, G - 1) unless the request stops earlier, `end`. An `error`
event may replace any later event; the stream then ends. Failures before the first token are
plain HTTP errors with an OpenAI-style body instead: 400 invalid request (or a refinement the
cloud backend cannot compute, code `refine_unsupported`), 409 `model_mismatch` /
`tokenizer_mismatch`, 503 `ttft_deadline_exceeded`, 502 when the cloud instances fail.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pd_serve.instance.messages import SamplingWire

ASSIST_PATH = "/v1/device/assist"
EndReason = Literal["budget", "stop", "length"]


class AssistRequest(BaseModel):
    """What the device asks of the cloud; `sampling.max_tokens` is the user's whole output
    budget G, of which the cloud generates at most 1 + `max_cloud_tokens`."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str = Field(min_length=1)  # must equal the served model name (409 model_mismatch)
    tokenizer_hash: str = Field(min_length=1)  # tokenizer.tokenizer_hash(model_dir) (409)
    prompt_token_ids: list[int] = Field(min_length=1)
    max_cloud_tokens: int = Field(ge=0)  # N: tokens after the first the cloud generates
    refine_ratio: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)  # rho; 1.0 keeps all
    refine_window: int = Field(default=32, ge=0)  # W: the last W prompt tokens are always kept
    sampling: SamplingWire

    @property
    def cloud_max_tokens(self) -> int:
        """max_tokens the cloud runs with: min(G, 1 + N), so it stops after the N-th token."""
        return min(self.sampling.max_tokens, 1 + self.max_cloud_tokens)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AssistMeta(_Event):
    request_id: str
    model: str
    tokenizer_hash: str
    prompt_tokens: int


class AssistFirst(_Event):
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None


class AssistRefined(_Event):
    keep_indices: list[int]  # sorted prompt positions to keep
    ratio_kept: float  # len(keep_indices) / prompt tokens


class AssistToken(_Event):
    index: int  # k: 1-based position after the first token
    token_id: int
    text: str  # this token's own text delta
    finished: bool
    finish_reason: str | None


class AssistEnd(_Event):
    reason: EndReason  # budget: the cloud's N ran out; stop: EOS/stop; length: G or context
    cloud_tokens: int  # tokens the cloud generated, the first included


class AssistError(_Event):
    message: str
    code: str


AssistEvent = AssistMeta | AssistFirst | AssistRefined | AssistToken | AssistEnd | AssistError
EVENTS: dict[str, type[AssistEvent]] = {
    "meta": AssistMeta, "first": AssistFirst, "refined": AssistRefined, "token": AssistToken,
    "end": AssistEnd, "error": AssistError}
EVENT_NAMES: dict[type[BaseModel], str] = {cls: name for name, cls in EVENTS.items()}


def parse_event(name: str, data: dict[str, Any]) -> AssistEvent:
    """The typed event of one SSE (`name`, JSON data); ValueError for an unknown name or a
    body that does not match it (pydantic's ValidationError is a ValueError)."""
    cls = EVENTS.get(name)
    if cls is None:
        raise ValueError(f"unknown assist event {name!r} (expected one of {sorted(EVENTS)})")
    return cls.model_validate(data)


def end_reason(finish_reason: str | None, cloud_tokens: int, cloud_max_tokens: int,
               user_max_tokens: int) -> EndReason:
    """Why the cloud part ended: `stop` (EOS, stop token or string), `budget` (the cloud's
    1 + N tokens are out while the user's budget G is not), else `length` (G or the context)."""
    if finish_reason == "stop":
        return "stop"
    if cloud_tokens >= cloud_max_tokens and cloud_max_tokens < user_max_tokens:
        return "budget"
    return "length"


def sse_event(event: AssistEvent) -> str:
    """One event as SSE text."""
    return f"event: {EVENT_NAMES[type(event)]}\ndata: {event.model_dump_json()}\n\n"
