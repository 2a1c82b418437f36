"""The Llama-family decoder (Llama 2/3, Qwen2, Qwen3) as MindSpore cells over a paged KV cache.

Activations stay flat as [N = B * T, hidden]; attention alone reshapes to [B, heads, T, C].
Each layer's attention kernel (`attention.py`: the generic formulation, or Ascend's fused kernels
in `ascend_ops.py`) owns its K and V cache as Parameters updated in place inside the graph: new
K/V are written into `slot_mapping`, then every query attends over its context `context_slots`
with a causal-by-position mask (the formulation of `pd_serve.backends.inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from pd_serve.backends.mindspore.attention import build_kernel
from pd_serve.models.config import ModelConfig

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class CacheSpec:
    """Every layer's KV cache: `num_blocks` blocks (the scratch block included) of
    `block_size` tokens, laid out for the attention `kind` (`attention.GENERIC` or
    `attention.ASCEND_FUSED`)."""

    kind: str
    num_blocks: int
    block_size: int


def _param(array: np.ndarray, name: str, dtype: mstype.Type) -> Parameter:
    return Parameter(Tensor(array, dtype), name=name, requires_grad=False)


class RMSNorm(nn.Cell):
    """x / rms(x) * weight over the last axis, computed in float32 as transformers does."""

    def __init__(self, weight: np.ndarray, eps: float, name: str, dtype: mstype.Type) -> None:
        super().__init__()
        self.weight = _param(weight, name, dtype)
        self.eps = eps

    def construct(self, x: Tensor) -> Tensor:
        x32 = ops.cast(x, mstype.float32)
        var = ops.mean(ops.square(x32), -1, keep_dims=True)
        return self.weight * ops.cast(x32 * ops.rsqrt(var + self.eps), x.dtype)


def _norm(w: Weights, name: str, eps: float, dtype: mstype.Type) -> RMSNorm:
    return RMSNorm(w[name], eps, name, dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [N, heads, D] rotated by cos/sin [N, 1, D] (HF rotate_half: halves, not pairs)."""
    half = x.shape[-1] // 2
    rotated = ops.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


class Attention(nn.Cell):
    """GQA self-attention with optional qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3); the
    cache write and the attention itself are the chosen kernel's (`attention.build_kernel`)."""

    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, cache: CacheSpec,
                 dtype: mstype.Type) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.has_bias, self.qk_norm = cfg.attention_bias, cfg.qk_norm
        p = prefix + "self_attn."
        self.qkv_weight = _param(np.concatenate(
            [w[p + f"{n}_proj.weight"] for n in "qkv"]), p + "qkv_proj.weight", dtype)
        self.o_weight = _param(w[p + "o_proj.weight"], p + "o_proj.weight", dtype)
        if self.has_bias:
            self.qkv_bias = _param(np.concatenate(
                [w[p + f"{n}_proj.bias"] for n in "qkv"]), p + "qkv_proj.bias", dtype)
        if self.qk_norm:
            self.q_norm = _norm(w, p + "q_norm.weight", cfg.rms_norm_eps, dtype)
            self.k_norm = _norm(w, p + "k_norm.weight", cfg.rms_norm_eps, dtype)
        self.kernel = build_kernel(cache.kind, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cache.num_blocks, cache.block_size, p, dtype)
        self.matmul_t = ops.MatMul(transpose_b=True)
        self.split = (cfg.q_size, cfg.kv_size, cfg.kv_size)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, ctx_slots: Tensor,
                  masked: Tensor, block_tables: Tensor | None = None,
                  context_lens: Tensor | None = None) -> Tensor:
        """x [N, hidden]; slots [N]; ctx_slots [B, C]; masked [B, 1, 1, T, C] (True: hidden);
        block_tables [B, MB] and context_lens [B]: the fused kernel's (None for generic)."""
        n = x.shape[0]
        qkv = self.matmul_t(x, self.qkv_weight)  # [N, q_size + 2 * kv_size]
        if self.has_bias:
            qkv = qkv + self.qkv_bias
        q, k, v = ops.split(qkv, self.split, -1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        out = self.kernel(q, k, v, slots, ctx_slots, masked, block_tables, context_lens)
        return self.matmul_t(out, self.o_weight)  # [N, hidden]


class MLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, w: Weights, prefix: str, dtype: mstype.Type) -> None:
        super().__init__()
        p = prefix + "mlp."
        self.gate_up = _param(np.concatenate([w[p + "gate_proj.weight"], w[p + "up_proj.weight"]]),
                              p + "gate_up_proj.weight", dtype)
        self.down = _param(w[p + "down_proj.weight"], p + "down_proj.weight", dtype)
        self.matmul_t = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        gate, up = ops.chunk(self.matmul_t(x, self.gate_up), 2, -1)  # each [N, intermediate]
        return self.matmul_t(ops.silu(gate) * up, self.down)


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: ModelConfig, w: Weights, index: int, cache: CacheSpec,
                 dtype: mstype.Type) -> None:
        super().__init__()
        p = f"model.layers.{index}."
        eps = cfg.rms_norm_eps
        self.input_norm = _norm(w, p + "input_layernorm.weight", eps, dtype)
        self.attn = Attention(cfg, w, p, cache, dtype)
        self.post_norm = _norm(w, p + "post_attention_layernorm.weight", eps, dtype)
        self.mlp = MLP(w, p, dtype)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, ctx_slots: Tensor,
                  masked: Tensor, block_tables: Tensor | None = None,
                  context_lens: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, slots, ctx_slots, masked, block_tables,
                          context_lens)
        return x + self.mlp(self.post_norm(x))


