"""The P/D-Device keep rule (pd_serve.engine.refine): size ceil(rho * L) or at least the window,
always the last W positions, sorted, unique, deterministic, highest scores first, rho = 1 keeps
everything; bad arguments are clear ValueErrors."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.engine.refine import keep_all, keep_count, keep_indices, normalised

ratios = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, exclude_min=False)
windows = st.integers(min_value=0, max_value=80)


@st.composite
def score_arrays(draw: st.DrawFn) -> np.ndarray:
    length = draw(st.integers(min_value=1, max_value=200))
    values = draw(st.lists(st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
                           min_size=length, max_size=length))
    return np.asarray(values, dtype=np.float32)


@settings(max_examples=300, deadline=None)
@given(scores=score_arrays(), ratio=ratios, window=windows)
def test_keep_rule_properties(scores: np.ndarray, ratio: float, window: int) -> None:
    length = len(scores)
    keep = keep_indices(scores, ratio, window)
    want = min(length, max(math.ceil(Fraction(ratio) * length), window))
    assert len(keep) == want == keep_count(length, ratio, window)
    assert len(keep) >= min(window, length) and len(keep) / length >= ratio - 1e-12
    assert keep == sorted(set(keep)) and all(0 <= i < length for i in keep)
    recent = list(range(length - min(window, length), length))
    assert keep[len(keep) - len(recent):] == recent
    assert keep_indices(scores.copy(), ratio, window) == keep  # deterministic
    # every kept candidate scores at least as high as every dropped one (ties: earlier first)
    head = length - len(recent)
    kept = [i for i in keep if i < head]
    dropped = sorted(set(range(head)) - set(kept))
    if kept and dropped:
        assert min(scores[kept]) >= max(scores[dropped])
        for d in dropped:
            assert all(scores[k] > scores[d] or k < d for k in kept)


@settings(max_examples=100, deadline=None)
@given(scores=score_arrays(), window=windows)
def test_ratio_one_keeps_everything(scores: np.ndarray, window: int) -> None:
    assert keep_indices(scores, 1.0, window) == keep_all(len(scores)) == list(range(len(scores)))


def test_exact_ceiling_and_examples() -> None:
    assert keep_count(10, 0.3, 0) == 3  # 0.3 * 10 is 3.0000000000000004 in floats
    assert keep_count(100, 0.05, 32) == 32 and keep_count(10, 0.05, 32) == 10
    scores = np.array([0.9, 0.1, 0.5, 0.5, 0.2, 0.0, 0.0], np.float32)
    assert keep_indices(scores, 3 / 7, 2) == [0, 5, 6]
    assert keep_indices(scores, 4 / 7, 2) == [0, 2, 5, 6]  # tie 2 vs 3: the earlier
    assert keep_indices(scores, 4 / 7, 0) == [0, 2, 3, 4]


@pytest.mark.parametrize(("scores", "ratio", "window", "match"), [
    (np.ones(4), 0.0, 2, "ratio"), (np.ones(4), 1.5, 2, "ratio"),
    (np.ones(4), float("nan"), 2, "ratio"), (np.ones(4), 0.5, -1, "window"),
    (np.ones((2, 2)), 0.5, 1, "1-D"), (np.array([]), 0.5, 1, "1-D"),
    (np.array([1.0, np.inf]), 0.5, 1, "finite"), (None, 0.5, 1, "scores")])
def test_bad_arguments(scores: np.ndarray | None, ratio: float, window: int,
                       match: str) -> None:
    with pytest.raises(ValueError, match=match):
        keep_indices(scores, ratio, window)


def test_normalised_and_keep_all() -> None:
    out = normalised(np.array([1.0, 3.0]))
    assert out.dtype == np.float32 and np.allclose(out, [0.25, 0.75])
    assert np.allclose(normalised(np.zeros(4)), 0.25)
    with pytest.raises(ValueError, match="length"):
        keep_all(0)
