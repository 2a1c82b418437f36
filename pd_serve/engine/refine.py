"""Prompt refinement for P/D-Device: which prompt positions the device keeps, from per-position
importance scores computed by the cloud during prefill (a pure function of its inputs).

The scores (`ModelRunner.prefill_importance`): for the last q = min(32, L) prompt positions, the
softmax attention weights they put on every prompt position, summed over queries, heads and
layers and normalised to sum 1. The rule (`keep_indices`): with L prompt tokens, ratio rho and
window W, keep k = min(L, max(ceil(rho * L), W)) positions: the last min(W, L) positions, plus
the k - min(W, L) highest-scoring positions of [0, L - W) (ties to the earlier position),
returned sorted ascending. rho = 1 keeps every position.

Why this rule (SnapKV-style): the attention the last prompt positions pay to earlier tokens is a
good predictor of what generation will attend to next, since the queries of the first generated
tokens resemble those of the final prompt positions (the "observation window"); tokens that
window ignores contribute little to the output, so dropping them changes the continuation least.
Summing over heads and layers keeps one score per token (the device recomputes everything from
the kept tokens, so no per-head selection is possible). The recent window is always kept whole
because local context carries the syntax and coherence of the continuation, and the scores of
the window's own positions are biased anyway (a position attends mostly to its neighbours and
itself). Positions are kept in their original order so the refined prompt reads as a
subsequence of the original.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

DEFAULT_OBSERVATION = 32  # q: prompt positions whose attention is observed


def keep_count(length: int, ratio: float, window: int) -> int:
    """Positions kept of a `length`-token prompt: min(length, max(ceil(ratio * length),
    window)). The ceiling is exact for the float `ratio` (0.3 * 10 keeps 3, not 4)."""
    _check(length, ratio, window)
    return min(length, max(math.ceil(Fraction(ratio) * length), window))


def keep_indices(scores: np.ndarray | None, ratio: float, window: int) -> list[int]:
    """Sorted prompt positions to keep (the module's rule). `scores` [L] float, one per prompt
    position; None is allowed only with ratio 1 (all positions, nothing to rank). ValueError
    for bad arguments."""
    if scores is None:
        raise ValueError("keep_indices needs scores unless ratio is 1 (use keep_all)")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    length = int(s.size)
    k = keep_count(length, ratio, window)
    recent = min(window, length)
    head = length - recent  # candidates: positions [0, head)
    # stable sort of -score: equal scores keep their order, so ties go to the earlier position
    ranked = np.argsort(-s[:head], kind="stable")[:k - recent]  # [k - recent]
    chosen = np.concatenate([np.sort(ranked), np.arange(head, length)])  # [k]
    return [int(i) for i in chosen]


def keep_all(length: int) -> list[int]:
    """Every position of a `length`-token prompt (rho = 1)."""
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    return list(range(length))


def normalised(scores: np.ndarray) -> np.ndarray:
    """`scores` scaled to sum 1 (float32); a zero sum gives uniform scores."""
    s = np.asarray(scores, dtype=np.float64)
    total = s.sum()
    out = s / total if total > 0 else np.full(s.shape, 1.0 / max(s.size, 1))
    return out.astype(np.float32)


def _check(length: int, ratio: float, window: int) -> None:
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio <= 1):
        raise ValueError(f"refine ratio must be in (0, 1], got {ratio!r}")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"refine window must be an integer >= 0, got {window!r}")