class DecoderModel(nn.Cell):
    """Embedding, decoder layers, final norm and lm_head; returns logits of the chosen rows.

    Lifecycle: 1. built from a ModelConfig and HF-named weights (cache zeroed); 2. called once per
    prefill or decode step with a packed batch; its K/V caches persist between calls.
    """

    def __init__(self, cfg: ModelConfig, w: Weights, cache: CacheSpec,
                 cos_sin: tuple[np.ndarray, np.ndarray], dtype: mstype.Type) -> None:
        super().__init__()
        self.embed = _param(w["model.embed_tokens.weight"], "model.embed_tokens.weight", dtype)
        self.layers = nn.CellList(
            [DecoderLayer(cfg, w, i, cache, dtype) for i in range(cfg.num_layers)])
        self.norm = _norm(w, "model.norm.weight", cfg.rms_norm_eps, dtype)
        self.tied = cfg.tie_word_embeddings
        if not self.tied:
            self.lm_head = _param(w["lm_head.weight"], "lm_head.weight", dtype)
        self.cos_table = _param(cos_sin[0], "rope.cos", dtype)  # [max_positions, head_dim]
        self.sin_table = _param(cos_sin[1], "rope.sin", dtype)  # [max_positions, head_dim]
        self.matmul_t = ops.MatMul(transpose_b=True)

    def construct(self, token_ids: Tensor, positions: Tensor, slot_mapping: Tensor,
                  context_slots: Tensor, context_lens: Tensor, logit_rows: Tensor,
                  block_tables: Tensor | None = None) -> Tensor:
        """token_ids, positions, slot_mapping [B, T]; context_slots [B, C]; context_lens [B];
        logit_rows [R] flat indices into the B * T tokens; block_tables [B, MB] for the fused
        Ascend kernel only. Returns float32 logits [R, vocab]."""
        b, t = token_ids.shape
        c = context_slots.shape[1]
        flat_pos = positions.reshape(-1)
        cos = ops.gather(self.cos_table, flat_pos, 0).expand_dims(1)  # [N, 1, head_dim]
        sin = ops.gather(self.sin_table, flat_pos, 0).expand_dims(1)  # [N, 1, head_dim]
        key_pos = ops.arange(0, c, dtype=mstype.int32).reshape(1, 1, c)
        masked = ops.logical_or(key_pos > positions.reshape(b, t, 1),
                                key_pos >= context_lens.reshape(b, 1, 1))
        masked = masked.reshape(b, 1, 1, t, c)  # [B, 1, 1, T, C], True where a key is hidden
        slots = slot_mapping.reshape(-1)
        x = ops.gather(self.embed, token_ids.reshape(-1), 0)  # [N, hidden]
        for layer in self.layers:
            x = layer(x, cos, sin, slots, context_slots, masked, block_tables, context_lens)
        x = self.norm(ops.gather(x, logit_rows, 0))  # [R, hidden]
        head = self.embed if self.tied else self.lm_head
        return ops.cast(self.matmul_t(x, head), mstype.float32)
