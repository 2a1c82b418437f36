"""What the engine reports per request and step."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller or failed


@dataclass
class RequestOutput:
    """Incremental result of one request after one engine step.

    `new_token_ids` / `text_delta` hold only what this step added; `text` is everything so far
    (with a matched stop string removed unless asked to keep it).
    """

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    text: str
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Prefill role: the first token is out and the request is parked for its KV hand-off
    # (finished False, finish_reason None); this engine reports nothing more for it unless it
    # is aborted while parked (then one ABORT output follows).
    handoff_ready: bool = False
    # P/D-Device: the prompt's importance scores [prompt_tokens] float32 (pd_serve.engine.refine),
    # on the first output of a request added with importance_q > 0; None otherwise.
    prompt_importance: np.ndarray | None = None
