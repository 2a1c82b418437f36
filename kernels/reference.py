"""Pure-torch reference implementations of the kernels (any device; the tests' oracle).

They favour clarity over speed: attention runs in float32 over the whole padded block table,
gather and scatter use advanced indexing. None of them synchronises with the host, so they are
also the CPU fallback of the public functions in `pd_kernels`.
"""

from __future__ import annotations

import torch

from .checks import flat_buffer


def token_blocks(block_table: torch.Tensor, num_tokens: int, block_size: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, offset in block) of positions 0 .. num_tokens - 1, each [num_tokens] int64."""
    pos = torch.arange(num_tokens, device=block_table.device)  # [num_tokens]
    return block_table.long()[pos // block_size], pos % block_size


def ref_paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per row attends keys 0 .. context_lens[b] - 1 of its paged cache.

    q [B, H, D]; k_cache, v_cache [num_blocks_total, block_size, KVH, D]; block_tables
    [B, max_blocks]; context_lens [B] (clamped to [0, max_blocks * block_size]). Returns
    [B, H, D] in q's dtype, or writes it into `out`. Rows with no keys give zeros. Table
    entries past a row's last block are never read, so they may hold anything.
    """
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    group = heads // kv_heads
    n_keys = max_blocks * block_size
    lens = context_lens.long().clamp(0, n_keys)  # [B]
    valid = torch.arange(n_keys, device=q.device)[None, :] < lens[:, None]  # [B, N]
    used = valid.view(batch, max_blocks, block_size).any(-1)  # [B, max_blocks]
    table = torch.where(used, block_tables.long(), 0)  # unused entries may be out of range
    keep = valid[:, :, None, None]
    # [B, N, KVH, D] float32; zeroed past the context so stale NaN/inf cannot leak in
    k = k_cache[table].reshape(batch, n_keys, kv_heads, dim).float().masked_fill(~keep, 0.0)
    v = v_cache[table].reshape(batch, n_keys, kv_heads, dim).float().masked_fill(~keep, 0.0)
    qg = q.float().reshape(batch, kv_heads, group, dim)  # [B, KVH, G, D]
    scores = torch.einsum("bkgd,bnkd->bkgn", qg, k) * scale  # [B, KVH, G, N]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows (no keys) -> 0
    result = torch.einsum("bkgn,bnkd->bkgd", probs, v).reshape(batch, heads, dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out


def ref_gather_kv(kv_blocks: torch.Tensor, block_table: torch.Tensor, num_tokens: int,
                  out: torch.Tensor) -> None:
    """Copies tokens 0 .. num_tokens - 1 of every layer's K and V into the first elements of
    `out` as [L, 2, num_tokens, KVH, D] (the KVLayout hand-off order)."""
    layers, _, _, block_size, kv_heads, dim = kv_blocks.shape
    blocks, offsets = token_blocks(block_table, num_tokens, block_size)
    dest = flat_buffer(out, kv_blocks.dtype, layers * 2 * num_tokens * kv_heads * dim, "out")
    # [L, 2, num_tokens, KVH, D] view of out's first elements
    dest.view(layers, 2, num_tokens, kv_heads, dim).copy_(kv_blocks[:, :, blocks, offsets])


def ref_scatter_kv(src: torch.Tensor, kv_blocks: torch.Tensor, block_table: torch.Tensor,
                   num_tokens: int) -> None:
    """The inverse of ref_gather_kv: writes src's [L, 2, num_tokens, KVH, D] into the blocks."""
    layers, _, _, block_size, kv_heads, dim = kv_blocks.shape
    blocks, offsets = token_blocks(block_table, num_tokens, block_size)
    data = flat_buffer(src, kv_blocks.dtype, layers * 2 * num_tokens * kv_heads * dim, "src")
    kv_blocks[:, :, blocks, offsets] = data.view(layers, 2, num_tokens, kv_heads, dim)


def ref_add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float, out: torch.Tensor) -> None:
    """h += delta (in h's dtype, when given), then out = weight * RMSNorm(h) with the norm in
    float32 and cast back before the weight. h, delta, out [N, hidden]; weight [hidden]."""
    if delta is not None:
        h.add_(delta)
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    torch.mul(weight, normed, out=out)


def ref_silu_mul(x: torch.Tensor, out: torch.Tensor) -> None:
    """out = silu(gate) * up where x = [gate | up] along the last dim; x [N, 2I], out [N, I]."""
    gate, up = x.chunk(2, dim=-1)
    torch.mul(torch.nn.functional.silu(gate), up, out=out)


def ref_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, slots: torch.Tensor | None, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor | None) -> None:
    """Rope (half-split) of q and k from packed qkv [N, (H + 2 KVH) * D] at `positions` [N];
    roped q into q_out [N, H, D], roped k into k_out [N, KVH, D] when given; roped k and v into
    slots [N] of k_cache / v_cache [S, KVH, D] when slots is given."""
    n, heads, dim = q_out.shape
    kv_heads = k_cache.shape[-2]
    q, k, v = qkv.view(n, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], dim=1)
    c, s = cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)  # [N, 1, D]

    def rope(x: torch.Tensor) -> torch.Tensor:
        half = dim // 2
        return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s

    q_out.copy_(rope(q))
    k_roped = rope(k)  # [N, KVH, D]
    if k_out is not None:
        k_out.copy_(k_roped)
    if slots is not None:
        k_cache.index_copy_(0, slots.long(), k_roped)
        v_cache.index_copy_(0, slots.long(), v)
