"""Packs a prefill or decode batch into the padded index arrays both backends consume.

One formulation serves prefill and decode: new tokens are written into cache slots
(`slot_mapping`), then every query attends over the gathered context slots 0..ctx_len-1 with a
causal mask by position. Padding writes go to the scratch block after the last real block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pd_serve.backends.base import DecodeBatch, PrefillBatch, SeqChunk


@dataclass(frozen=True)
class PackedBatch:
    token_ids: np.ndarray  # [B, T] int32, padding 0
    positions: np.ndarray  # [B, T] int32, padding 0
    slot_mapping: np.ndarray  # [B, T] int32, cache slot per new token, padding -> scratch slot
    context_slots: np.ndarray  # [B, C] int32, slot of context position j, padding -> scratch
    context_lens: np.ndarray  # [B] int32, tokens in context after this step
    query_lens: np.ndarray  # [B] int32, new tokens per sequence
    num_seqs: int  # real sequences (rows past it are padding)


def next_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size


def shape_bucket(n: int, minimum: int = 1, fine_from: int = 256) -> int:
    """Padded size for static-shape graphs: a power of two up to `fine_from`, above it four steps
    per octave (320, 384, 448, 512, 640, 768, 896, 1024, 1280, ...).

    Pure powers of two waste up to half the work on long contexts (a 513-token decode context
    ran over 1024 keys, docs/benchmarks.md); quarter-octave steps keep the waste under 20% for
    four graphs per octave instead of one.
    """
    size = next_bucket(n, minimum)
    if size <= fine_from:
        return size
    step = size // 8
    return -(-n // step) * step


def _slots(block_table: list[int], start: int, stop: int, block_size: int) -> np.ndarray:
    pos = np.arange(start, stop)
    table = np.asarray(block_table, dtype=np.int64)
    if len(table) * block_size < stop:
        raise ValueError(f"block table of {len(table)} blocks cannot hold {stop} tokens")
    return table[pos // block_size] * block_size + pos % block_size


def pack_chunks(seqs: list[SeqChunk], block_size: int, scratch_slot: int,
                pad_to: tuple[int, int, int] | None = None) -> PackedBatch:
    """Pads to (B, T, C) = `pad_to` when given (graph buckets), else to the batch maxima."""
    n = len(seqs)
    t_max = max(len(s.token_ids) for s in seqs)
    c_max = max(s.start_pos + len(s.token_ids) for s in seqs)
    b, t, c = pad_to or (n, t_max, c_max)
    if b < n or t < t_max or c < c_max:
        raise ValueError(f"pad_to {pad_to} smaller than batch ({n}, {t_max}, {c_max})")
    tokens = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    slot_mapping = np.full((b, t), scratch_slot, np.int32)
    context_slots = np.full((b, c), scratch_slot, np.int32)
    context_lens = np.zeros((b,), np.int32)
    query_lens = np.zeros((b,), np.int32)
    for i, s in enumerate(seqs):
        q, end = len(s.token_ids), s.start_pos + len(s.token_ids)
        tokens[i, :q] = s.token_ids
        positions[i, :q] = np.arange(s.start_pos, end)
        slot_mapping[i, :q] = _slots(s.block_table, s.start_pos, end, block_size)
        context_slots[i, :end] = _slots(s.block_table, 0, end, block_size)
        context_lens[i], query_lens[i] = end, q
    return PackedBatch(tokens, positions, slot_mapping, context_slots, context_lens,
                       query_lens, n)


def pack_prefill(batch: PrefillBatch, block_size: int, scratch_slot: int,
                 pad_to: tuple[int, int, int] | None = None) -> PackedBatch:
    if not batch.seqs:
        raise ValueError("empty prefill batch")
    return pack_chunks(batch.seqs, block_size, scratch_slot, pad_to)


def pack_decode(batch: DecodeBatch, block_size: int, scratch_slot: int,
                pad_to: tuple[int, int, int] | None = None) -> PackedBatch:
    if not batch.token_ids:
        raise ValueError("empty decode batch")
    if not len(batch.token_ids) == len(batch.positions) == len(batch.block_tables):
        raise ValueError(f"decode batch lengths differ: {len(batch.token_ids)} tokens, "
                         f"{len(batch.positions)} positions, {len(batch.block_tables)} tables")
    seqs = [SeqChunk([tok], pos, table) for tok, pos, table in
            zip(batch.token_ids, batch.positions, batch.block_tables, strict=True)]
    return pack_chunks(seqs, block_size, scratch_slot, pad_to)


def attention_mask(packed: PackedBatch) -> np.ndarray:
    """Boolean [B, T, C]: query t of row b may attend key j (causal and inside the context).

    Key 0 is always visible so padding rows and padding queries never produce an all-masked
    softmax row (NaN); their outputs are discarded.
    """
    key_pos = np.arange(packed.context_slots.shape[1])[None, None, :]
    allowed = key_pos <= packed.positions[:, :, None]
    allowed &= key_pos < packed.context_lens[:, None, None]
    allowed[:, :, 0] = True
    return allowed
