"""Gather / scatter of one request's paged KV, all layers in one Triton launch each.

The grid is (token tiles, layers x K/V): each program moves BLOCK_T tokens of one plane, one
contiguous row of KVH * D elements per token, so loads and stores are wide and coalesced; the
buffer side is the KVLayout order [L, 2, num_tokens, KVH, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMS = 8192  # elements moved per program per row chunk (16 KiB in bf16)
MAX_ROW_CHUNK = 4096


@triton.jit
def _copy_kernel(  # type: ignore[no-untyped-def]  # triton kernels take untyped pointers
        cache_ptr, table_ptr, buf_ptr, num_tokens, stride_layer, stride_kv, stride_block,
        ROW: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr, TO_CACHE: tl.constexpr):
    plane = tl.program_id(1)  # layer * 2 + (0 for K, 1 for V)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    blk = tl.load(table_ptr + t // PAGE, mask=t_ok, other=0).to(tl.int64)
    layer = (plane // 2).to(tl.int64)
    cache_row = (layer * stride_layer + (plane % 2).to(tl.int64) * stride_kv + blk * stride_block
                 + (t % PAGE) * ROW)  # [BLOCK_T] element offsets of each token's row
    buf_row = (plane.to(tl.int64) * num_tokens + t) * ROW
    for r0 in tl.static_range(0, ROW, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = t_ok[:, None] & (r < ROW)[None, :]
        cache_at = cache_ptr + cache_row[:, None] + r[None, :]
        buf_at = buf_ptr + buf_row[:, None] + r[None, :]
        if TO_CACHE:
            tl.store(cache_at, tl.load(buf_at, mask=mask), mask=mask)
        else:
            tl.store(buf_at, tl.load(cache_at, mask=mask), mask=mask)


def copy_kv_triton(kv_blocks: torch.Tensor, block_table: torch.Tensor, num_tokens: int,
                   buf: torch.Tensor, to_cache: bool) -> None:
    """Gathers kv_blocks into flat `buf` (to_cache False) or scatters `buf` into kv_blocks.

    Arguments are already checked: kv_blocks [L, 2, NB, BS, KVH, D] with contiguous blocks,
    buf a flat tensor of its dtype with L * 2 * num_tokens * KVH * D elements.
    """
    layers, _, _, block_size, kv_heads, dim = kv_blocks.shape
    if num_tokens == 0 or layers == 0:
        return
    row = kv_heads * dim
    block_r = min(triton.next_power_of_2(row), MAX_ROW_CHUNK)
    block_t = max(1, min(64, TILE_ELEMS // block_r))
    grid = (triton.cdiv(num_tokens, block_t), layers * 2)
    _copy_kernel[grid](
        kv_blocks, block_table, buf, num_tokens, kv_blocks.stride(0), kv_blocks.stride(1),
        kv_blocks.stride(2), ROW=row, PAGE=block_size, BLOCK_T=block_t, BLOCK_R=block_r,
        TO_CACHE=to_cache, num_warps=4)
