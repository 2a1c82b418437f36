"""The torch runner's fast path run on CPU (float32) against the plain formulation.

CUDA graphs cannot run here, but the fast path's padded static-buffer decode (the step a graph
records) does: on CPU with graphs on it pads every step to its bucket and runs it eagerly. Each
decode attention backend runs: torch, flex (eager) and triton (pd_kernels' CPU reference).
Tolerance: 1e-5 max abs logit difference (float32; observed ~2e-6 with logits of std ~0.8,
from different summation orders in SDPA). Every test ends by checking that blocks outside the
tables it used were never written (the runner writes only its slots and the scratch block).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from pd_serve.backends.base import DecodeBatch, PrefillBatch, RunnerConfig, SeqChunk
from pd_serve.backends.torch.cuda_graphs import Layout, pack_rows
from pd_serve.backends.torch.options import TorchOptions, context_buckets
from pd_serve.backends.torch.runner import TorchRunner
from pd_serve.models.random_init import write_random_model

TOL = 1e-5
BLOCKS = 48
Pair = tuple[TorchRunner, TorchRunner]  # (plain, fast)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # std 0.05: larger weights than the default make layer bugs visible in the logits
    return write_random_model(tmp_path_factory.mktemp("rand") / "tiny", "tiny", seed=1, std=0.05)


@pytest.fixture(scope="module", params=["torch", "flex", "triton", "triton-unfused"])
def runners(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[Pair]:
    """(plain, fast) runners; the fast one with the given decode attention and, unless
    "-unfused", the fused layer ops (their torch references on CPU; the tiny model's head dim
    is a power of two, so they cover it)."""
    cfg = RunnerConfig(str(model_dir), backend="torch", block_size=16, num_blocks=BLOCKS,
                       max_model_len=512)
    attention, _, unfused = request.param.partition("-")
    plain = TorchRunner(cfg, TorchOptions(fast=False))
    fast = TorchRunner(cfg, TorchOptions(fast=True, decode_attention=attention,
                                         graph_batch_sizes=(1, 2, 4), graph_contexts=(64, 128),
                                         fused=not unfused))
    assert plain.fast is None and fast.fast is not None
    assert (fast.fast.ops is None) == bool(unfused)
    yield plain, fast
    plain.close()
    fast.close()


def prompt(n: int, seed: int) -> list[int]:
    return np.random.RandomState(seed).randint(0, 512, size=n).tolist()


_used: weakref.WeakKeyDictionary[TorchRunner, set[int]] = weakref.WeakKeyDictionary()


def assert_untouched(runner: TorchRunner, used: set[int]) -> None:
    """Blocks outside `used` by this and earlier tests on the runner hold zeros: no stray
    writes (padding goes to the scratch block, which is not checked)."""
    seen = _used.setdefault(runner, set())
    seen |= used
    others = [b for b in range(runner.num_blocks) if b not in seen]
    assert not runner.kv_blocks[:, :, others].any()


def test_prefill_batched_all_logits(runners: Pair) -> None:
    plain, fast = runners
    seqs = [SeqChunk(prompt(37, 0), 0, [0, 1, 2]), SeqChunk(prompt(20, 1), 0, [3, 4]),
            SeqChunk(prompt(9, 2), 0, [5])]
    ref = plain.prefill(PrefillBatch(seqs, return_all_logits=True))
    ours = fast.prefill(PrefillBatch(seqs, return_all_logits=True))
    assert isinstance(ours, list) and [o.shape for o in ours] == [r.shape for r in ref]
    for o, r in zip(ours, ref):
        assert o.dtype == np.float32 and np.abs(o - r).max() <= TOL
    last = fast.prefill(PrefillBatch(seqs))
    assert isinstance(last, np.ndarray)
    assert np.abs(last - np.stack([r[-1] for r in ref])).max() <= TOL
    np.testing.assert_array_equal(fast.prefill_argmax(PrefillBatch(seqs)), last.argmax(-1))
    assert np.abs(fast.read_kv([0, 1, 2], 37) - plain.read_kv([0, 1, 2], 37)).max() <= TOL
    assert_untouched(fast, set(range(6)))


def test_layer_hook_sees_each_layer_written(runners: Pair) -> None:
    """Both paths call the layer-wise hand-off hook once per layer, in order, with that
    layer's K/V already final in the cache, and never during decode."""
    ids = prompt(21, 7)
    for r in runners:
        snapshots: list[tuple[int, np.ndarray]] = []
        r.layer_hook = lambda i, r=r, out=snapshots: out.append(
            (i, r.read_kv_layer([10, 11], 21, i)))
        try:
            r.prefill_argmax(PrefillBatch([SeqChunk(ids, 0, [10, 11])]))
            r.decode_argmax(DecodeBatch([5], [21], [[10, 11]]))
        finally:
            r.layer_hook = None
        final = r.read_kv([10, 11], 21)
        assert [i for i, _ in snapshots] == list(range(r.model_config.num_layers))
        assert all(np.array_equal(kv, final[i]) for i, kv in snapshots)
    assert_untouched(runners[1], {10, 11})


