"""Parity of the MindSpore backend with transformers on every tiny checkpoint variant.

Tolerance: float32 on CPU, max abs logit difference <= 1e-4 (observed ~5e-6 on logits of
magnitude ~3). One runner per variant is shared by the module (graph compiles dominate the time).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from pd_serve.backends.base import DecodeBatch, PrefillBatch, RunnerConfig, SeqChunk
from tests.checkpoints import load_hf_model

if TYPE_CHECKING:
    from pd_serve.backends.mindspore.runner import MindSporeRunner
    from tests.checkpoints import HFCausalLM

    Pair = tuple[MindSporeRunner, HFCausalLM]  # (our runner, transformers reference)

ms_runner = pytest.importorskip("pd_serve.backends.mindspore.runner")
torch = pytest.importorskip("torch")

ATOL = 1e-4
BLOCK = 16
VARIANT_NAMES = ["llama", "llama-untied", "llama3-scaled", "qwen2", "qwen3", "llama-sharded"]


def prompt(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(1, 1024, n)]


def blocks(first: int, n_tokens: int) -> list[int]:
    return list(range(first, first + -(-n_tokens // BLOCK)))


@pytest.fixture(scope="module", params=VARIANT_NAMES)
def pair(request: pytest.FixtureRequest, tiny_checkpoints: dict[str, Path]) -> Iterator[Pair]:
    """(runner, hf_model) for one variant; the runner has 16 blocks of 16 tokens."""
    model_dir = tiny_checkpoints[request.param]
    runner = ms_runner.MindSporeRunner(RunnerConfig(model_dir=str(model_dir), block_size=BLOCK,
                                                    num_blocks=16))
    yield runner, load_hf_model(model_dir)
    runner.close()


def hf_logits(hf: HFCausalLM, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits of every position."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def hf_generate(hf: HFCausalLM, ids: list[int], new: int) -> list[int]:
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        out = hf.generate(torch.tensor([ids]), attention_mask=mask, do_sample=False,
                          max_new_tokens=new)
    return out[0, len(ids):].tolist()


def test_prefill_all_logits_match_hf(pair: Pair) -> None:
    runner, hf = pair
    ids = prompt(37)
    out = runner.prefill(PrefillBatch([SeqChunk(ids, 0, blocks(0, 37))], return_all_logits=True))
    assert out[0].shape == (37, runner.model_config.vocab_size) and out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_decode_steps_match_hf(pair: Pair) -> None:
    runner, hf = pair
    ids = prompt(37)
    seq = ids + hf_generate(hf, ids, 8)  # HF's argmax tokens are fed back step by step
    ref = hf_logits(hf, seq)
    table = blocks(0, len(seq))
    last = runner.prefill(PrefillBatch([SeqChunk(ids, 0, table)]))
    np.testing.assert_allclose(last[0], ref[36], atol=ATOL, rtol=0)
    for pos in range(37, len(seq)):
        logits = runner.decode(DecodeBatch([seq[pos]], [pos], [table]))
        np.testing.assert_allclose(logits[0], ref[pos], atol=ATOL, rtol=0)


def greedy(runner: MindSporeRunner, ids: list[int], new: int, table: list[int]) -> list[int]:
    eos = set(runner.model_config.eos_token_ids)
    out = [int(runner.prefill(PrefillBatch([SeqChunk(ids, 0, table)]))[0].argmax())]
    while len(out) < new and out[-1] not in eos:
        pos = len(ids) + len(out) - 1
        out.append(int(runner.decode(DecodeBatch([out[-1]], [pos], [table]))[0].argmax()))
    return out


def test_greedy_generation_matches_hf_generate(pair: Pair) -> None:
    runner, hf = pair
    ids = prompt(37, seed=1)
    assert greedy(runner, ids, 12, blocks(2, 49)) == hf_generate(hf, ids, 12)


def test_batched_prefill_equals_each_alone(pair: Pair) -> None:
    runner, _ = pair
    prompts = [prompt(37, seed=2), prompt(50, seed=3), prompt(20, seed=4)]
    tables = [blocks(0, 37), blocks(3, 50), blocks(7, 20)]
    batch = runner.prefill(PrefillBatch([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]))
    assert isinstance(batch, np.ndarray) and batch.shape == (3, runner.model_config.vocab_size)
    for i, (p, t) in enumerate(zip(prompts, tables)):
        alone = runner.prefill(PrefillBatch([SeqChunk(p, 0, t)]))
        np.testing.assert_allclose(batch[i], alone[0], atol=ATOL, rtol=0)


def test_prefix_cached_prefill_equals_cold(pair: Pair) -> None:
    runner, _ = pair
    ids = prompt(37, seed=5)
    cold = runner.prefill(PrefillBatch([SeqChunk(ids, 0, blocks(0, 37))]))
    table = blocks(4, 37)
    runner.prefill(PrefillBatch([SeqChunk(ids[:32], 0, table[:2])]))
    warm = runner.prefill(PrefillBatch([SeqChunk(ids[32:], 32, table)]))
    np.testing.assert_allclose(warm[0], cold[0], atol=ATOL, rtol=0)


def test_kv_round_trip_into_other_blocks(pair: Pair) -> None:
    runner, _ = pair
    ids, src, dst = prompt(37, seed=6), [0, 1, 2], [9, 5, 11]
    runner.prefill(PrefillBatch([SeqChunk(ids, 0, src)]))
    kv = runner.read_kv(src, 37)
    mc = runner.model_config
    assert kv.shape == (mc.num_layers, 2, 37, mc.num_kv_heads, mc.head_dim)
    runner.write_kv(dst, kv)
    np.testing.assert_array_equal(runner.read_kv(dst, 37), kv)
    with pytest.raises(ValueError, match="shape"):
        runner.write_kv(dst, kv[:, :1])
    with pytest.raises(ValueError, match="ids outside"):
        runner.read_kv([16], 3)
    one = runner.decode(DecodeBatch([7], [37], [src]))
    both = runner.decode(DecodeBatch([7, 7], [37, 37], [src, dst]))
    np.testing.assert_allclose(both[0], one[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(both[1], one[0], atol=ATOL, rtol=0)


def test_lengths_in_one_bucket_compile_once(pair: Pair) -> None:
    runner, _ = pair
    before = set(runner.compiled_shapes)
    for n in (33, 45, 64):
        runner.prefill(PrefillBatch([SeqChunk(prompt(n), 0, blocks(0, n))]))
    for pos in (40, 50, 63):
        runner.decode(DecodeBatch([1], [pos], [blocks(0, 64)]))
    buckets = {(1, 64, 64, 1), (1, 1, 64, 1)}  # (B, T, C, logit rows)
    assert runner.compiled_shapes - before <= buckets <= runner.compiled_shapes


def test_warmup_compiles_buckets_without_touching_blocks(tiny_checkpoints: dict[str, Path]) -> None:
    runner = ms_runner.MindSporeRunner(RunnerConfig(model_dir=str(tiny_checkpoints["llama"]),
                                                    block_size=BLOCK, num_blocks=8))
    ids = prompt(100)
    runner.prefill(PrefillBatch([SeqChunk(ids, 0, blocks(0, 100))]))
    kv = runner.read_kv(blocks(0, 100), 100)
    assert runner.warmup(batch_sizes=(3,), prefill_lens=(100,), decode_contexts=(100,)) == 1
    assert runner.compiled_shapes == {(1, 128, 128, 1), (4, 1, 128, 4)}
    np.testing.assert_array_equal(runner.read_kv(blocks(0, 100), 100), kv)
    runner.close()
