"""Quality per prompt-length band (pd_device.profiles.QualityBand, Profiles.quality_for) and
the planner's use of it: a class plans with its band's curve, the minimum of the bands it
overlaps, or the nearest measured band's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_device.planner import Grid, RequestClass, Targets, explain
from pd_device.profiles import (
    CloudProfile,
    DeviceProfile,
    Profiles,
    QualityBand,
    QualityCurve,
    TimeCurve,
)


def linear(intercept: float, per_token: float) -> TimeCurve:
    return TimeCurve(((1.0, intercept + per_token), (2048.0, intercept + 2048 * per_token)))


SHORT = QualityCurve(((0.2, 0.9), (0.5, 0.95)))
MIDDLE = QualityCurve(((0.2, 0.8), (0.5, 0.9)))
LONG = QualityCurve(((0.2, 0.6), (0.5, 0.75), (0.75, 0.85)))
BANDS = (QualityBand(1, 511, SHORT, 4), QualityBand(512, 1023, MIDDLE, 4),
         QualityBand(1024, 2048, LONG, 4))
PROF = Profiles(DeviceProfile(linear(0.02, 0.001), 0.03), CloudProfile(linear(0.01, 5e-5), 0.01),
                QualityCurve(((0.2, 0.85),)), quality_bands=BANDS)


def test_band_inside_one_measured_band_uses_its_curve() -> None:
    assert PROF.quality_for((100, 400)) is SHORT
    assert PROF.quality_for((1024, 1024)) is LONG
    assert Profiles(PROF.device, PROF.cloud, SHORT).quality_for((5, 5000)) is SHORT  # no bands


def test_band_spanning_bands_takes_the_pointwise_minimum() -> None:
    q = PROF.quality_for((400, 1500))
    assert q(0.2) == 0.6 and q(0.5) == 0.75 and q(0.75) == 0.85 and q(0.6) == 0.75
    assert q(0.1) == 0.0 and q(1.0) == 1.0
    # a curve measured only from 0.3 on counts as 0 below it in the minimum
    late = Profiles(PROF.device, PROF.cloud, quality_bands=(
        QualityBand(1, 10, SHORT), QualityBand(11, 20, QualityCurve(((0.3, 0.99),)))))
    q = late.quality_for((1, 20))
    assert q(0.2) == 0.0 and q(0.3) == 0.9 and q(0.5) == 0.95


def test_unmeasured_band_falls_back_to_the_nearest_measured_one() -> None:
    gap = Profiles(PROF.device, PROF.cloud, quality_bands=(
        QualityBand(100, 200, SHORT), QualityBand(400, 500, LONG)))
    assert gap.quality_for((1, 50)) is SHORT  # below every band
    assert gap.quality_for((3000, 4000)) is LONG  # above every band
    assert gap.quality_for((250, 260)) is SHORT  # 50 tokens from SHORT, 140 from LONG
    assert gap.quality_for((300, 300)) is LONG  # equally far: the longer prompts' curve


def test_planner_keeps_more_prompt_for_long_prompts() -> None:
    targets = Targets(ttft_s=0.5, max_tpot_s=0.06, quality_floor=0.8)
    grid = Grid(allow_device_only=False)
    rhos = [explain(RequestClass(band, 0.0, math.inf, PROF.device), PROF, targets, grid)
            for band in ((256, 256), (768, 768), (1800, 1800))]
    assert [p.settings.rho for p in rhos] == [0.2, 0.2, 0.75]
    assert [p.quality for p in rhos] == [0.9, 0.8, 0.85]
    assert all(p.feasible and p.settings.mode == "pd_device" for p in rhos)
    # the whole-trace curve alone (no bands) would have let the long prompt keep only 0.2
    flat = Profiles(PROF.device, PROF.cloud, PROF.quality)
    assert explain(RequestClass((1800, 1800), 0.0, math.inf, PROF.device), flat, targets,
                   grid).settings.rho == 0.2


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2048), st.integers(0, 2048), st.sampled_from([0.1, 0.2, 0.5, 0.75, 0.9]))
def test_band_curve_is_never_above_a_band_it_overlaps(lo: int, width: int, rho: float) -> None:
    hi = lo + width
    q = PROF.quality_for((lo, hi))(rho)
    over = [b.curve(rho) for b in BANDS if b.lo <= hi and b.hi >= lo]
    assert over and q == min(over)


def test_bands_round_trip_and_bad_bands_raise(tmp_path: Path) -> None:
    PROF.save(tmp_path / "p.json")
    back = Profiles.load(tmp_path / "p.json")
    assert back == PROF and back.quality_bands[2].prompts == 4
    with pytest.raises(ValueError, match="disjoint and ascending"):
        Profiles(PROF.device, PROF.cloud, quality_bands=(BANDS[1], BANDS[0]))
    with pytest.raises(ValueError, match="disjoint and ascending"):
        Profiles(PROF.device, PROF.cloud, quality_bands=(QualityBand(1, 600, SHORT), BANDS[1]))
    with pytest.raises(ValueError, match="quality band"):
        QualityBand(10, 5, SHORT)
