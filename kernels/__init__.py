"""pd_kernels: Triton kernels for the PyTorch backend's paged KV cache, with torch references.

Public functions (shapes as in their docstrings):
  triton_available()        triton importable and CUDA present;
  paged_decode_attention    split-KV decode attention over a paged cache (CUDA-graph safe);
  gather_kv / scatter_kv    a request's paged KV <-> the KVLayout buffer [L, 2, T, KVH, D];
  add_rms_norm, silu_mul, rope_qk_cache
                            the fused elementwise ops of a decoder layer (`layer_ops.py`).
Dispatch: CUDA tensors with triton available run the Triton kernels; CPU tensors, or any
tensors where triton is missing, run `pd_kernels.reference` (same results, slower). The package
imports without triton; the Triton modules load on first use.
"""

from __future__ import annotations

import functools

import torch

from . import reference
from .checks import check_copy_args, check_decode_args, flat_buffer
from .layer_ops import add_rms_norm, rope_qk_cache, silu_mul
from .reference import ref_gather_kv, ref_paged_decode_attention, ref_scatter_kv

__all__ = ["triton_available", "paged_decode_attention", "gather_kv", "scatter_kv",
           "add_rms_norm", "silu_mul", "rope_qk_cache",
           "reference", "ref_paged_decode_attention", "ref_gather_kv", "ref_scatter_kv"]


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available() -> bool:
    """True when triton can be imported and a CUDA device is present."""
    return _triton_importable() and torch.cuda.is_available()


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _triton_importable()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV cache.

    q [B, H, D]; k_cache, v_cache [num_blocks_total, block_size, KVH, D] (kv_blocks[layer, 0]
    and [layer, 1]); block_tables [B, max_blocks] int32; context_lens [B] int32: row b attends
    keys 0 .. context_lens[b] - 1 (its current token's K/V already written; lengths are
    clamped to [0, max_blocks * block_size]). H must be a multiple of KVH (GQA). Returns
    [B, H, D] in q's dtype, written into `out` when given; a row without keys gives zeros.
    Never synchronises with the host, so it can be captured in a CUDA graph. Block ids must
    lie in k_cache's range for every block a row uses (not checked: that would need a sync).
    """
    check_decode_args(q, k_cache, v_cache, block_tables, context_lens, out)
    if not _use_triton(q):
        return ref_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                          scale, out)
    from .decode_attention import paged_decode_attention_triton

    return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens,
                                         scale, out)


def gather_kv(kv_blocks: torch.Tensor, block_table: torch.Tensor, num_tokens: int,
              out: torch.Tensor) -> None:
    """Copies tokens 0 .. num_tokens - 1 of all layers' K and V into `out`, one launch.

    kv_blocks [L, 2, NB, BS, KVH, D]; block_table 1-D int32 on kv_blocks' device with at
    least ceil(num_tokens / BS) entries; `out` a contiguous tensor of kv_blocks' dtype (any
    shape, e.g. flat) or a uint8 byte buffer, with room for L * 2 * num_tokens * KVH * D
    elements: its first ones receive the [L, 2, num_tokens, KVH, D] layout, the rest is left
    alone.
    """
    check_copy_args(kv_blocks, block_table, num_tokens)
    _check_same_device(out, kv_blocks, "out")
    if not _use_triton(kv_blocks):
        ref_gather_kv(kv_blocks, block_table, num_tokens, out)
        return
    from .kv_copy import copy_kv_triton

    layers, _, _, _, kv_heads, dim = kv_blocks.shape
    buf = flat_buffer(out, kv_blocks.dtype, layers * 2 * num_tokens * kv_heads * dim, "out")
    copy_kv_triton(kv_blocks, block_table, num_tokens, buf, to_cache=False)


def scatter_kv(src: torch.Tensor, kv_blocks: torch.Tensor, block_table: torch.Tensor,
               num_tokens: int) -> None:
    """The inverse of gather_kv: writes src's first L * 2 * num_tokens * KVH * D elements,
    read as [L, 2, num_tokens, KVH, D], into the blocks of `block_table`, one launch. Blocks
    outside the table, and token positions past num_tokens, are not written."""
    check_copy_args(kv_blocks, block_table, num_tokens)
    _check_same_device(src, kv_blocks, "src")
    if not _use_triton(kv_blocks):
        ref_scatter_kv(src, kv_blocks, block_table, num_tokens)
        return
    from .kv_copy import copy_kv_triton

    layers, _, _, _, kv_heads, dim = kv_blocks.shape
    buf = flat_buffer(src, kv_blocks.dtype, layers * 2 * num_tokens * kv_heads * dim, "src")
    copy_kv_triton(kv_blocks, block_table, num_tokens, buf, to_cache=True)


def _check_same_device(buf: torch.Tensor, kv_blocks: torch.Tensor, name: str) -> None:
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
    if buf.device != kv_blocks.device:
        raise ValueError(f"{name} is on {buf.device}, kv_blocks on {kv_blocks.device}")