def test_prefix_hit_and_chunked_prefill(runners: Pair) -> None:
    plain, fast = runners
    ids = prompt(45, 3)
    for r in runners:  # blocks 6, 7 cached by a first request; a fresh prompt beside the hit
        r.prefill(PrefillBatch([SeqChunk(ids[:32], 0, [6, 7])]))
    seqs = [SeqChunk(ids[32:], 32, [6, 7, 8]), SeqChunk(prompt(5, 4), 0, [9])]
    ref, ours = plain.prefill(PrefillBatch(seqs)), fast.prefill(PrefillBatch(seqs))
    assert isinstance(ours, np.ndarray) and isinstance(ref, np.ndarray)
    assert np.abs(ours - ref).max() <= TOL
    cold = fast.prefill(PrefillBatch([SeqChunk(ids, 0, [10, 11, 12])]))
    assert isinstance(cold, np.ndarray) and np.abs(cold[0] - ours[0]).max() <= TOL
    assert_untouched(fast, set(range(6, 13)))


def test_ragged_decode_padded_buckets(runners: Pair) -> None:
    plain, fast = runners
    lens, tables = [37, 20, 9], [[13, 14, 15], [16, 17], [18]]
    seqs = [SeqChunk(prompt(n, 10 + i), 0, t) for i, (n, t) in enumerate(zip(lens, tables))]
    for r in runners:
        r.prefill(PrefillBatch(seqs))
    for step in range(3):  # 3 rows pad to the bucket of 4; position 47 crosses into block 2
        batch = DecodeBatch([5 + step, 6, 7], [n + step for n in lens], tables)
        ref, ours = plain.decode(batch), fast.decode(batch)
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= TOL
        np.testing.assert_array_equal(fast.decode_argmax(batch), ours.argmax(-1))
    assert_untouched(fast, set(range(13, 19)))


def test_decode_beyond_buckets_runs_unpadded(runners: Pair) -> None:
    plain, fast = runners
    tables = [[19 + i] for i in range(6)]  # 6 rows > largest bucket of 4
    batch = DecodeBatch(list(range(1, 7)), [3] * 6, tables)
    ref, ours = plain.decode(batch), fast.decode(batch)
    assert np.abs(ours - ref).max() <= TOL
    long_batch = DecodeBatch([1], [300], [list(range(25, 44))])  # 19 blocks > 8 of bucket 128
    assert np.abs(plain.decode(long_batch) - fast.decode(long_batch)).max() <= TOL
    assert_untouched(fast, set(range(19, 44)))


