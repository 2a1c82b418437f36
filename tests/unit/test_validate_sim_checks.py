"""Unit tests of tools/validate_sim_checks.py: the probe consistency rule and the drift report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from validate_sim_checks import (  # noqa: E402
    agreeing,
    drift,
    rel_spread,
    repeat_until_agree,
    session_flags,
)


def test_rel_spread() -> None:
    assert rel_spread([10.0]) == 0.0
    assert rel_spread([10.0, 12.0, 11.0]) == pytest.approx(0.2)
    assert rel_spread([1.0, float("nan")]) == float("inf")
    with pytest.raises(ValueError, match="no values"):
        rel_spread([])
    with pytest.raises(ValueError, match="positive"):
        rel_spread([0.0, 1.0])


def test_agreeing_rejects_the_disturbed_repetition() -> None:
    # the second session's co-location probe: decode step alone 9.1 then 12.3 ms
    reps = [{"alone": 9.1, "loaded": 10.1}, {"alone": 12.3, "loaded": 19.2}]
    assert agreeing(reps, 0.15) == []
    reps.append({"alone": 9.5, "loaded": 10.6})
    assert agreeing(reps, 0.15) == [0, 2]


def test_agreeing_every_quantity_must_agree() -> None:
    reps = [{"a": 1.0, "b": 1.0}, {"a": 1.05, "b": 1.5}]
    assert agreeing(reps, 0.15) == []
    assert agreeing(reps, 0.6) == [0, 1]


def test_agreeing_prefers_the_largest_then_the_fastest_set() -> None:
    reps = [{"t": 10.0}, {"t": 11.0}, {"t": 12.0}, {"t": 14.0}]
    assert agreeing(reps, 0.15) == [0, 1]  # {10, 11, 12} spreads 20 %; {10, 11} is fastest
    assert agreeing(reps, 0.2) == [0, 1, 2]
    assert agreeing(reps, 0.5) == [0, 1, 2, 3]


def test_agreeing_bad_input() -> None:
    assert agreeing([], 0.1) == []
    with pytest.raises(ValueError, match="need"):
        agreeing([{"t": 1.0}], 0.1, need=0)
    with pytest.raises(ValueError, match="different quantities"):
        agreeing([{"t": 1.0}, {"u": 1.0}], 0.1)


def test_repeat_until_agree_stops_as_soon_as_two_agree() -> None:
    values = iter([9.1, 12.3, 9.4, 99.0])
    kept, rep = repeat_until_agree(lambda: next(values), lambda v: {"t": v}, 0.15, max_tries=4)
    assert kept == [9.1, 9.4]
    assert rep["tries"] == 3 and rep["kept"] == [0, 2] and rep["consistent"]
    assert rep["spread"] == pytest.approx(9.4 / 9.1 - 1)


def test_repeat_until_agree_is_bounded_and_reports_the_failure() -> None:
    values = iter([1.0, 2.0, 4.0, 3.5, 100.0])
    kept, rep = repeat_until_agree(lambda: next(values), lambda v: {"t": v}, 0.1, max_tries=4)
    assert rep["tries"] == 4 and not rep["consistent"]
    assert kept == [4.0, 3.5]  # the closest pair is kept, and reported
    assert session_flags({"consistency": {"coloc": rep}}, "before") == [
        "before: coloc inconsistent after 4 tries (spread 14 % > 10 %)"]
    with pytest.raises(ValueError, match="max_tries"):
        repeat_until_agree(lambda: 1.0, lambda v: {"t": v}, 0.1, need=3, max_tries=2)


def test_drift_flags_changes_beyond_the_tolerance() -> None:
    d = drift({"f_p": 1.17, "step": 10.0, "only_before": 1.0}, {"f_p": 2.22, "step": 10.5}, 0.15)
    assert set(d["rel_change"]) == {"f_p", "step"}
    assert d["rel_change"]["step"] == pytest.approx(0.05)
    assert d["flagged"] == ["f_p"]
