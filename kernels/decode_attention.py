"""Split-KV (flash-decoding) paged attention for one query token per sequence, in Triton.

Two launches per call: `_split_kernel` over (batch, KV head, split) attends one contiguous
range of key tiles for all query heads of one KV group at once (the group padded to the 16
rows tl.dot needs) with an online softmax in float32, and writes the split's normalised output
and log-sum-exp; `_combine_kernel` over (batch, head) merges the splits by their log-sum-exp.
With a single split the first kernel writes the final output and the second is skipped. The
number of splits depends on shapes only (batch, KV heads, max blocks, block size, SM count),
so a call is CUDA-graph capturable.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per tile
WAVES = 4  # aim for at least this many programs per SM (hides the tail of the last wave)
MAX_TILES_PER_SPLIT = 16  # long contexts split further, so programs stay short and balanced
MAX_SPLITS = 128
LOG2_E = 1.4426950408889634  # the kernels use exp2: scores are scaled by log2(e)


@triton.jit
def _tile_slots(  # type: ignore[no-untyped-def]  # triton helpers take untyped tensors
        table_row, tile, ctx, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """Block id, offset in the block and validity of the tile's BLOCK_N key positions."""
    pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = pos < ctx
    if PAGE >= BLOCK_N:  # the whole tile lies in one block: one table entry
        blk = tl.load(table_row + (tile * BLOCK_N) // PAGE).to(tl.int64)
    else:
        blk = tl.load(table_row + pos // PAGE, mask=key_ok, other=0).to(tl.int64)
    return blk, pos % PAGE, key_ok


@triton.jit
def _mma(a, b, IEEE: tl.constexpr):  # type: ignore[no-untyped-def]  # triton tensors
    """a @ b in float32; IEEE keeps float32 inputs exact (no TF32), else b's dtype."""
    if IEEE:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        result = tl.dot(a.to(b.dtype), b)
    return result


@triton.jit
def _split_kernel(  # type: ignore[no-untyped-def]  # triton kernels take untyped pointers
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, part_ptr, lse_ptr, out_ptr,
        stride_qb, stride_qh, stride_kn, stride_kt, stride_kh,
        stride_vn, stride_vt, stride_vh, stride_tb, stride_ob, stride_oh,
        qk_scale, max_keys, tiles_per_split,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
        ONE_SPLIT: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), max_keys)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    row_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(ctx, BLOCK_N))
    table_row = table_ptr + b.to(tl.int64) * stride_tb
    for tile in range(tile_lo, tile_hi):
        blk, slot, key_ok = _tile_slots(table_row, tile, ctx, BLOCK_N, PAGE)
        mask = key_ok[:, None] & d_ok[None, :]
        k_rows = blk * stride_kn + slot * stride_kt + kvh * stride_kh
        k = tl.load(k_ptr + k_rows[:, None] + d[None, :], mask=mask, other=0.0)
        s = _mma(q, tl.trans(k), IEEE) * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = blk * stride_vn + slot * stride_vt + kvh * stride_vh
        v = tl.load(v_ptr + v_rows[:, None] + d[None, :], mask=mask, other=0.0)
        acc = acc * alpha[:, None] + _mma(p, v, IEEE)
        m_i = m_new
    if ONE_SPLIT:
        _store_final(out_ptr + b * stride_ob, stride_oh, heads, d, acc, l_i, row_ok, d_ok)
    else:
        row = (b * tl.num_programs(1) * GROUP + heads) * tl.num_programs(2) + split  # [B, H, S]
        _store_split(part_ptr, lse_ptr, row, d, acc, m_i, l_i, row_ok, d_ok, HEAD_DIM)


