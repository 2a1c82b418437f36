"""Picks the next token of each sequence from float32 logits: greedy, temperature, top-k, top-p.

Each row is processed on its own numbers, and a seeded request draws from its own numpy
Generator, so its tokens do not depend on its batch neighbours. Unseeded requests draw from
the sampler's generator (seeded from the engine's seed, if any).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pd_serve.engine.sampling_params import SamplingParams


class Sampler:
    """Stateless apart from the shared generator used by unseeded requests."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray, params: Sequence[SamplingParams],
               generators: Sequence[np.random.Generator | None]) -> list[int]:
        """`logits` [n, vocab]; `generators[i]` is row i's own generator or None."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
            raise ValueError(f"logits {logits.shape} do not match {len(params)} requests")
        tokens = np.argmax(logits, axis=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            gens = [generators[i] or self._rng for i in rows]
            tokens[rows] = sample_rows(logits[rows], [params[i] for i in rows], gens)
        return [int(t) for t in tokens]


def sample_rows(logits: np.ndarray, params: list[SamplingParams],
                gens: list[np.random.Generator]) -> np.ndarray:
    """Random draws for rows with temperature > 0; returns token ids [n].

    Whether a row goes through the top-k/top-p path depends only on its own parameters, so a
    seeded row gives the same token whatever its neighbours ask for."""
    x = logits.astype(np.float64) / np.array([p.temperature for p in params])[:, None]
    # One uniform draw in (0, 1] per row from that row's generator.
    u = np.array([1.0 - g.random() for g in gens])
    vocab = x.shape[1]
    filtered = np.array([0 < p.top_k < vocab or p.top_p < 1.0 for p in params])
    out = np.empty(len(params), dtype=np.int64)
    plain = ~filtered
    if plain.any():
        out[plain] = _draw(_softmax(x[plain]), u[plain])
    if filtered.any():
        sel = [p for p, f in zip(params, filtered) if f]
        out[filtered] = _draw_filtered(x[filtered], sel, u[filtered])
    return out


def _draw_filtered(x: np.ndarray, params: list[SamplingParams], u: np.ndarray) -> np.ndarray:
    """Top-k then top-p over scaled logits `x` [n, vocab]."""
    vocab = x.shape[1]
    top_k = np.array([p.top_k if p.top_k > 0 else vocab for p in params])
    top_p = np.array([p.top_p for p in params])
    order = np.argsort(-x, axis=-1, kind="stable")  # [n, vocab], most likely first
    sorted_x = np.take_along_axis(x, order, axis=-1)
    rank = np.arange(vocab)[None, :]
    sorted_x = np.where(rank < top_k[:, None], sorted_x, -np.inf)
    probs = _softmax(sorted_x)
    mass_before = np.cumsum(probs, axis=-1) - probs
    # Keep the smallest prefix whose mass reaches top_p; the most likely token always stays.
    probs = np.where((mass_before < top_p[:, None]) | (rank == 0), probs, 0.0)
    picked = _draw(probs, u)
    return order[np.arange(len(params)), picked]


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return z / np.sum(z, axis=-1, keepdims=True)


def _draw(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw per row; `u` in (0, 1] never lands on a zero-probability token."""
    cdf = np.cumsum(probs, axis=-1)
    idx = np.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1)
    return np.minimum(idx, probs.shape[1] - 1)
