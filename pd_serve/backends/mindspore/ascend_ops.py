"""Paged attention on Ascend NPUs through MindSpore's fused kernels, and the host-side inputs
they need; `attention.select_attention` picks it, and nothing here runs on CPU.

Kernels (MindSpore 2.10 names; their Ascend implementations live in the wheel's Ascend plugin,
`libmindspore_internal_kernels.so`, as InternalReshapeAndCache / InternalPagedAttention):
* `mindspore.ops.operations.nn_ops.ReshapeAndCache()(key, value, key_cache, value_cache,
  slot_mapping)` writes the new tokens' K/V, key/value [N, kv_heads, D], into caches
  [num_blocks, block_size, kv_heads, D] at `slot_mapping` [N] int32 (slot = block * size + offset).
* `mindspore.ops.flash_attention_score(query, key, value, head_num, attn_mask=...,
  scalar_value=..., input_layout="BSND")` attends prefill queries [B, T, heads, D] over the
  context gathered by slot, [B, C, kv_heads, D]; attn_mask [B, 1, T, C] uint8, 1 = hidden
  (sparse_mode 0: the full mask, so prefix-cache hits and chunked prefill need nothing else).
* `mindspore.ops.operations.nn_ops.PagedAttention(head_num, scale_value, kv_head_num)(query,
  key_cache, value_cache, block_tables, context_lens)` attends decode queries [B, heads, D]
  straight from the blocks: block_tables [B, max_blocks] int32, context_lens [B] int32.

Padding keeps every softmax row non-empty: padding rows get context length 1 (key 0 of the
scratch block), as `pd_serve.backends.inputs.attention_mask` does for the generic path.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype
from mindspore.ops import flash_attention_score

from pd_serve.backends.inputs import PackedBatch
from pd_serve.backends.mindspore.attention import cache_param


def block_tables_from_slots(context_slots: np.ndarray, block_size: int) -> np.ndarray:
    """[B, ceil(C / block_size)] int32 block ids of each row's context: the block holding
    context position j * block_size. Padding positions hold the scratch slot, so they map to
    the scratch block."""
    if context_slots.ndim != 2:
        raise ValueError(f"context_slots must be [B, C], got shape {context_slots.shape}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    firsts = context_slots[:, ::block_size]  # [B, ceil(C / block_size)]
    if np.any(firsts % block_size):
        raise ValueError("context_slots do not start a block every block_size positions")
    return (firsts // block_size).astype(np.int32)


def fused_step_inputs(packed: PackedBatch, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(block_tables [B, ceil(C / block_size)] int32, context_lens [B] int32 >= 1) for
    PagedAttention and the prefill mask; padding rows attend one scratch key."""
    tables = block_tables_from_slots(packed.context_slots, block_size)
    return tables, np.maximum(packed.context_lens, 1).astype(np.int32)


class AscendAttention(nn.Cell):
    """ReshapeAndCache, then FlashAttentionScore (T > 1) or PagedAttention (T == 1); one layer's
    cache [num_blocks, block_size, kv_heads, D] (the last block is scratch)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, name: str, dtype: mstype.Type) -> None:
        super().__init__()
        # Imported here: the primitives exist in every wheel, their kernels only on Ascend.
        from mindspore.ops.operations.nn_ops import PagedAttention, ReshapeAndCache

        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = cache_param(shape, name + "k_cache", dtype)
        self.v_cache = cache_param(shape, name + "v_cache", dtype)
        self.reshape_and_cache = ReshapeAndCache()
        self.paged_attention = PagedAttention(num_heads, self.scale, num_kv_heads)

    def construct(self, q: Tensor, k: Tensor, v: Tensor, slots: Tensor, ctx_slots: Tensor,
                  masked: Tensor, block_tables: Tensor, context_lens: Tensor) -> Tensor:
        """q [N, heads, D]; k, v [N, kv_heads, D]; slots [N]; ctx_slots [B, C]; masked
        [B, 1, 1, T, C] (True: hidden); block_tables [B, MB]; context_lens [B].
        Returns [N, heads * D]."""
        b, c = ctx_slots.shape
        n = q.shape[0]
        t = n // b
        written = self.reshape_and_cache(k, v, self.k_cache, self.v_cache, slots)
        q = ops.depend(q, written)
        if t == 1:  # decode: the shape is static, so this branch is fixed per compiled graph
            out = self.paged_attention(q, self.k_cache, self.v_cache, block_tables, context_lens)
            return out.reshape(n, -1)  # [B, heads * D]
        flat_ctx = ctx_slots.reshape(-1)
        ctx_shape = (b, c, self.num_kv_heads, self.head_dim)
        k_all = self._flat(ops.depend(self.k_cache, written))  # read after the write
        v_all = self._flat(ops.depend(self.v_cache, written))
        k_ctx = ops.gather(k_all, flat_ctx, 0).reshape(ctx_shape)  # [B, C, kv_heads, D]
        v_ctx = ops.gather(v_all, flat_ctx, 0).reshape(ctx_shape)  # [B, C, kv_heads, D]
        mask = ops.cast(masked.reshape(b, 1, t, c), mstype.uint8)  # [B, 1, T, C], 1 = hidden
        out = flash_attention_score(q.reshape(b, t, self.num_heads, self.head_dim), k_ctx,
                                    v_ctx, self.num_heads, attn_mask=mask,
                                    scalar_value=self.scale, input_layout="BSND")
        return out.reshape(n, -1)  # [B * T, heads * D]

    def _flat(self, cache: Tensor) -> Tensor:
        return cache.reshape(-1, self.num_kv_heads, self.head_dim)  # [slots, kv_heads, D]

    def read(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of `slots` [S], each [S, kv_heads, D] (eager, outside the graph)."""
        return (ops.gather(self._flat(self.k_cache), slots, 0),
                ops.gather(self._flat(self.v_cache), slots, 0))

    def write(self, slots: Tensor, k: np.ndarray, v: np.ndarray) -> None:
        """Stores k, v [S, kv_heads, D] into `slots` [S] with the same kernel as the graph."""
        self.reshape_and_cache(Tensor(k, self.k_cache.dtype), Tensor(v, self.v_cache.dtype),
                               self.k_cache, self.v_cache, slots)
