"""Control-plane messages between front end, prefill and decode instances (JSON over HTTP,
validated with pydantic; no pickle on any wire). Every body carries `version`.

Routes and bodies (instance side):
* POST /internal/assign       AssignRequest -> {"role", "group", "decode_peers"} (another role:
                              drain, switch in place; another model_path: drain, reload)
* POST /internal/release      -> {"role": null, "state"}: drain, stop the role, free the model
* POST /internal/prefill      PrefillRequest -> 429 no_free_slot | queue_full | draining |
                              400 refine_unsupported (refine on a backend that cannot) | SSE:
                              `first`, then `handoff` (or the stream ends after `first` when it
                              finished) | `error` (deadline_exceeded: never prefilled); a queued
                              request's stream stays silent until its prefill ran
* POST /internal/handoff      HandoffRequest (prefill -> decode) -> 202 {"queued"} | 429 draining
* POST /internal/drain        -> {"draining": true, "idle"}: refuse new work, finish the rest
* POST /internal/undrain      -> {"draining": false, "idle"}
* POST /internal/handoff_done HandoffDone (decode -> prefill) -> {"released"}
* GET  /internal/stream/{id}  SSE of `delta` events (decode), ending with a finished one | `error`
* POST /internal/abort        AbortRequest -> {"aborted"}
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pd_serve.engine.outputs import RequestOutput
from pd_serve.engine.refine import keep_indices
from pd_serve.engine.sampling_params import SamplingParams

VERSION: Literal[1] = 1
Role = Literal["prefill", "decode", "aggregated"]  # aggregated: prefill and decode, no KV moves


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = VERSION


class SamplingWire(BaseModel):
    """SamplingParams as JSON (validated again by SamplingParams itself)."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    @classmethod
    def of(cls, p: SamplingParams) -> SamplingWire:
        return cls(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                   top_k=p.top_k, seed=p.seed, stop=list(p.stop),
                   stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
                   include_stop_str_in_output=p.include_stop_str_in_output)

    def params(self) -> SamplingParams:
        """ValueError (naming the field) on values SamplingParams refuses."""
        d = self.model_dump()
        return SamplingParams(**{**d, "stop": tuple(d["stop"]),
                                 "stop_token_ids": tuple(d["stop_token_ids"])})


class AssignRequest(_Msg):
    role: Role
    group: str = "default"
    decode_peers: list[str] = Field(default_factory=list)
    model_path: str | None = None  # another model directory: drain, reload, rejoin


class RefineWire(BaseModel):
    """P/D-Device prompt refinement (pd_serve.engine.refine): keep `ratio` of the prompt plus
    the last `window` positions, ranked by the attention of the last `last_q` positions."""

    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)
    window: int = Field(default=32, ge=0)
    last_q: int = Field(default=32, ge=1, le=1024)


class PrefillRequest(_Msg):
    request_id: str = Field(min_length=1, max_length=200)
    prompt_token_ids: list[int] = Field(min_length=1)
    sampling: SamplingWire
    queue: bool = False  # wait in the instance's local FIFO instead of a 429 (baseline (a))
    deadline_s: float | None = Field(default=None, allow_inf_nan=False)  # TTFT budget left
    refine: RefineWire | None = None  # P/D-Device: `first` then carries keep_indices


class HandoffRequest(_Msg):
    request_id: str = Field(min_length=1, max_length=200)
    prompt_token_ids: list[int] = Field(min_length=1)
    first_token_id: int
    sampling: SamplingWire
    source: dict[str, Any]  # kv.HandoffSource as plain JSON
    prefill_url: str  # where to POST HandoffDone


class HandoffDone(_Msg):
    request_id: str
    ok: bool
    error: str | None = None


class AbortRequest(_Msg):
    request_id: str


class FirstEvent(BaseModel):
    token_id: int
    text: str
    prompt_tokens: int
    cached_tokens: int
    finished: bool
    finish_reason: str | None
    late: bool = False  # produced after the request's deadline_s ran out (an SLO failure)
    keep_indices: list[int] | None = None  # sorted kept prompt positions, when refine was asked


class HandoffEvent(BaseModel):
    decode_url: str
    request_id: str


class DeltaEvent(BaseModel):
    """One decode step: `text` is the whole completion so far (first token included)."""

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    completion_tokens: int


def delta_event(out: RequestOutput) -> DeltaEvent:
    """The DeltaEvent of one engine output."""
    return DeltaEvent(token_ids=out.new_token_ids, text=out.text, finished=out.finished,
                      finish_reason=out.finish_reason.value if out.finish_reason else None,
                      completion_tokens=out.completion_tokens)


class ErrorEvent(BaseModel):
    message: str
    code: str


def sse(event: str, body: BaseModel | dict[str, Any]) -> str:
    data = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return f"event: {event}\ndata: {data}\n\n"


def first_event(out: RequestOutput, late: bool, req: PrefillRequest) -> FirstEvent:
    """The `first` SSE event of a request's first output (with its refined prompt if asked)."""
    keep = None
    if req.refine is not None:  # the engine scored the prompt right after its prefill
        keep = keep_indices(out.prompt_importance, req.refine.ratio, req.refine.window)
    return FirstEvent(token_id=out.new_token_ids[0], text=out.text_delta,
                      prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens,
                      finished=out.finished,
                      finish_reason=out.finish_reason.value if out.finish_reason else None,
                      late=late, keep_indices=keep)
