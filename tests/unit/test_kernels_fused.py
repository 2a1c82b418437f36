"""pd_kernels' fused layer ops: the references against the torch model's own formulation (every
dtype, exact where the rounding points agree), argument checks, and the Triton kernels under
the Triton interpreter (where triton is installed), in a subprocess so TRITON_INTERPRET cannot
leak into other tests."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from pd_serve.backends.torch.kernels import load_pd_kernels
from pd_serve.backends.torch.model import apply_rope, rms_norm
from tests.triton_interp import run_under_interpreter, script_main


def _kernels() -> ModuleType:
    module = load_pd_kernels()
    assert module is not None, "kernels/ is missing from the source tree"
    return module


pk = _kernels()

H, KVH, D, S = 4, 2, 8, 40


def rope_case(dtype: torch.dtype, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """qkv [n, (H + 2 KVH) D], positions [n], cos/sin [64, D], slots [n] (distinct), caches."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (H + 2 * KVH) * D, generator=gen).to(dtype)
    positions = torch.randint(0, 64, (n,), generator=gen)
    angles = torch.rand(64, D // 2, generator=gen) * 6
    cos = torch.cat([angles.cos()] * 2, dim=1).to(dtype)  # [64, D]
    sin = torch.cat([angles.sin()] * 2, dim=1).to(dtype)
    slots = torch.randperm(S, generator=gen)[:n]
    caches = torch.zeros(2, S, KVH, D, dtype=dtype)
    return qkv, positions, cos, sin, slots, caches[0], caches[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cache_matches_the_model_formulation(dtype: torch.dtype) -> None:
    qkv, positions, cos, sin, slots, k_cache, v_cache = rope_case(dtype, 7)
    q, k = pk.rope_qk_cache(qkv, positions, cos, sin, slots, k_cache, v_cache, H, want_k=True)
    wq, wk, wv = qkv.split([H * D, KVH * D, KVH * D], dim=1)
    c, s = cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)
    want_q = apply_rope(wq.unflatten(-1, (H, D)), c, s)
    want_k = apply_rope(wk.unflatten(-1, (KVH, D)), c, s)
    assert k is not None and torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(k_cache[slots], want_k)
    assert torch.equal(v_cache[slots], wv.unflatten(-1, (KVH, D)))
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()
    q2, k2 = pk.rope_qk_cache(qkv, positions, cos, sin, None, k_cache[:0], v_cache[:0], H, False)
    assert k2 is None and torch.equal(q2, want_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_silu_mul_match_the_model(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(5, 32, generator=gen).to(dtype)
    delta = torch.randn(5, 32, generator=gen).to(dtype)
    weight = (1 + torch.randn(32, generator=gen) / 4).to(dtype)
    want_h = h + delta
    x = pk.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(h, want_h)  # the residual is updated in place
    assert torch.equal(x, rms_norm(want_h, weight, 1e-5))
    assert torch.equal(pk.add_rms_norm(h, None, weight, 1e-5), rms_norm(want_h, weight, 1e-5))
    assert torch.equal(h, want_h)
    gu = torch.randn(5, 24, generator=gen).to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    assert torch.equal(pk.silu_mul(gu), F.silu(gate) * up)


def test_layer_ops_reject_bad_arguments() -> None:
    qkv, positions, cos, sin, slots, k_cache, v_cache = rope_case(torch.float32, 3)
    with pytest.raises(ValueError, match="columns"):
        pk.rope_qk_cache(qkv, positions, cos, sin, slots, k_cache, v_cache, H + 1, True)
    with pytest.raises(ValueError, match="positions and slots"):
        pk.rope_qk_cache(qkv, positions[:2], cos, sin, slots, k_cache, v_cache, H, True)
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        pk.rope_qk_cache(qkv, positions, cos, sin, slots, k_cache, v_cache[:, :1], H, True)
    with pytest.raises(ValueError, match="delta"):
        pk.add_rms_norm(torch.zeros(2, 4), torch.zeros(3, 4), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        pk.add_rms_norm(torch.zeros(2, 4), None, torch.ones(5), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        pk.add_rms_norm(torch.zeros(4, 2).t(), None, torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="halves"):
        pk.silu_mul(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pk.silu_mul([[1.0, 2.0]])


def interpreter_checks() -> list[str]:
    """The Triton kernels (run on CPU tensors by the interpreter) against the references.
    float16 stands in for bfloat16: the interpreter's bfloat16 casts truncate where the GPU's
    round to nearest even (tests/gpu/test_kernels.py checks bfloat16 on the GPU)."""
    from pd_kernels.fused import add_rms_norm_triton, rope_cache_triton, silu_mul_triton

    failures = []
    for dtype in (torch.float32, torch.float16):
        qkv, positions, cos, sin, slots, k_cache, v_cache = rope_case(dtype, 6, seed=5)
        got = [torch.empty(6, H, D, dtype=dtype), torch.empty(6, KVH, D, dtype=dtype),
               k_cache.clone(), v_cache.clone()]
        rope_cache_triton(qkv, positions, cos, sin, slots, got[2], got[3], got[0], got[1])
        want = [torch.empty(6, H, D, dtype=dtype), torch.empty(6, KVH, D, dtype=dtype),
                k_cache.clone(), v_cache.clone()]
        pk.reference.ref_rope_cache(qkv, positions, cos, sin, slots, want[2], want[3], want[0],
                                    want[1])
        if not all(torch.equal(g, w) for g, w in zip(got, want)):
            failures.append(f"rope_cache {dtype}")
        gen = torch.Generator().manual_seed(9)
        h = torch.randn(3, 48, generator=gen).to(dtype)  # 48: a masked tail in the 64 block
        delta, weight = torch.randn(3, 48, generator=gen).to(dtype), torch.rand(48).to(dtype)
        h_ref, x_ref = h.clone(), torch.empty_like(h)
        pk.reference.ref_add_rms_norm(h_ref, delta, weight, 1e-6, x_ref)
        x = torch.empty_like(h)
        add_rms_norm_triton(h, delta, weight, 1e-6, x)
        tol = 1e-6 if dtype == torch.float32 else 4e-3  # the sum order may move one ulp
        if not torch.equal(h, h_ref) or (x.float() - x_ref.float()).abs().max() > tol:
            failures.append(f"add_rms_norm {dtype}")
        gu = torch.randn(3, 2 * 40, generator=gen).to(dtype)
        out, ref = torch.empty(3, 40, dtype=dtype), torch.empty(3, 40, dtype=dtype)
        silu_mul_triton(gu, out)
        pk.reference.ref_silu_mul(gu, ref)
        if (out.float() - ref.float()).abs().max() > tol:
            failures.append(f"silu_mul {dtype}")
    return failures


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_fused_triton_kernels_under_interpreter() -> None:
    run_under_interpreter(__file__)


if __name__ == "__main__":
    script_main(interpreter_checks)
