"""Fused per-layer ops of the decoder (residual add + RMSNorm, SiLU * up, rope + cache write).

Same dispatch as the KV kernels: CUDA tensors with triton run `fused.py`, anything else the
torch references. Arguments are checked from metadata only (no host sync), so every op can be
captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from .reference import ref_add_rms_norm, ref_rope_cache, ref_silu_mul


def _use_triton(t: torch.Tensor) -> bool:
    from . import _triton_importable

    return t.is_cuda and _triton_importable()


def _rows(t: torch.Tensor, name: str, cols: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 2-D tensor, got {tuple(t.shape)}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {cols}")


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The residual step of a pre-norm layer: h += delta in place (in h's dtype; skipped when
    delta is None), then returns weight * RMSNorm(h) [N, hidden], the norm in float32 and cast
    to h's dtype before the weight (the transformers convention). h, delta [N, hidden]
    contiguous; weight [hidden]; `out` receives the result when given."""
    _rows(h, "h")
    hidden = h.shape[1]
    if delta is not None:
        _rows(delta, "delta", hidden)
        if delta.shape[0] != h.shape[0] or delta.dtype != h.dtype:
            raise ValueError(f"delta {tuple(delta.shape)} {delta.dtype} does not match h "
                             f"{tuple(h.shape)} {h.dtype}")
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    out = torch.empty_like(h) if out is None else out
    _rows(out, "out", hidden)
    if _use_triton(h):
        from .fused import add_rms_norm_triton

        add_rms_norm_triton(h, delta, weight, eps, out)
    else:
        ref_add_rms_norm(h, delta, weight, eps, out)
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = [gate | up] [N, 2I] contiguous -> [N, I] in x's dtype."""
    _rows(x, "x")
    if x.shape[1] % 2:
        raise ValueError(f"x must hold gate and up halves, got {x.shape[1]} columns")
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)  # [N, I]
    if _use_triton(x):
        from .fused import silu_mul_triton

        silu_mul_triton(x, out)
    else:
        ref_silu_mul(x, out)
    return out


def rope_qk_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, slots: torch.Tensor | None, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, num_heads: int, want_k: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rope of the q and k heads of packed projections qkv [N, (H + 2 KVH) * D] at positions
    [N] (cos, sin [max_positions, D], half-split convention), and, when `slots` [N] is given,
    roped k and raw v written into those rows of k_cache / v_cache [S, KVH, D]. Returns roped
    q [N, H, D] and, with `want_k`, roped k [N, KVH, D]. Slots and positions are not range
    checked (that would need a host sync)."""
    _rows(qkv, "qkv")
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be equal [S, KVH, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _, kv_heads, dim = k_cache.shape
    n = qkv.shape[0]
    if qkv.shape[1] != (num_heads + 2 * kv_heads) * dim or dim % 2:
        raise ValueError(f"qkv has {qkv.shape[1]} columns, expected ({num_heads} + 2 x "
                         f"{kv_heads}) x {dim} with an even head dim")
    if positions.shape != (n,) or (slots is not None and slots.shape != (n,)):
        raise ValueError(f"positions and slots must be [{n}]")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != dim:
        raise ValueError(f"cos and sin must be [positions, {dim}]")
    q = torch.empty(n, num_heads, dim, dtype=qkv.dtype, device=qkv.device)  # [N, H, D]
    k = torch.empty(n, kv_heads, dim, dtype=qkv.dtype, device=qkv.device) if want_k else None
    if _use_triton(qkv):
        from .fused import rope_cache_triton

        rope_cache_triton(qkv, positions, cos, sin, slots, k_cache, v_cache, q, k)
    else:
        ref_rope_cache(qkv, positions, cos, sin, slots, k_cache, v_cache, q, k)
    return q, k
