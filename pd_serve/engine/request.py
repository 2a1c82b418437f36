"""One generation request as the engine tracks it from `add_request` to its finish.

Lifecycle:
1. created WAITING by `LLMEngine.add_request` (validated, nothing allocated);
2. admitted by the scheduler: blocks allocated (`block_table`), status RUNNING, prefilled over
   one or more steps until `num_computed_tokens == prefill_len`;
3. decoded one token per step; each sampled token is appended to `output_token_ids`;
4. possibly PREEMPTED (blocks freed, back to the front of the waiting queue, later re-prefilled
   over prompt + output tokens);
5. FINISHED (stop, length or abort) once; its blocks are freed by the scheduler.
Disaggregated roles (pd_serve/engine/handoff.py): a `prefill_only` request that needs more
tokens after its first is parked in HANDOFF (blocks kept, never scheduled) until the hand-off
is released; on a decode instance a handed-off request starts RUNNING with its prompt's K/V
already in the cache and its first token already in `output_token_ids`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from pd_serve.engine.output_text import OutputText
from pd_serve.engine.outputs import FinishReason
from pd_serve.engine.sampling_params import SamplingParams

# (layer index, block table covering the prompt, prompt tokens) -> None
LayerStage = Callable[[int, list[int], int], None]


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were taken back
    FINISHED = "finished"
    HANDOFF = "handoff"  # prefill-only: first token out, blocks kept until the hand-off ends


@dataclass(eq=False)
class Request:
    """Token state of one request; mutated only by the engine thread."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    text: OutputText
    generator: np.random.Generator | None = None  # set when `params.seed` is given
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    prefill_len: int = 0  # tokens the current admission prefills (prompt + output so far)
    num_preemptions: int = 0
    prefill_only: bool = False  # prefill instance: park after the first token (hand-off)
    importance_q: int = 0  # P/D-Device: > 0 scores the prompt after its prefill completes
    prompt_importance: np.ndarray | None = None  # [num_prompt_tokens], until the next output
    # Layer-wise hand-off: stage(layer, block_table, num_tokens) during the completing prefill
    on_layer: LayerStage | None = None
    # Owned and mutated by the BlockManager; read-only for everyone else.
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        if self.output_token_ids:
            return self.output_token_ids[-1]
        return self.prompt_token_ids[-1]

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_len

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
