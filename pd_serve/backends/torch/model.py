"""Llama-family decoder (Llama 2/3, Qwen2, Qwen3) in plain PyTorch over a paged KV cache.

The layer stack is written once (`TorchDecoder.run_layers`) over tokens of any leading shape;
the attention step is passed in, so the plain formulation below (`forward`: write the new K/V
into their slots, gather each row's context slots, attend under a causal-by-position mask, see
`pd_serve.backends.inputs`) and the CUDA fast path (`fast_path.py`) share every other operation
and therefore its numerics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pd_serve.models.checkpoint import load_weights
from pd_serve.models.config import ModelConfig
from pd_serve.models.random_init import RandomInit, RandomWeights
from pd_serve.models.rope import cos_sin_table

# (layer index, q [*, H, D], k [*, KVH, D], v [*, KVH, D]) -> attention output [*, H, D]; it also
# writes k and v into the cache.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# HF tensor name -> tensor (any float dtype, any device), or None when the checkpoint lacks it.
WeightFetch = Callable[[str], "torch.Tensor | None"]


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


def weight_fetch(model_dir: str, cfg: ModelConfig, device: torch.device) -> WeightFetch:
    """The weights of `model_dir`: generated on `device` from the seed of a random-init
    directory, else read from its checkpoint (NumPy on the host, checked against `cfg`)."""
    spec = RandomInit.from_dir(model_dir)
    if spec is not None:
        return RandomWeights(cfg, spec, device)
    arrays = load_weights(model_dir, cfg)

    def from_checkpoint(name: str) -> torch.Tensor | None:
        array = arrays.get(name)
        return None if array is None else torch.from_numpy(array)

    return from_checkpoint


class WeightLoader:
    """Turns checkpoint tensors (HF names) into device tensors, fusing projections on request."""

    def __init__(self, fetch: WeightFetch, device: torch.device, dtype: torch.dtype) -> None:
        self.fetch, self.device, self.dtype = fetch, device, dtype

    def get(self, name: str) -> torch.Tensor | None:
        tensor = self.fetch(name)
        return None if tensor is None else tensor.to(self.device, self.dtype)

    def need(self, name: str) -> torch.Tensor:
        tensor = self.get(name)
        assert tensor is not None, f"the weight source checked {name}"
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
    """x [*, H, D]; cos, sin [*, 1, D] (half-split `rotate_half` convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TorchDecoder:
    """The decoder weights, rope table and the layer stack; the cache is passed in per call."""

    def __init__(self, cfg: ModelConfig, fetch: WeightFetch, max_positions: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device, self.dtype = device, dtype
        w = WeightLoader(fetch, device, dtype)
        self.embed = w.need("model.embed_tokens.weight")  # [vocab, hidden]
        self.final_norm = w.need("model.norm.weight")  # [hidden]
        lm_head = None if cfg.tie_word_embeddings else w.get("lm_head.weight")
        self.lm_head = self.embed if lm_head is None else lm_head  # [vocab, hidden]
        self.layers = [load_layer(w, f"model.layers.{i}.", cfg.qk_norm)
                       for i in range(cfg.num_layers)]
        cos, sin = cos_sin_table(cfg.rope, cfg.head_dim, max_positions)
        self.cos = torch.from_numpy(cos).to(device, dtype)  # [max_positions, head_dim]
        self.sin = torch.from_numpy(sin).to(device, dtype)  # [max_positions, head_dim]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `positions` [*], each [*, 1, head_dim] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)

    def run_layers(self, token_ids: torch.Tensor, positions: torch.Tensor,
                   attend: Attend) -> torch.Tensor:
        """token_ids, positions [*] -> hidden states [*, hidden] before the final norm."""
        h = F.embedding(token_ids, self.embed)  # [*, hidden]
        cos, sin = self.rope(positions)
        eps = self.cfg.rms_norm_eps
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, eps)
            h = h + layer.o(self._attention(i, layer, x, cos, sin, attend))
            x = rms_norm(h, layer.post_norm, eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)  # each [*, intermediate]
            h = h + layer.down(F.silu(gate) * up)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [*, hidden] -> logits [*, vocab] in the model dtype."""
        return F.linear(rms_norm(h, self.final_norm, self.cfg.rms_norm_eps), self.lm_head)

    def _attention(self, i: int, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x [*, hidden] -> attention output [*, q_size] (before the o projection)."""
        cfg = self.cfg
        q, k, v = layer.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.unflatten(-1, (cfg.num_heads, cfg.head_dim))  # [*, H, D]
        k = k.unflatten(-1, (cfg.num_kv_heads, cfg.head_dim))  # [*, KVH, D]
        v = v.unflatten(-1, (cfg.num_kv_heads, cfg.head_dim))  # [*, KVH, D]
        if layer.q_norm is not None and layer.k_norm is not None:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return attend(i, q, k, v).flatten(-2)

    def forward(self, inp: ForwardInputs, kv_cache: torch.Tensor,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """The plain formulation. kv_cache [num_layers, 2, num_slots, kv_heads, head_dim] is
        updated in place (`layer_hook(i)` right after layer i's write). Returns float32 logits
        [B, vocab] (or [B, T, vocab] when `inp.logit_index` is None)."""
        cfg = self.cfg
        gqa = cfg.num_heads != cfg.num_kv_heads

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache = kv_cache[i]  # [2, num_slots, KVH, D]
            slots = inp.slot_mapping.reshape(-1)  # [B*T]
            cache[0].index_copy_(0, slots, k.flatten(0, 1))
            cache[1].index_copy_(0, slots, v.flatten(0, 1))
            if layer_hook is not None:
                layer_hook(i)
            keys = cache[0][inp.context_slots]  # [B, C, KVH, D]
            values = cache[1][inp.context_slots]  # [B, C, KVH, D]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                attn_mask=inp.mask, enable_gqa=gqa)  # [B, H, T, D]
            return out.transpose(1, 2)  # [B, T, H, D]

        h = self.run_layers(inp.token_ids, inp.positions, attend)  # [B, T, hidden]
        if inp.logit_index is not None:
            rows = torch.arange(h.shape[0], device=h.device)
            h = h[rows, inp.logit_index]  # [B, hidden]
        return self.logits(h).float()