@triton.jit
def _store_final(out_row, stride_oh, heads, d, acc, l_i, row_ok, d_ok):
    """The single split's output, normalised, in out's dtype; rows without keys get 0."""
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_row + heads[:, None] * stride_oh + d[None, :], o.to(out_row.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _store_split(  # type: ignore[no-untyped-def]  # triton helpers take untyped tensors
        part_ptr, lse_ptr, row, d, acc, m_i, l_i, row_ok, d_ok, HEAD_DIM: tl.constexpr):
    """One split's normalised output (float32) and log2-sum-exp (-inf when it had no keys)."""
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    tl.store(part_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
             acc / l_safe[:, None], mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + row, tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf")),
             mask=row_ok)


@triton.jit
def _combine_kernel(  # type: ignore[no-untyped-def]  # triton kernels take untyped pointers
        part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, num_heads, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
        CHUNK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b * num_heads + h).to(tl.int64) * num_splits
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    lse = tl.load(lse_ptr + row + s, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no keys in any split: all weights 0
    denom = tl.sum(tl.exp2(lse - m_safe), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    # whole [CHUNK_S, D] tiles per step: one round trip to memory for up to CHUNK_S splits
    for s0 in range(0, num_splits, CHUNK_S):
        c = s0 + tl.arange(0, CHUNK_S)
        c_ok = c < num_splits
        w = tl.exp2(tl.load(lse_ptr + row + c, mask=c_ok, other=float("-inf")) - m_safe)
        part = tl.load(part_ptr + (row + c)[:, None] * HEAD_DIM + d[None, :],
                       mask=c_ok[:, None] & d_ok[None, :], other=0.0)  # [CHUNK_S, BLOCK_D]
        acc += tl.sum(part * w[:, None], 0)
    o = acc / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d_ok)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the Triton interpreter on CPU: pretend an H100
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def choose_num_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int,
                      sm_count: int) -> int:
    """Splits per (row, KV head): WAVES programs per SM and at most MAX_TILES_PER_SPLIT tiles
    per program where the context allows, at least one tile each."""
    tiles = max(1, math.ceil(max_blocks * block_size / BLOCK_N))
    want = math.ceil(WAVES * sm_count / max(1, batch * kv_heads))
    want = max(want, math.ceil(tiles / MAX_TILES_PER_SPLIT))
    splits = max(1, min(want, tiles, MAX_SPLITS))
    return math.ceil(tiles / math.ceil(tiles / splits))  # drop splits that would be empty


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor,
                                  v_cache: torch.Tensor, block_tables: torch.Tensor,
                                  context_lens: torch.Tensor, scale: float,
                                  out: torch.Tensor | None = None,
                                  num_splits: int | None = None) -> torch.Tensor:
    """Launches the kernels; arguments as pd_kernels.paged_decode_attention (already checked).

    `num_splits` overrides the shape-based choice (tests and tuning).
    """
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)  # [B, H, D]
    if batch == 0:
        return out
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if block_tables.shape[1] > 1 and block_tables.stride(1) != 1:
        raise ValueError("block_tables must have contiguous rows")
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, block_tables.shape[1], block_size,
                                       _sm_count(q.device))
    if num_splits == 1:
        _launch_split(q, k_cache, v_cache, block_tables, context_lens, scale, out, out, out, 1)
        return out
    part = torch.empty(batch, heads, num_splits, dim, device=q.device,
                       dtype=torch.float32)  # [B, H, S, D]
    lse = torch.empty(batch, heads, num_splits, device=q.device,
                      dtype=torch.float32)  # [B, H, S]
    _launch_split(q, k_cache, v_cache, block_tables, context_lens, scale, part, lse, out,
                  num_splits)
    _combine_kernel[(batch, heads)](
        part, lse, out, out.stride(0), out.stride(1), heads, num_splits,
        HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_S=triton.next_power_of_2(num_splits),
        CHUNK_S=min(64, triton.next_power_of_2(num_splits)), num_warps=4)
    return out


def _launch_split(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                  part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor,
                  num_splits: int) -> None:
    """The split kernel; with one split it writes `out` and ignores `part` and `lse`."""
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    max_keys = block_tables.shape[1] * block_size
    tiles = max(1, math.ceil(max_keys / BLOCK_N))
    group = heads // kv_heads
    _split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), scale * LOG2_E, max_keys, math.ceil(tiles / num_splits),
        GROUP=group, HEAD_DIM=dim, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(dim)),  # tl.dot needs 16 rows and K >= 16
        BLOCK_N=BLOCK_N, PAGE=block_size, ONE_SPLIT=num_splits == 1,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
