"""Prompt-token importance for P/D-Device refinement (pd_serve.engine.refine), torch backend: the
attention the last q prompt positions pay to every prompt position, summed over queries, heads
and layers, normalised to sum 1.

It runs after the prompt's prefill, from the K/V already in the cache: the last q tokens go
through the layer stack again (plain formulation, explicit softmax so the weights are visible)
with every layer's keys and values read from the cache, never written. The served request's
cache and outputs are therefore untouched whatever the execution path (plain or fast); the
extra cost is q tokens of compute per layer against L cached keys.
"""

from __future__ import annotations

import numpy as np
import torch

from pd_serve.backends.base import SeqChunk
from pd_serve.backends.torch.fast_path import token_slots
from pd_serve.backends.torch.model import TorchDecoder
from pd_serve.engine.refine import normalised


def prompt_importance(model: TorchDecoder, kv_cache: torch.Tensor, seq: SeqChunk, last_q: int,
                      block_size: int) -> np.ndarray:
    """Scores [L] float32 of a whole prompt (`seq.start_pos` 0, `seq.token_ids` all L tokens,
    their K/V in `kv_cache` [num_layers, 2, num_slots, kv_heads, head_dim] through
    `seq.block_table`); q = min(last_q, L) observed positions."""
    if seq.start_pos != 0:
        raise ValueError(f"prefill_importance needs whole prompts (start_pos 0), got "
                         f"start_pos {seq.start_pos}")
    if last_q <= 0:
        raise ValueError(f"last_q must be positive, got {last_q}")
    cfg, dev = model.cfg, kv_cache.device
    length = len(seq.token_ids)
    q = min(last_q, length)
    slots = torch.from_numpy(token_slots(seq.block_table, 0, length, block_size)).to(dev)  # [L]
    positions = torch.arange(length - q, length, device=dev)  # [q]
    ids = torch.tensor(seq.token_ids[length - q:], dtype=torch.int64, device=dev)  # [q]
    visible = torch.arange(length, device=dev)[None, :] <= positions[:, None]  # [q, L]
    group = cfg.num_heads // cfg.num_kv_heads
    scale = cfg.head_dim ** -0.5
    total = torch.zeros(length, dtype=torch.float32, device=dev)  # [L]

    def attend(i: int, query: torch.Tensor, _k: torch.Tensor, _v: torch.Tensor) -> torch.Tensor:
        # query [q, H, D]; keys, values [L, H, D] from the cache (kv head h // group)
        keys = kv_cache[i, 0, slots].float().repeat_interleave(group, dim=1)
        values = kv_cache[i, 1, slots].float().repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,lhd->hql", query.float(), keys) * scale  # [H, q, L]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)  # [H, q, L]
        total.add_(probs.sum(dim=(0, 1)))
        out = torch.einsum("hql,lhd->qhd", probs, values)  # [q, H, D]
        return out.to(query.dtype)

    model.run_layers(ids, positions, attend)
    return normalised(total.cpu().numpy())
