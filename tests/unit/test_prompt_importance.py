"""Prompt-token importance (P/D-Device refinement): the torch runner's scores equal the attention
transformers reports (eager attention, last q rows, summed over heads and layers) on every tiny
variant, read the cache without changing it, and ride on the engine's first output; a backend
without scores refuses such requests up front; greedy tokens are the same with or without."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pd_serve.backends.base import PrefillBatch, RunnerConfig, SeqChunk
from pd_serve.backends.torch.runner import TorchRunner
from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.importance import check_importance
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer
from tests.checkpoints import DEMO_MODEL, VARIANTS
from tests.fakes import FakeModelRunner


def hf_importance(model_dir: Path, ids: list[int], q: int) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32",
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True)
    total = sum(a[0, :, -q:, :].sum(dim=(0, 1)) for a in out.attentions)  # [L]
    assert isinstance(total, torch.Tensor)
    return (total / total.sum()).numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("length", "q"), [(50, 8), (5, 32), (1, 1)])
def test_scores_equal_transformers_attention(tiny_checkpoints: dict[str, Path], variant: str,
                                             length: int, q: int) -> None:
    runner = TorchRunner(RunnerConfig(str(tiny_checkpoints[variant]), backend="torch",
                                      block_size=16, num_blocks=12))
    try:
        ids = np.random.RandomState(length).randint(1, 1024, size=length).tolist()
        table = [7, 2, 11, 0][:-(-length // 16)]  # scattered blocks
        runner.prefill(PrefillBatch([SeqChunk(ids, 0, table)]))
        cache = runner.kv_cache.clone()
        scores = runner.prefill_importance(PrefillBatch([SeqChunk(ids, 0, table)]), q)[0]
        assert torch.equal(cache, runner.kv_cache)  # read only
        assert scores.shape == (length,) and scores.dtype == np.float32
        assert scores.sum() == pytest.approx(1.0, abs=1e-5)
        ref = hf_importance(tiny_checkpoints[variant], ids, min(q, length))
        np.testing.assert_allclose(scores, ref, atol=1e-6)
    finally:
        runner.close()


def test_runner_refuses_partial_prompts(tiny_checkpoints: dict[str, Path]) -> None:
    runner = TorchRunner(RunnerConfig(str(tiny_checkpoints["llama"]), backend="torch",
                                      block_size=16, num_blocks=4))
    with pytest.raises(ValueError, match="start_pos 0"):
        runner.prefill_importance(PrefillBatch([SeqChunk([1, 2], 3, [0])]), 4)
    with pytest.raises(ValueError, match="last_q"):
        runner.prefill_importance(PrefillBatch([SeqChunk([1, 2], 0, [0])]), 0)
    runner.close()


def engine_over_demo(budget: int = 2048) -> LLMEngine:
    runner = TorchRunner(RunnerConfig(str(DEMO_MODEL), backend="torch", block_size=16,
                                      num_blocks=64, threads=2))
    return LLMEngine(runner, Tokenizer(DEMO_MODEL), CacheConfig(16, 64, True),
                     SchedulerConfig(8, budget, None), seed=0)


def run(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams,
        importance_q: int) -> dict[str, list[Any]]:
    for rid, p in prompts.items():
        engine.add_request(rid, p, params, importance_q=importance_q)
    outs: dict[str, list[Any]] = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    engine.leak_check()
    return outs


@pytest.mark.parametrize("budget", [2048, 24])  # 24: chunked prefill over several steps
def test_engine_first_output_carries_scores(budget: int) -> None:
    tok = Tokenizer(DEMO_MODEL)
    prompts = {"a": tok.encode("ROMEO:\nWhat light through yonder window breaks?\n"),
               "b": tok.encode("KING HENRY:\nOnce more unto the breach"), "c": [5]}
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = engine_over_demo(budget)
    plain = run(engine, prompts, params, 0)
    scored = run(engine, prompts, params, 8)  # prefix-cache hits this time: still scored
    for rid, p in prompts.items():
        assert [o.new_token_ids for o in scored[rid]] == [o.new_token_ids for o in plain[rid]]
        first, *rest = scored[rid]
        assert first.prompt_importance is not None and first.prompt_importance.shape == (len(p),)
        assert all(o.prompt_importance is None for o in rest + plain[rid])
    one = run(engine, {"d": prompts["a"]}, SamplingParams(max_tokens=1, temperature=0.0), 4)
    assert one["d"][0].finished and one["d"][0].prompt_importance is not None


def test_backends_without_scores_refuse() -> None:
    fake = FakeModelRunner(block_size=4, num_blocks=8)
    assert not fake.supports_importance
    with pytest.raises(ValueError, match="cannot score prompt tokens"):
        check_importance(fake, 8)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="importance_q"):
            check_importance(fake, bad)  # type: ignore[arg-type]
    check_importance(fake, 0)
