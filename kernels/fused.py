"""Triton kernels that fuse the elementwise work of a decoder layer around its matmuls.

Each replaces a chain of small torch kernels (a dozen per layer at batch 1, where launch
count, not bytes, sets the decode step time): residual add + RMSNorm, SiLU(gate) * up, and
rope of q and k + the K/V cache write. They round to the model dtype where the torch
formulation in `pd_serve.backends.torch.model` rounds (after each elementwise op). Under the
Triton interpreter that makes them bit-identical to it; compiled for the GPU, the rope's
multiply-adds are contracted, and about a quarter of q/k elements land one ulp away (measured
on H200, docs/benchmarks.md 8e), besides the order of the norm's float32 sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(  # type: ignore[no-untyped-def]  # triton kernels take untyped pointers
        h_ptr, d_ptr, w_ptr, x_ptr, n_cols, eps,
        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    h = tl.load(h_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        h = (h + d).to(dtype).to(tl.float32)  # the residual stream is kept in the model dtype
        tl.store(h_ptr + row * n_cols + cols, h.to(dtype), mask=mask)
    inv = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    y = (h * inv).to(dtype).to(tl.float32)  # cast back before the weight, as transformers does
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * n_cols + cols, (w * y).to(dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(  # type: ignore[no-untyped-def]
        x_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (s * u).to(dtype), mask=mask)


@triton.jit
def _rope_cache_kernel(  # type: ignore[no-untyped-def]
        qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, kc_ptr, vc_ptr,
        H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, WRITE_K: tl.constexpr,
        WRITE_CACHE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half: tl.constexpr = D // 2
    offs = tl.arange(0, half)
    dtype = q_ptr.dtype.element_ty
    src = qkv_ptr + t * (H + 2 * KVH) * D + head * D
    if head < H + KVH:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        x1 = tl.load(src + offs).to(tl.float32)
        x2 = tl.load(src + half + offs).to(tl.float32)
        c1 = tl.load(cos_ptr + pos * D + offs).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * D + half + offs).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * D + offs).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * D + half + offs).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded as the torch formulation does
        o1 = ((x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)).to(dtype)
        o2 = ((x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)).to(dtype)
        if head < H:
            dst = q_ptr + (t * H + head) * D
            tl.store(dst + offs, o1)
            tl.store(dst + half + offs, o2)
        else:
            kh = head - H
            if WRITE_K:
                tl.store(k_ptr + (t * KVH + kh) * D + offs, o1)
                tl.store(k_ptr + (t * KVH + kh) * D + half + offs, o2)
            if WRITE_CACHE:
                slot = tl.load(slot_ptr + t).to(tl.int64)
                tl.store(kc_ptr + (slot * KVH + kh) * D + offs, o1)
                tl.store(kc_ptr + (slot * KVH + kh) * D + half + offs, o2)
    else:
        if WRITE_CACHE:
            vh = head - H - KVH
            full = tl.arange(0, D)
            slot = tl.load(slot_ptr + t).to(tl.int64)
            tl.store(vc_ptr + (slot * KVH + vh) * D + full, tl.load(src + full))


def add_rms_norm_triton(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float, out: torch.Tensor) -> None:
    """Arguments checked by the caller: h, delta, out [N, hidden] contiguous, weight [hidden]."""
    n, hidden = h.shape
    if n == 0:
        return
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(n,)](h, h if delta is None else delta, weight, out, hidden, eps,
                               HAS_DELTA=delta is not None, BLOCK=block,
                               num_warps=min(16, max(1, block // 512)))


def silu_mul_triton(x: torch.Tensor, out: torch.Tensor) -> None:
    """x [N, 2I] contiguous -> out [N, I]."""
    n, inter = out.shape
    if n == 0:
        return
    block = min(2048, triton.next_power_of_2(inter))
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](x, out, inter, BLOCK=block, num_warps=4)


def rope_cache_triton(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, slots: torch.Tensor | None, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, q_out: torch.Tensor,
                      k_out: torch.Tensor | None) -> None:
    """See pd_kernels.rope_qk_cache; arguments already checked."""
    n, heads, dim = q_out.shape
    kv_heads = k_cache.shape[-2]
    if n == 0:
        return
    write_cache = slots is not None
    _rope_cache_kernel[(n, heads + 2 * kv_heads)](
        qkv, positions, cos, sin, slots if write_cache else positions, q_out,
        q_out if k_out is None else k_out, k_cache, v_cache, H=heads, KVH=kv_heads, D=dim,
        WRITE_K=k_out is not None, WRITE_CACHE=write_cache, num_warps=1)
