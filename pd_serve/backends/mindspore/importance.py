"""Prompt-token importance for P/D-Device refinement (pd_serve.engine.refine), MindSpore backend:
the attention the last q prompt positions pay to every prompt position, summed over queries,
heads and layers, normalised to sum 1 (the torch backend's `importance.py`, same rule).

It runs eagerly after the prompt's prefill, outside the compiled graphs: the last q tokens go
through the model's own cells (norms, projections, MLP) with each layer's keys and values read
from the cache by the attention kernel's `read` (generic or Ascend layout alike) and never
written; the softmax runs in float32 NumPy so the weights are visible. The served request's
cache and outputs are untouched; the extra cost is q tokens per layer against L cached keys.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops
from mindspore import dtype as mstype

from pd_serve.backends.base import SeqChunk
from pd_serve.backends.mindspore.model import Attention, DecoderModel, _rope
from pd_serve.engine.refine import normalised


def prompt_importance(model: DecoderModel, seq: SeqChunk, slots: np.ndarray,
                      last_q: int) -> np.ndarray:
    """Scores [L] float32 of a whole prompt (`seq.start_pos` 0, all L tokens in `seq`, their
    K/V in the cache at `slots` [L] int32); q = min(last_q, L) observed positions."""
    if seq.start_pos != 0:
        raise ValueError(f"prefill_importance needs whole prompts (start_pos 0), got "
                         f"start_pos {seq.start_pos}")
    if last_q <= 0:
        raise ValueError(f"last_q must be positive, got {last_q}")
    length = len(seq.token_ids)
    q = min(last_q, length)
    positions = Tensor(np.arange(length - q, length, dtype=np.int32))  # [q]
    cos = ops.gather(model.cos_table, positions, 0).expand_dims(1)  # [q, 1, head_dim]
    sin = ops.gather(model.sin_table, positions, 0).expand_dims(1)  # [q, 1, head_dim]
    ids = Tensor(np.asarray(seq.token_ids[length - q:], dtype=np.int32))  # [q]
    # [q, L]: query at position p sees keys 0 .. p
    visible = np.arange(length)[None, :] <= np.arange(length - q, length)[:, None]
    slot_t = Tensor(np.asarray(slots, dtype=np.int32))  # [L]
    total = np.zeros(length, dtype=np.float64)  # [L]
    x = ops.gather(model.embed, ids, 0)  # [q, hidden]
    for layer in model.layers:
        attn: Attention = layer.attn
        out, probs = _attend(attn, layer.input_norm(x), cos, sin, slot_t, visible)
        total += probs.sum(axis=(0, 1))
        x = x + attn.matmul_t(Tensor(out, x.dtype), attn.o_weight)
        x = x + layer.mlp(layer.post_norm(x))
    return normalised(total)


def _attend(attn: Attention, h: Tensor, cos: Tensor, sin: Tensor, slots: Tensor,
            visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's attention of the q queries over the cached keys: the output [q, H * D]
    and the weights [H, q, L], both float32 NumPy."""
    n, heads, dim = h.shape[0], attn.num_heads, attn.head_dim
    qkv = attn.matmul_t(h, attn.qkv_weight)  # [q, q_size + 2 * kv_size]
    if attn.has_bias:
        qkv = qkv + attn.qkv_bias
    query = ops.split(qkv, attn.split, -1)[0].reshape(n, heads, dim)  # [q, H, D]
    if attn.qk_norm:
        query = attn.q_norm(query)
    query = _np32(_rope(query, cos, sin))  # [q, H, D]
    k_all, v_all = attn.kernel.read(slots)  # each [L, KVH, D]
    group = heads // attn.num_kv_heads
    keys = np.repeat(_np32(k_all), group, axis=1)  # [L, H, D]
    values = np.repeat(_np32(v_all), group, axis=1)  # [L, H, D]
    logits = np.einsum("qhd,lhd->hql", query, keys) * np.float32(dim ** -0.5)  # [H, q, L]
    logits = np.where(visible[None], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)  # [H, q, L]
    out = np.einsum("hql,lhd->qhd", probs, values).reshape(n, heads * dim)  # [q, H * D]
    return out.astype(np.float32), probs


def _np32(t: Tensor) -> np.ndarray:
    return ops.cast(t, mstype.float32).asnumpy()
