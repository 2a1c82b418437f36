"""Prompt-token importance (P/D-Device refinement) on CUDA, fast path (flash prefill, paged
decode, graphs): the scores match the CPU float32 reference, the cache is read only, and the
engine's greedy tokens are the same with and without scoring.

Tolerances: float32 on the GPU vs CPU float32: 1e-5 absolute on scores that sum to 1 (same
formulation, TF32 off). bfloat16: the keys, values and hidden states carry 8 mantissa bits, so
the scores may move by a few percent of their own size; we bound the absolute error at 0.01 and
require that the 20% highest-scoring positions mostly agree (>= 70% overlap; random tiny models
have near-ties)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pd_serve.backends.base import PrefillBatch, RunnerConfig, SeqChunk
from pd_serve.backends.torch.runner import TorchRunner
from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer
from tests.checkpoints import DEMO_MODEL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
]
IDS = np.random.RandomState(3).randint(1, 1000, size=150).tolist()
TABLE = [9, 3, 14, 0, 6, 1, 12, 2, 5, 11]  # 160 slots, scattered


def scores(device: str, dtype: str, model_dir: Path = DEMO_MODEL) -> np.ndarray:
    runner = TorchRunner(RunnerConfig(str(model_dir), backend="torch", device=device,
                                      dtype=dtype, block_size=16, num_blocks=16))
    try:
        runner.prefill(PrefillBatch([SeqChunk(IDS, 0, TABLE)]))
        cache = runner.kv_cache.clone()
        out = runner.prefill_importance(PrefillBatch([SeqChunk(IDS, 0, TABLE)]), 32)[0]
        assert torch.equal(cache, runner.kv_cache)
        return out
    finally:
        runner.close()


def test_cuda_scores_match_cpu() -> None:
    ref = scores("cpu", "float32")
    np.testing.assert_allclose(scores("cuda", "float32"), ref, atol=1e-5)
    bf16 = scores("cuda", "bfloat16")
    assert np.abs(bf16 - ref).max() < 0.01
    top = len(IDS) // 5
    overlap = set(np.argsort(-bf16)[:top]) & set(np.argsort(-ref)[:top])
    assert len(overlap) >= 0.7 * top


def test_engine_tokens_unchanged_by_scoring() -> None:
    runner = TorchRunner(RunnerConfig(str(DEMO_MODEL), backend="torch", device="cuda",
                                      dtype="bfloat16", block_size=16, num_blocks=64))
    engine = LLMEngine(runner, Tokenizer(DEMO_MODEL), CacheConfig(16, 64, False),
                       SchedulerConfig(8, 2048, None), seed=0)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    try:
        runner.warmup()
        outs = {}
        for q in (0, 32):
            engine.add_request(f"r{q}", IDS, params, importance_q=q)
            tokens: list[int] = []
            while engine.has_unfinished():
                for out in engine.step():
                    tokens += out.new_token_ids
                    assert (out.prompt_importance is not None) == (q > 0 and len(tokens) == 1)
            outs[q] = tokens
        assert outs[0] == outs[32]
        engine.leak_check()
    finally:
        runner.close()
