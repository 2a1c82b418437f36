"""Attention of the fast path: per-sequence SDPA for prefill, paged decode attention backends.

Prefill: each sequence's queries attend causally, through SDPA's flash kernel for a fresh
prompt (`is_causal`) and, after a prefix-cache hit, over its cached context gathered from the
blocks with a lower-right causal bias (query i sits at position start + i). K/V heads are
expanded to the query heads first: the copy is small next to the matmuls and keeps SDPA on the
flash / memory-efficient kernels, which not every release supports with grouped heads.

Decode backends, all with one signature (no host synchronisation, so CUDA graphs can hold them):
q [B, H, D], k_cache / v_cache [NB+1, BS, KVH, D], block_tables [B, MB] int32, context_lens [B]
int32 -> out [B, H, D]:
* `triton`: `pd_kernels.paged_decode_attention` (reads only each row's context blocks);
* `flex`: torch flex attention over the whole cache as one key sequence, with a block mask
  built from the block tables on the device (compiled on CUDA);
* `torch`: gathers each row's MB blocks and runs SDPA under a length mask (the fallback).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
DECODE_BACKENDS = ("triton", "flex", "torch")


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[S, KVH, D] -> [S, H, D], each K/V head repeated for its group of query heads."""
    s, kvh, d = x.shape
    if kvh == num_heads:
        return x
    return x[:, :, None].expand(s, kvh, num_heads // kvh, d).reshape(s, num_heads, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [T, H, D] at positions S-T .. S-1 over k, v [S, KVH, D] at 0 .. S-1 -> [T, H, D]."""
    t, h, _ = q.shape
    s = k.shape[0]
    keys = expand_kv(k, h).transpose(0, 1)[None]  # [1, H, S, D]
    values = expand_kv(v, h).transpose(0, 1)[None]  # [1, H, S, D]
    query = q.transpose(0, 1)[None]  # [1, H, T, D]
    if s == t:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(query, keys, values,
                                             attn_mask=causal_lower_right(t, s))
    return out[0].transpose(0, 1)  # [T, H, D]


def torch_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, context_lens: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """The `torch` backend: gather MB blocks per row, mask positions >= context_lens."""
    b, mb = block_tables.shape
    bs, h = k_cache.shape[1], q.shape[1]
    idx = block_tables.long()
    keys = k_cache[idx].flatten(1, 2)  # [B, MB*BS, KVH, D]
    values = v_cache[idx].flatten(1, 2)  # [B, MB*BS, KVH, D]
    mask = torch.arange(mb * bs, device=q.device)[None] < context_lens[:, None]  # [B, MB*BS]
    out = F.scaled_dot_product_attention(
        q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None, None], scale=scale,
        enable_gqa=keys.shape[2] != h)  # [B, H, 1, D]
    return out[:, :, 0]


class FlexPagedDecode:
    """The `flex` backend: one query per row over the cache viewed as a single key sequence of
    (NB+1) * BS slots; the block mask visits only the row's blocks and the mask_mod hides
    slots past the row's length (and blocks outside its table, for the eager reference)."""

    def __init__(self, compile_kernel: bool) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self._flex = torch.compile(flex_attention, dynamic=False) if compile_kernel \
            else flex_attention

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
        from torch.nn.attention.flex_attention import BlockMask

        nb, bs, kvh, d = k_cache.shape
        b, mb = block_tables.shape
        tables = block_tables.long()
        used = (context_lens.long() + bs - 1) // bs  # [B] blocks holding context
        last = tables.gather(1, (used - 1).clamp(min=0)[:, None])[:, 0]  # [B]
        fill = context_lens.long() - (used - 1) * bs  # [B] tokens in the last block
        valid = torch.arange(mb, device=q.device)[None] < used[:, None]  # [B, MB]
        member = torch.zeros(b, nb, dtype=torch.bool, device=q.device)  # [B, NB+1]
        member.scatter_(1, torch.where(valid, tables, last[:, None]), True)

        def mask_mod(bi: torch.Tensor, hi: torch.Tensor, qi: torch.Tensor,
                     kv: torch.Tensor) -> torch.Tensor:
            blk = kv // bs
            return member[bi, blk] & ((blk != last[bi]) | (kv % bs < fill[bi]))

        indices = torch.zeros(b, 1, 1, nb, dtype=torch.int32, device=q.device)
        indices[:, 0, 0, :mb] = block_tables
        mask = BlockMask.from_kv_blocks(used.int().view(b, 1, 1), indices, BLOCK_SIZE=(bs, bs),
                                        mask_mod=mask_mod, seq_lengths=(1, nb * bs))
        keys = k_cache.view(1, nb * bs, kvh, d).transpose(1, 2).expand(b, kvh, nb * bs, d)
        values = v_cache.view(1, nb * bs, kvh, d).transpose(1, 2).expand(b, kvh, nb * bs, d)
        out = self._flex(q[:, :, None], keys, values, block_mask=mask, scale=scale,
                         enable_gqa=kvh != q.shape[1])
        assert isinstance(out, torch.Tensor)
        return out[:, :, 0]  # [B, H, D]


def make_decode_attention(name: str, device: torch.device,
                          kernels: ModuleType | None) -> DecodeAttention:
    """The decode backend `name` (`auto`: triton where pd_kernels' Triton kernels run, i.e. on
    CUDA with Triton, else torch). An explicit `triton` without Triton runs pd_kernels' own
    reference (tests of the call on CPU)."""
    if name == "auto":
        runs = kernels is not None and device.type == "cuda" and kernels.triton_available()
        name = "triton" if runs else "torch"
    if name == "triton":
        if kernels is None:
            raise ValueError("decode_attention 'triton' needs the pd_kernels package "
                             "(kernels/ in the source tree, or installed)")
        kernel = kernels.paged_decode_attention

        def triton_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor,
                          lens: torch.Tensor, scale: float) -> torch.Tensor:
            return kernel(q, k, v, tables, lens, scale)

        return triton_decode
    if name == "flex":
        return FlexPagedDecode(compile_kernel=device.type == "cuda")
    if name == "torch":
        return torch_paged_decode
    raise ValueError(f"decode_attention must be auto or one of {DECODE_BACKENDS}, got {name!r}")
