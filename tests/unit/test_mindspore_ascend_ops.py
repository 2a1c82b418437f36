"""The MindSpore backend's attention choice (`attention.select_attention`) and the Ascend fused
path's inputs and wiring, on CPU.

No Ascend hardware exists here, so the fused kernels (ReshapeAndCache, FlashAttentionScore,
PagedAttention) are replaced by numpy emulators written from their documented semantics, and
the Ascend-formulated model runs eagerly (PyNative) against the generic runner's logits. This
checks our layouts (cache [blocks, block_size, kv_heads, D], BSND, block tables, context
lengths, masks, GQA head order), not the NPU kernels themselves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("mindspore")

from mindspore import Tensor  # noqa: E402

from pd_serve.backends.base import DecodeBatch, PrefillBatch, RunnerConfig, SeqChunk  # noqa: E402
from pd_serve.backends.inputs import pack_decode  # noqa: E402
from pd_serve.backends.mindspore import ascend_ops, attention  # noqa: E402
from pd_serve.backends.mindspore import runner as ms_runner  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_cpu_picks_generic_without_probing() -> None:
    def probe() -> list[str]:
        raise AssertionError("cpu must not probe for Ascend")

    choice = attention.select_attention("cpu", "bfloat16", 64, missing=probe)
    assert choice.kind == attention.GENERIC


def test_ascend_without_hardware_names_what_is_missing(tmp_path: Path) -> None:
    def probe() -> list[str]:
        return attention.missing_ascend_parts(tmp_path, {}, [str(tmp_path / "cann")])

    with pytest.raises(RuntimeError) as err:
        attention.select_attention("ascend", "bfloat16", 64, missing=probe)
    text = str(err.value)
    assert "model.device is ascend" in text
    assert "davinci" in text and "libascendcl.so" in text and "set_env.sh" in text


@pytest.mark.skipif(Path("/dev/davinci0").exists(), reason="this machine has an NPU")
def test_ascend_on_this_machine_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="NPU device files"):
        attention.select_attention("ascend", "bfloat16", 64)


@pytest.mark.skipif(Path("/dev/davinci0").exists(), reason="this machine has an NPU")
def test_preflight_check_fails_here(capsys: pytest.CaptureFixture[str]) -> None:
    assert attention.main() == 1  # what tools/npu_launch.py runs on every node first
    assert capsys.readouterr().out.startswith("ascend: missing NPU device files")


def test_probe_accepts_a_complete_install(tmp_path: Path) -> None:
    (tmp_path / "davinci0").touch()
    lib = tmp_path / "cann" / "lib64"
    lib.mkdir(parents=True)
    (lib / "libascendcl.so").touch()
    assert attention.missing_ascend_parts(tmp_path, {"ASCEND_HOME_PATH": str(tmp_path / "cann")},
                                          []) == []  # the pip wheel ships the Ascend plugin


@pytest.mark.parametrize("dtype,head_dim,override,kind", [
    ("bfloat16", 64, "auto", attention.ASCEND_FUSED),
    ("float16", 128, "auto", attention.ASCEND_FUSED),
    ("float32", 64, "auto", attention.GENERIC),
    ("bfloat16", 24, "auto", attention.GENERIC),
    ("bfloat16", 64, "generic", attention.GENERIC),
])
def test_ascend_choice(dtype: str, head_dim: int, override: str, kind: str) -> None:
    choice = attention.select_attention("ascend", dtype, head_dim, missing=list,
                                        override=override)
    assert choice.kind == kind and choice.reason


def test_bad_device_and_override() -> None:
    with pytest.raises(ValueError, match="cpu or ascend"):
        attention.select_attention("cuda", "float32", 64)
    with pytest.raises(ValueError, match="PD_SERVE_MS_ATTENTION"):
        attention.select_attention("ascend", "bfloat16", 64, missing=list, override="fast")


def test_cpu_import_leaves_ascend_ops_unloaded() -> None:
    code = ("import sys, pd_serve.backends.mindspore.runner as r; "
            "print('pd_serve.backends.mindspore.ascend_ops' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_fused_step_inputs_block_tables_and_lengths() -> None:
    block, scratch_block = 16, 20
    batch = DecodeBatch([1, 2], [20, 3], [[3, 7], [5]])
    packed = pack_decode(batch, block, scratch_block * block, pad_to=(4, 1, 48))
    tables, lens = ascend_ops.fused_step_inputs(packed, block)
    s = scratch_block
    assert tables.dtype == np.int32 and lens.dtype == np.int32
    assert tables.tolist() == [[3, 7, s], [5, s, s], [s, s, s], [s, s, s]]
    assert lens.tolist() == [21, 4, 1, 1]  # padding rows attend one scratch key


def test_block_tables_reject_bad_layouts() -> None:
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        ascend_ops.block_tables_from_slots(np.zeros(4, np.int32), 16)
    with pytest.raises(ValueError, match="start a block"):
        ascend_ops.block_tables_from_slots(np.array([[3, 4]], np.int32), 16)


# --- numpy emulators of the fused kernels, from the MindSpore 2.10 docstrings ---------------

class FakeReshapeAndCache:
    """key, value [N, kv, D] into caches [blocks, size, kv, D] at slot_mapping [N]."""

    def __call__(self, key: Any, value: Any, key_cache: Any, value_cache: Any,
                 slot_mapping: Any) -> Any:
        slots = slot_mapping.asnumpy()
        for cache, new in ((key_cache, key), (value_cache, value)):
            flat = cache.asnumpy().reshape(-1, *cache.shape[2:])
            flat[slots] = new.asnumpy()
            cache.set_data(Tensor(flat.reshape(cache.shape), cache.dtype))
        return key


def _softmax_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, hidden: np.ndarray,
                    scale: float) -> np.ndarray:
    """q [T, H, D]; k, v [C, KV, D]; hidden [T, C] -> [T, H, D] (query head h: kv h // group)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("thd,chd->htc", q, k) * scale
    scores = np.where(hidden[None], -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("htc,chd->thd", probs, v)


class FakePagedAttention:
    def __init__(self, head_num: int, scale_value: float, kv_head_num: int) -> None:
        self.scale = scale_value

    def __call__(self, query: Any, key_cache: Any, value_cache: Any, block_tables: Any,
                 context_lens: Any) -> Any:
        """query [B, H, D]; block_tables [B, MB]; context_lens [B] -> [B, H, D]."""
        q, kc, vc = query.asnumpy(), key_cache.asnumpy(), value_cache.asnumpy()
        out = np.zeros_like(q)
        for b, (table, n) in enumerate(zip(block_tables.asnumpy(), context_lens.asnumpy())):
            k = kc[table].reshape(-1, *kc.shape[2:])[:n]  # [n, kv, D]
            v = vc[table].reshape(-1, *vc.shape[2:])[:n]
            out[b] = _softmax_attend(q[b:b + 1], k, v, np.zeros((1, n), bool), self.scale)[0]
        return Tensor(out, query.dtype)


def fake_flash_attention_score(query: Any, key: Any, value: Any, head_num: int, *,
                               attn_mask: Any, scalar_value: float, input_layout: str) -> Any:
    """BSND query [B, T, H, D], key/value [B, C, KV, D], attn_mask [B, 1, T, C] (1: hidden)."""
    assert input_layout == "BSND" and query.shape[2] == head_num
    q, k, v, mask = query.asnumpy(), key.asnumpy(), value.asnumpy(), attn_mask.asnumpy()
    out = np.stack([_softmax_attend(q[b], k[b], v[b], mask[b, 0] == 1, scalar_value)
                    for b in range(q.shape[0])])
    return Tensor(out, query.dtype)


@pytest.fixture()
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    from mindspore.ops.operations import nn_ops

    monkeypatch.setattr(nn_ops, "ReshapeAndCache", FakeReshapeAndCache)
    monkeypatch.setattr(nn_ops, "PagedAttention", FakePagedAttention)
    monkeypatch.setattr(ascend_ops, "flash_attention_score", fake_flash_attention_score)


def _runner(model_dir: Path, fused: bool, monkeypatch: pytest.MonkeyPatch
            ) -> ms_runner.MindSporeRunner:
    if fused:
        choice = attention.AttentionChoice(attention.ASCEND_FUSED, "test: emulated kernels")
        monkeypatch.setattr(ms_runner, "select_attention", lambda *a: choice)
    runner = ms_runner.MindSporeRunner(RunnerConfig(model_dir=str(model_dir), num_blocks=24))
    if fused:
        runner._forward = runner.model.construct  # eager: the emulators are Python
    return runner


def _steps(runner: ms_runner.MindSporeRunner) -> list[np.ndarray]:
    """Prefill two prompts, a prefix-cached chunk, decode with batch padding, a KV round trip."""
    rng = np.random.RandomState(1)
    a, b = ([int(t) for t in rng.randint(1, 1000, n)] for n in (37, 20))
    out = list(runner.prefill(PrefillBatch([SeqChunk(a, 0, [0, 1, 2]), SeqChunk(b, 0, [5, 6])],
                                           return_all_logits=True)))
    out.append(np.asarray(runner.prefill(PrefillBatch([SeqChunk([7, 8, 9], 37, [0, 1, 2])]))))
    out.append(runner.decode(DecodeBatch([3, 4, 5], [40, 20, 0], [[0, 1, 2], [5, 6], [9]])))
    kv = runner.read_kv([0, 1, 2], 41)
    runner.write_kv([10, 11, 12], kv)
    out.append(kv)
    out.append(runner.decode(DecodeBatch([7], [41], [[10, 11, 12]])))
    return out


def test_fused_formulation_matches_generic(emulated: None, demo_model_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    generic = _runner(demo_model_dir, False, monkeypatch)
    want = _steps(generic)
    generic.close()
    fused = _runner(demo_model_dir, True, monkeypatch)
    cache = fused.model.layers[0].attn.kernel.k_cache
    assert cache.shape == (25, 16, 4, 32)  # [num_blocks + scratch, block_size, kv_heads, D]
    got = _steps(fused)
    fused.close()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)
