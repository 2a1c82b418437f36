"""Argument checks shared by the kernels and the references (metadata only, no host sync)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def flat_buffer(buf: torch.Tensor, dtype: torch.dtype, numel: int, name: str) -> torch.Tensor:
    """The first `numel` elements of contiguous `buf` as a 1-D `dtype` tensor (no copy).

    `buf` holds `dtype` already (any shape), or is a uint8 byte buffer reinterpreted as it.
    """
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
    if buf.dtype != dtype and buf.dtype != torch.uint8:
        raise TypeError(f"{name} has dtype {buf.dtype}, expected {dtype} (or a uint8 buffer)")
    if not buf.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    flat = buf.reshape(-1)
    if flat.dtype != dtype:
        itemsize = torch.empty((), dtype=dtype).element_size()
        if flat.numel() % itemsize or flat.data_ptr() % itemsize:
            raise ValueError(f"{name}: a uint8 buffer of {flat.numel()} bytes cannot be viewed "
                             f"as {dtype}")
        flat = flat.view(dtype)
    if flat.numel() < numel:
        raise ValueError(f"{name} holds {flat.numel()} elements of {dtype}, needs {numel}")
    return flat[:numel]


def check_kv_blocks(kv_blocks: torch.Tensor) -> None:
    """kv_blocks is [L, 2, NB, BS, KVH, D] of a float dtype with a contiguous token row."""
    if not isinstance(kv_blocks, torch.Tensor):
        raise TypeError(f"kv_blocks must be a torch.Tensor, got {type(kv_blocks).__name__}")
    if kv_blocks.dim() != 6 or kv_blocks.shape[1] != 2:
        raise ValueError(f"kv_blocks must be [L, 2, NB, BS, KVH, D], got {tuple(kv_blocks.shape)}")
    if kv_blocks.dtype not in FLOAT_DTYPES:
        raise TypeError(f"kv_blocks has dtype {kv_blocks.dtype}, expected one of {FLOAT_DTYPES}")
    _, _, _, block_size, kv_heads, dim = kv_blocks.shape
    if kv_blocks.stride()[3:] != (kv_heads * dim, dim, 1):
        raise ValueError("kv_blocks must be contiguous within each block [BS, KVH, D]")


def check_copy_args(kv_blocks: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> None:
    """Shapes, dtypes and devices of gather_kv / scatter_kv (the buffer is checked apart)."""
    check_kv_blocks(kv_blocks)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 1:
        raise ValueError("block_table must be a 1-D tensor of block ids")
    if block_table.dtype not in INDEX_DTYPES:
        raise TypeError(f"block_table has dtype {block_table.dtype}, expected int32")
    if block_table.device != kv_blocks.device:
        raise ValueError(f"block_table is on {block_table.device}, kv_blocks on "
                         f"{kv_blocks.device}")
    block_size = kv_blocks.shape[3]
    need = -(-num_tokens // block_size)
    if block_table.shape[0] < need:
        raise ValueError(f"{num_tokens} tokens need {need} blocks of {block_size}, "
                         f"block_table has {block_table.shape[0]}")


def check_decode_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor,
                      out: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices of paged_decode_attention."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("block_tables", block_tables), ("context_lens", context_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be [B, H, D] of a float dtype, got {tuple(q.shape)} {q.dtype}")
    batch, heads, dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, KVH, D], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache/v_cache dtypes {k_cache.dtype}/{v_cache.dtype} differ from "
                        f"q's {q.dtype}")
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"q has {heads} heads of dim {dim}; the cache {kv_heads} KV heads of "
                         f"dim {k_cache.shape[3]} (heads must be a multiple of KV heads)")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [{batch}], got {tuple(context_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in INDEX_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}, expected int32")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
