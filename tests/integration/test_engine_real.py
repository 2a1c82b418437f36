"""LLMEngine over the real torch runner and the demo model: prefix-cache hits, preemption,
chunked prefill and batching must not change greedy output."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from pd_serve.backends.base import ModelRunner, RunnerConfig
from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer
from tests.checkpoints import DEMO_MODEL

pytest.importorskip("torch")
pytest.importorskip("pd_serve.backends.torch.runner")
pytestmark = pytest.mark.slow  # about 40 s on two CPU cores

BLOCK = 16
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
TEXTS = [
    "ROMEO:\nBut soft, what light through yonder window breaks? It is the east",
    "ROMEO:\nBut soft, what light through yonder window breaks? Arise, fair sun",
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo? Deny thy father",
    "KING RICHARD III:\nNow is the winter of our discontent made glorious summer",
]


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    from pd_serve.backends import create_runner

    r = create_runner(RunnerConfig(model_dir=str(DEMO_MODEL), backend="torch",
                                   block_size=BLOCK, num_blocks=64, threads=2))
    yield r
    r.close()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(DEMO_MODEL)


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]


def engine(runner: ModelRunner, tokenizer: Tokenizer, num_blocks: int = 64,
           prefix: bool = True, budget: int = 512) -> LLMEngine:
    # Engines share the runner's cache one after another; each starts with an empty prefix
    # cache, so stale K/V from an earlier engine is never read.
    return LLMEngine(runner, tokenizer, CacheConfig(BLOCK, num_blocks, prefix),
                     SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget))


@pytest.fixture(scope="module")
def solo(runner: ModelRunner, tokenizer: Tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt generated alone, with no prefix cache: the reference output."""
    out = []
    for p in prompts:
        e = engine(runner, tokenizer, prefix=False)
        out.append(e.generate([p], PARAMS)[0].new_token_ids)
        e.leak_check()
    return out


def test_batch_equals_single(runner: ModelRunner, tokenizer: Tokenizer,
                             prompts: list[list[int]], solo: list[list[int]]) -> None:
    e = engine(runner, tokenizer, prefix=False)
    batch = e.generate(prompts, PARAMS)
    assert [o.new_token_ids for o in batch] == solo
    e.leak_check()


def test_prefix_cache_hit_equals_cold(runner: ModelRunner, tokenizer: Tokenizer,
                                      prompts: list[list[int]], solo: list[list[int]]) -> None:
    e = engine(runner, tokenizer)
    first = e.generate([prompts[0]], PARAMS)[0]
    again, sibling = e.generate([prompts[0], prompts[1]], PARAMS)
    assert again.cached_tokens > 0 and sibling.cached_tokens > 0
    assert again.new_token_ids == first.new_token_ids == solo[0]
    assert sibling.new_token_ids == solo[1]
    e.leak_check()


def test_preemption_equals_no_preemption(runner: ModelRunner, tokenizer: Tokenizer,
                                         prompts: list[list[int]],
        solo: list[list[int]]) -> None:
    e = engine(runner, tokenizer, num_blocks=6)  # each request needs up to 3 blocks
    outs = e.generate(prompts, PARAMS)
    assert e.stats().num_preemptions > 0
    assert [o.new_token_ids for o in outs] == solo
    e.leak_check()


def test_chunked_prefill_equals_unchunked(runner: ModelRunner, tokenizer: Tokenizer,
                                          prompts: list[list[int]],
        solo: list[list[int]]) -> None:
    e = engine(runner, tokenizer, prefix=False, budget=8)
    outs = e.generate(prompts, PARAMS)
    assert [o.new_token_ids for o in outs] == solo
    e.leak_check()


def test_layer_hooks_stage_each_completing_prompt_once(runner: ModelRunner,
                                                       tokenizer: Tokenizer,
                                                       prompts: list[list[int]]) -> None:
    """Layer-wise hand-off: with chunked prefill (budget 16), each hooked request's stage runs
    once per layer, in order, in the step its prompt completes, and sees that layer's final
    K/V; a stage that raises is dropped without failing the step or the other requests."""
    e = engine(runner, tokenizer, prefix=False, budget=16)
    seen: dict[str, list[tuple[int, int, np.ndarray]]] = {"a": [], "b": []}

    def recorder(rid: str) -> Any:
        def stage(layer: int, table: list[int], n: int) -> None:
            seen[rid].append((layer, n, runner.read_kv_layer(table, n, layer)))
        return stage

    def broken(layer: int, table: list[int], n: int) -> None:
        raise RuntimeError("staging failed")

    params = SamplingParams(max_tokens=4, temperature=0.0)
    e.add_request("a", prompts[0], params, prefill_only=True, on_layer=recorder("a"))
    e.add_request("b", prompts[1], params, prefill_only=True, on_layer=recorder("b"))
    e.add_request("c", prompts[2], params, prefill_only=True, on_layer=broken)
    firsts: dict[str, Any] = {}
    while len(firsts) < 3:
        for out in e.step():
            firsts[out.request_id] = out
    layers = runner.model_config.num_layers
    for rid, prompt in (("a", prompts[0]), ("b", prompts[1])):
        assert len(prompt) > 16  # chunked: only the completing step stages
        assert [(layer, n) for layer, n, _ in seen[rid]] == [(i, len(prompt))
                                                             for i in range(layers)]
        table, n = e.handoff_blocks(rid)
        final = runner.read_kv(table, n)
        assert all(np.array_equal(kv, final[i]) for i, _, kv in seen[rid])
    assert not firsts["c"].finished  # the broken stage did not fail its request
    for rid in ("a", "b", "c"):
        e.release_handoff(rid)
    e.leak_check()


def test_layer_hooks_need_a_runner_that_calls_them(tokenizer: Tokenizer) -> None:
    from tests.fakes import FakeModelRunner

    fake = FakeModelRunner(block_size=BLOCK)
    e = LLMEngine(fake, tokenizer, CacheConfig(BLOCK, 16, False), SchedulerConfig())
    with pytest.raises(ValueError, match="per-layer hook"):
        e.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2), prefill_only=True,
                      on_layer=lambda *_: None)
    e.leak_check()
