"""Rotary position embedding tables (default, linear and llama3 scaling), computed in NumPy.

Both backends take the same cos/sin tables so their positions agree bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

from pd_serve.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Per-pair inverse frequency, shape [head_dim // 2], float64."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv, rope)
    return inv


def _llama3_scale(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, a smooth blend between.
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled)


def cos_sin_table(rope: RopeConfig, head_dim: int,
                  max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for every position, each [max_positions, head_dim] float32, laid out as in HF
    (the half-split `rotate_half` convention: frequencies repeated over both halves)."""
    inv = inverse_frequencies(rope, head_dim)
    # [max_positions, head_dim / 2]
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv)
    emb = np.concatenate([angles, angles], axis=-1)  # [max_positions, head_dim]
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
