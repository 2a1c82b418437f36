"""Llama-family decoder (Llama 2/3, Qwen2, Qwen3) in plain PyTorch over a paged KV cache.

Every forward call uses one formulation for prefill and decode: the new tokens' K/V are written
into their cache slots, then each query attends over its gathered context slots under a
causal-by-position mask (see `pd_serve.backends.inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pd_serve.models.config import ModelConfig
from pd_serve.models.rope import cos_sin_table


@dataclass
class Linear:
    """A projection `x @ weight.T + bias` (bias optional)."""

    weight: torch.Tensor  # [out_features, in_features]
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    qkv: Linear  # q, k and v projections fused: [q_size + 2 * kv_size, hidden]
    o: Linear
    gate_up: Linear  # gate and up projections fused: [2 * intermediate, hidden]
    down: Linear
    q_norm: torch.Tensor | None  # [head_dim], Qwen3 only
    k_norm: torch.Tensor | None


@dataclass(frozen=True)
class ForwardInputs:
    """One packed batch on the device; B rows, T new tokens per row, C context slots."""

    token_ids: torch.Tensor  # [B, T] int64
    positions: torch.Tensor  # [B, T] int64
    slot_mapping: torch.Tensor  # [B, T] int64
    context_slots: torch.Tensor  # [B, C] int64
    mask: torch.Tensor  # [B, 1, T, C] bool, True where query may attend key
    logit_index: torch.Tensor | None  # [B] int64, token whose logits to return; None: all


class WeightLoader:
    """Turns checkpoint arrays (HF names) into device tensors, fusing projections on request."""

    def __init__(self, arrays: dict[str, np.ndarray], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.arrays, self.device, self.dtype = arrays, device, dtype

    def get(self, name: str) -> torch.Tensor | None:
        array = self.arrays.get(name)
        return None if array is None else torch.from_numpy(array).to(self.device, self.dtype)

    def need(self, name: str) -> torch.Tensor:
        tensor = self.get(name)
        assert tensor is not None, f"load_weights checked {name}"
        return tensor

    def linear(self, *prefixes: str) -> Linear:
        """One projection whose output rows are those of `prefixes` in order; a missing bias
        next to a present one counts as zeros."""
        weights = [self.need(p + ".weight") for p in prefixes]
        biases = [self.get(p + ".bias") for p in prefixes]
        if all(b is None for b in biases):
            return Linear(torch.cat(weights))
        filled = [torch.zeros_like(w[:, 0]) if b is None else b for w, b in zip(weights, biases)]
        return Linear(torch.cat(weights), torch.cat(filled))


def load_layer(w: WeightLoader, prefix: str, qk_norm: bool) -> LayerWeights:
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    return LayerWeights(
        input_norm=w.need(prefix + "input_layernorm.weight"),
        post_norm=w.need(prefix + "post_attention_layernorm.weight"),
        qkv=w.linear(attn + "q_proj", attn + "k_proj", attn + "v_proj"),
        o=w.linear(attn + "o_proj"),
        gate_up=w.linear(mlp + "gate_proj", mlp + "up_proj"),
        down=w.linear(mlp + "down_proj"),
        q_norm=w.get(attn + "q_norm.weight") if qk_norm else None,
        k_norm=w.get(attn + "k_norm.weight") if qk_norm else None,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight, as transformers does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [B, T, 1, D] (half-split `rotate_half` convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TorchDecoder:
    """The decoder weights, rope table and the forward pass; the cache is passed in per call."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray], max_positions: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device, self.dtype = device, dtype
        w = WeightLoader(weights, device, dtype)
        self.embed = w.need("model.embed_tokens.weight")  # [vocab, hidden]
        self.final_norm = w.need("model.norm.weight")  # [hidden]
        lm_head = None if cfg.tie_word_embeddings else w.get("lm_head.weight")
        self.lm_head = self.embed if lm_head is None else lm_head  # [vocab, hidden]
        self.layers = [load_layer(w, f"model.layers.{i}.", cfg.qk_norm)
                       for i in range(cfg.num_layers)]
        cos, sin = cos_sin_table(cfg.rope, cfg.head_dim, max_positions)
        self.cos = torch.from_numpy(cos).to(device, dtype)  # [max_positions, head_dim]
        self.sin = torch.from_numpy(sin).to(device, dtype)  # [max_positions, head_dim]

    def forward(self, inp: ForwardInputs, kv_cache: torch.Tensor) -> torch.Tensor:
        """kv_cache [num_layers, 2, num_slots, kv_heads, head_dim] is updated in place.
        Returns float32 logits [B, vocab] (or [B, T, vocab] when `inp.logit_index` is None)."""
        h = F.embedding(inp.token_ids, self.embed)  # [B, T, hidden]
        cos = self.cos[inp.positions].unsqueeze(2)  # [B, T, 1, head_dim]
        sin = self.sin[inp.positions].unsqueeze(2)
        eps = self.cfg.rms_norm_eps
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, eps)
            h = h + self._attention(layer, x, cos, sin, inp, kv_cache[i])
            x = rms_norm(h, layer.post_norm, eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)  # each [B, T, intermediate]
            h = h + layer.down(F.silu(gate) * up)
        if inp.logit_index is not None:
            rows = torch.arange(h.shape[0], device=h.device)
            h = h[rows, inp.logit_index]  # [B, hidden]
        h = rms_norm(h, self.final_norm, eps)
        return F.linear(h, self.lm_head).float()

    def _attention(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, inp: ForwardInputs, cache: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; cache [2, num_slots, kv_heads, head_dim]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = layer.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)  # [B, T, H, D]
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, KVH, D]
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, KVH, D]
        if layer.q_norm is not None and layer.k_norm is not None:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        slots = inp.slot_mapping.reshape(-1)  # [B*T]
        cache[0].index_copy_(0, slots, k.reshape(b * t, cfg.num_kv_heads, cfg.head_dim))
        cache[1].index_copy_(0, slots, v.reshape(b * t, cfg.num_kv_heads, cfg.head_dim))
        keys = cache[0][inp.context_slots]  # [B, C, KVH, D]
        values = cache[1][inp.context_slots]  # [B, C, KVH, D]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=inp.mask, enable_gqa=cfg.num_heads != cfg.num_kv_heads,
        )  # [B, H, T, D]
        return layer.o(out.transpose(1, 2).reshape(b, t, cfg.q_size))