def test_device_kv_round_trip(runners: Pair) -> None:
    _, fast = runners
    mc = fast.model_config
    fast.prefill(PrefillBatch([SeqChunk(prompt(37, 20), 0, [44, 45, 46])]))
    out = torch.empty(mc.num_layers * 2 * 37 * mc.num_kv_heads * mc.head_dim)  # flat buffer
    fast.gather_kv_device([44, 45, 46], 37, out)
    expected = fast.read_kv([44, 45, 46], 37)
    np.testing.assert_array_equal(out.view(expected.shape).numpy(), expected)
    fast.scatter_kv_device([47, 0, 1], out, 37)
    np.testing.assert_array_equal(fast.read_kv([47, 0, 1], 37), expected)
    raw = torch.zeros(out.numel() * 4 + 64, dtype=torch.uint8)  # a larger byte buffer
    fast.gather_kv_device([44, 45, 46], 37, raw)
    np.testing.assert_array_equal(raw[:out.numel() * 4].view(torch.float32).numpy(), out.numpy())
    assert not raw[out.numel() * 4:].any()
    fast.write_kv([2, 3, 4], torch.from_numpy(expected))  # a tensor in the read_kv layout
    np.testing.assert_array_equal(fast.read_kv([2, 3, 4], 37), expected)
    with pytest.raises(ValueError, match="KV buffer"):
        fast.gather_kv_device([44, 45, 46], 37, torch.empty(5))
    with pytest.raises(ValueError, match="do not fit"):
        fast.gather_kv_device([44], 37, out)
    assert_untouched(fast, set(range(BLOCKS)))


def test_fast_decode_rejects_bad_input(runners: Pair) -> None:
    _, fast = runners
    with pytest.raises(ValueError, match="outside"):
        fast.decode(DecodeBatch([1], [3], [[BLOCKS]]))
    with pytest.raises(ValueError, match="max_model_len"):
        fast.decode(DecodeBatch([1], [512], [list(range(32))]))
    with pytest.raises(ValueError, match="cannot hold"):
        fast.decode(DecodeBatch([1], [40], [[1, 2]]))
    with pytest.raises(ValueError, match="token ids"):
        fast.decode_argmax(DecodeBatch([512], [3], [[1]]))
    with pytest.raises(ValueError, match="token_ids"):
        fast.decode(DecodeBatch([1, 2], [3], [[1]]))


def test_pack_rows_padding() -> None:
    lay = Layout(block_size=4, scratch_block=9, max_model_len=64, vocab_size=100)
    host = np.full(2 * (4 + 3), -7, dtype=np.int32)
    pack_rows(host, DecodeBatch([42], [5], [[3, 1, 8]]), rows=2, cols=3, lay=lay)
    tok, pos, slot, ctx, tab = host[0:2], host[2:4], host[4:6], host[6:8], host[8:].reshape(2, 3)
    assert tok.tolist() == [42, 0] and pos.tolist() == [5, 0] and ctx.tolist() == [6, 1]
    assert slot.tolist() == [1 * 4 + 1, 9 * 4]  # position 5 -> block 1 offset 1; pad -> scratch
    assert tab.tolist() == [[3, 1, 9], [9, 9, 9]]  # only the blocks in use; the rest scratch


def test_options_env_and_buckets() -> None:
    env = {"PD_SERVE_TORCH_FAST": "1", "PD_SERVE_TORCH_GRAPHS": "0",
           "PD_SERVE_TORCH_ATTENTION": "flex", "PD_SERVE_TORCH_GRAPH_BATCH": "20",
           "PD_SERVE_TORCH_FUSED": "0"}
    with mock.patch.dict(os.environ, env):
        opts = TorchOptions.from_env()
    assert opts.fast is True and opts.cuda_graphs is False and opts.decode_attention == "flex"
    assert opts.fused is False and TorchOptions().fused is False
    with mock.patch.dict(os.environ, {"PD_SERVE_TORCH_FUSED": "1"}):
        assert TorchOptions.from_env().fused is True
    assert opts.graph_batch_sizes == (1, 2, 4, 8, 16, 20)
    with mock.patch.dict(os.environ, {"PD_SERVE_TORCH_GRAPHS": "yes"}):
        with pytest.raises(ValueError, match="PD_SERVE_TORCH_GRAPHS"):
            TorchOptions.from_env()
    with pytest.raises(ValueError, match="decode_attention"):
        TorchOptions(decode_attention="cudnn")
    with pytest.raises(ValueError, match="increasing"):
        TorchOptions(graph_batch_sizes=(4, 2))
    assert context_buckets(TorchOptions(), 2000) == (256, 512, 1024, 2000)
    assert context_buckets(TorchOptions(graph_contexts=(4096, 64)), 1024) == (64, 1024)
