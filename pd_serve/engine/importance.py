"""The engine's hook for P/D-Device prompt refinement: a request added with `importance_q` > 0
gets its prompt scored (ModelRunner.prefill_importance) right after its prefill completes, from
the K/V then in the cache, and the scores ride on its first output (pd_serve.engine.refine turns
them into kept positions).

Why in the engine step and not later through an engine call: a first token may finish the
request (EOS, max_tokens 1), which frees its blocks in the same step, so the scores must be
taken between the prefill and `_append`. The pass reads the cache only, so the request's own
tokens are unchanged; its cost (q more tokens per layer) falls on that one prefill step.
"""

from __future__ import annotations

from pd_serve.backends.base import ModelRunner, PrefillBatch, SeqChunk
from pd_serve.engine.block_manager import BlockManager
from pd_serve.engine.request import Request


def check_importance(runner: ModelRunner, importance_q: int) -> None:
    """ValueError unless `importance_q` is an integer >= 0 the runner can serve."""
    if isinstance(importance_q, bool) or not isinstance(importance_q, int) or importance_q < 0:
        raise ValueError(f"importance_q must be an integer >= 0, got {importance_q!r}")
    if importance_q and not runner.supports_importance:
        raise ValueError(f"the {type(runner).__name__} backend cannot score prompt tokens, so "
                         "prompt refinement (refine_ratio < 1) is unavailable")


def score_prompts(runner: ModelRunner, bm: BlockManager, done: list[Request]) -> None:
    """Sets `prompt_importance` of the requests in `done` (prefill just completed) that asked.
    Once per request: not again after a preemption's re-prefill (it has output tokens then)."""
    for req in done:
        if req.importance_q and not req.output_token_ids:
            n = req.num_prompt_tokens
            seq = SeqChunk(req.prompt_token_ids, 0, req.block_table[:bm.blocks_for(n)])
            req.prompt_importance = runner.prefill_importance(PrefillBatch([seq]),
                                                              req.importance_q)[0]
