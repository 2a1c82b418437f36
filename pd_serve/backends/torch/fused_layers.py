"""The decoder's layer stack with fused elementwise kernels (`pd_kernels` layer ops).

Per layer: residual add + RMSNorm (one kernel), the fused qkv matmul, rope of q and k with the
K/V cache write (one kernel), attention, the o matmul, residual add + RMSNorm, the fused
gate_up matmul, SiLU * up (one kernel), the down matmul. The residual of each sub-block is
added by the next norm, so about ten launches per layer remain instead of about forty
(`TorchDecoder.run_layers`); the values round where the unfused stack rounds (on the GPU
within one ulp: kernels/fused.py).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from pd_serve.backends.torch.model import TorchDecoder

# (layer index, q [N, H, D], k [N, KVH, D] or None, v [N, KVH, D]) -> [N, H, D]; the cache
# already holds this step's K/V when it is called.
FusedAttend = Callable[[int, torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


def supports_fused(model: TorchDecoder) -> bool:
    """Whether the fused stack covers this model: no per-head q/k norms (Qwen3), and a head dim
    that is a power of two (the rope kernel spans a head, and Triton ranges must)."""
    dim = model.cfg.head_dim
    return not model.cfg.qk_norm and dim >= 2 and dim & (dim - 1) == 0


def run_layers_fused(model: TorchDecoder, ops: ModuleType, token_ids: torch.Tensor,
                     positions: torch.Tensor, slots: torch.Tensor, kv_flat: torch.Tensor,
                     attend: FusedAttend, want_k: bool) -> torch.Tensor:
    """token_ids, positions, slots [N] -> final-normed hidden states [N, hidden].

    kv_flat [L, 2, S, KVH, D] is written at `slots` for every layer; `want_k` hands the roped
    k of the new tokens to `attend` (prefill attends over them, decode reads the cache)."""
    cfg = model.cfg
    eps, kv = cfg.rms_norm_eps, cfg.kv_size
    h = F.embedding(token_ids, model.embed)  # [N, hidden], the residual stream (in place)
    delta: torch.Tensor | None = None
    for i, layer in enumerate(model.layers):
        x = ops.add_rms_norm(h, delta, layer.input_norm, eps)  # [N, hidden]
        qkv = layer.qkv(x)  # [N, q_size + 2 * kv_size]
        q, k = ops.rope_qk_cache(qkv, positions, model.cos, model.sin, slots, kv_flat[i, 0],
                                 kv_flat[i, 1], cfg.num_heads, want_k)
        v = qkv[:, cfg.q_size + kv:].unflatten(-1, (cfg.num_kv_heads, cfg.head_dim))
        delta = layer.o(attend(i, q, k, v).flatten(-2))  # [N, hidden]
        x = ops.add_rms_norm(h, delta, layer.post_norm, eps)
        delta = layer.down(ops.silu_mul(layer.gate_up(x)))  # [N, hidden]
    return ops.add_rms_norm(h, delta, model.final_norm, eps)
