"""The online P/D adjuster: baseline, direction from the T_p/E2E share, hysteresis, spare vs
reassignment, cooldown and fresh baseline, EMA tracking of slow drift, thin windows; Hypothesis
properties over random window sequences; bad input."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.orchestrator.adjuster import (
    ADD_DECODE,
    ADD_PREFILL,
    Adjuster,
    AdjusterConfig,
    WindowStats,
    window_stats,
)

CFG = AdjusterConfig(window_s=10.0, min_samples=5, e2e_rise=0.25, share_delta=0.08,
                     hysteresis=2, cooldown_s=30.0, min_per_role=2)


class Driver:
    """Feeds one window of identical samples at a time, then decides at the window's end."""

    def __init__(self, cfg: AdjusterConfig = CFG, n_p: int = 3, n_d: int = 3,
                 spares: int = 1) -> None:
        self.adj = Adjuster(cfg)
        self.cfg = cfg
        self.t = 0.0
        self.n_p, self.n_d, self.spares = n_p, n_d, spares
        self.adj.observe(0.0, "s", [])  # the first call starts the scenario's first window

    def window(self, ttft: float, e2e: float, n: int = 10) -> Any:
        self.adj.observe(self.t + 1.0, "s", [(ttft, e2e)] * n)
        self.t += self.cfg.window_s
        return self.adj.decide(self.t, "s", self.n_p, self.n_d, self.spares)


def test_window_stats() -> None:
    w = window_stats([(0.5, 2.0), (1.5, 2.0)])
    assert (w.count, w.e2e_mean, w.share) == (2, 2.0, 0.5)
    assert window_stats([]).count == 0 and math.isnan(window_stats([]).e2e_mean)
    assert (w + w).count == 4


def test_prefill_bottleneck_adds_prefill_after_hysteresis() -> None:
    d = Driver()
    assert d.window(0.5, 2.0) is None  # baseline: E2E 2.0, share 0.25
    assert d.window(0.5, 2.0) is None  # steady
    assert d.window(1.5, 3.0) is None  # E2E +50%, share 0.5: first signal window
    adj = d.window(1.5, 3.0)  # second: acts
    assert adj is not None
    assert (adj.action, adj.source, adj.from_role) == (ADD_PREFILL, "spare", None)
    assert adj.baseline_e2e == pytest.approx(2.0) and adj.current_e2e == pytest.approx(3.0)
    assert adj.baseline_share == pytest.approx(0.25) and adj.current_share == pytest.approx(0.5)
    assert adj.at == d.t and "add_prefill" in adj.reason
    assert adj.to_dict()["action"] == ADD_PREFILL


def test_decode_bottleneck_reassigns_a_prefill_instance() -> None:
    d = Driver(n_p=3, n_d=2, spares=0)
    d.window(0.5, 2.0)
    d.window(0.5, 4.0)  # more tokens generated: E2E doubles, share halves
    adj = d.window(0.5, 4.0)
    assert adj is not None
    assert (adj.action, adj.source, adj.from_role) == (ADD_DECODE, "reassign", "prefill")


def test_no_resources_no_action_until_a_spare_appears() -> None:
    d = Driver(n_p=2, n_d=2, spares=0)  # taking one would leave 1 < min_per_role
    d.window(0.5, 2.0)
    d.window(0.5, 4.0)
    assert d.window(0.5, 4.0) is None
    assert d.adj.decide(d.t, "s", 2, 2, 0) is None
    adj = d.adj.decide(d.t + 1.0, "s", 2, 2, 1)  # the signal still stands
    assert adj is not None and adj.source == "spare" and adj.action == ADD_DECODE


def test_ambiguous_rise_recommends_nothing() -> None:
    d = Driver()
    d.window(0.5, 2.0)
    for _ in range(5):  # E2E doubles, share unchanged (both phases slowed alike)
        assert d.window(1.0, 4.0) is None


def test_hysteresis_needs_consecutive_windows() -> None:
    d = Driver(AdjusterConfig(window_s=10.0, min_samples=5, hysteresis=3, cooldown_s=30.0))
    d.window(0.5, 2.0)
    d.window(1.5, 3.0)
    d.window(1.5, 3.0)
    assert d.window(0.5, 2.0) is None  # quiet window: the streak breaks
    d.window(1.5, 3.0)
    d.window(1.5, 3.0)
    assert d.window(0.5, 4.0) is None  # direction flipped: a new streak of 1
    assert d.window(1.5, 3.0) is None
    d.window(1.5, 3.0)
    assert d.window(1.5, 3.0) is not None


def test_thin_window_breaks_the_streak_and_sets_no_baseline() -> None:
    d = Driver()
    assert d.window(0.5, 2.0, n=2) is None  # thin: no baseline yet
    d.window(0.5, 2.0)  # the baseline
    d.window(1.5, 3.0)
    assert d.window(1.5, 3.0, n=4) is None  # thin
    assert d.window(1.5, 3.0) is None  # streak restarted at 1
    assert d.window(1.5, 3.0) is not None


def test_skipped_windows_break_the_streak() -> None:
    d = Driver()
    d.window(0.5, 2.0)
    d.window(1.5, 3.0)
    d.t += 3 * CFG.window_s  # nobody called: empty windows
    assert d.window(1.5, 3.0) is None
    assert d.window(1.5, 3.0) is not None


def test_cooldown_then_fresh_baseline() -> None:
    d = Driver()
    d.window(0.5, 2.0)
    d.window(1.5, 3.0)
    assert d.window(1.5, 3.0) is not None  # at t = 30: cooldown until 60
    for _ in range(3):  # samples during the cooldown are dropped, no decisions
        assert d.window(3.0, 6.0) is None
    assert d.window(1.5, 3.0) is None  # 60..70: the new baseline (E2E 3.0, share 0.5)
    assert d.window(1.5, 3.0) is None
    assert d.window(2.0, 4.0) is None  # +33% but share 0.5 unchanged: nothing
    d.window(1.0, 4.0)  # share 0.25: decode
    adj = d.window(1.0, 4.0)
    assert adj is not None and adj.action == ADD_DECODE
    assert adj.baseline_e2e == pytest.approx(3.0)


def test_slow_drift_is_tracked_not_acted_on() -> None:
    d = Driver()
    e2e = 2.0
    for _ in range(60):  # +3% a window: the EMA baseline lags by ~15% < 25%
        assert d.window(e2e * 0.4, e2e) is None
        e2e *= 1.03
    assert e2e > 2.0 * 5


def test_observe_stats_equals_observe() -> None:
    a, b = Adjuster(CFG), Adjuster(CFG)
    a.observe(0.0, "s", [])
    b.observe_stats(0.0, "s", WindowStats())
    for k in range(4):
        ttft, e2e = (0.5, 2.0) if k < 2 else (1.5, 3.0)
        a.observe(k * 10.0 + 1, "s", [(ttft, e2e)] * 6)
        b.observe_stats(k * 10.0 + 1, "s", WindowStats(6, 6 * ttft, 6 * e2e))
    x, y = a.decide(40.0, "s", 3, 3, 1), b.decide(40.0, "s", 3, 3, 1)
    assert x is not None and x == y


def test_scenarios_are_independent() -> None:
    d = Driver()
    d.window(0.5, 2.0)
    d.window(1.5, 3.0)
    d.adj.observe(d.t + 1.0, "other", [(0.1, 1.0)] * 10)
    assert d.window(1.5, 3.0) is not None
    assert d.adj.decide(d.t, "other", 3, 3, 1) is None


@pytest.mark.parametrize(("kw", "field"), [
    ({"window_s": 0}, "window_s"),
    ({"min_samples": 0}, "min_samples"),
    ({"e2e_rise": -0.1}, "e2e_rise"),
    ({"share_delta": math.nan}, "share_delta"),
    ({"hysteresis": 1.5}, "hysteresis"),
    ({"cooldown_s": -1}, "cooldown_s"),
    ({"min_per_role": 0}, "min_per_role"),
    ({"baseline_alpha": 1.5}, "baseline_alpha"),
])
def test_bad_config_names_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        AdjusterConfig(**kw)


def test_bad_input() -> None:
    adj = Adjuster(CFG)
    with pytest.raises(ValueError, match=r"^samples\[1\]"):
        adj.observe(0.0, "s", [(0.1, 1.0), (2.0, 1.0)])
    with pytest.raises(ValueError, match=r"^samples\[0\]"):
        adj.observe(0.0, "s", [(0.1,)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="^now"):
        adj.observe(math.nan, "s", [])
    with pytest.raises(ValueError, match="^spares"):
        adj.decide(0.0, "s", 2, 2, -1)
    with pytest.raises(ValueError, match="^e2e_sum"):
        WindowStats(1, 2.0, 1.0)


# The gap is at least the 0.5 s between a window's samples and its decide: the clock the
# adjuster gets is monotonic (a gap of 0 made `decide` run before the last `observe`).
windows = st.lists(st.tuples(st.floats(0.5, 4.0), st.floats(0.05, 0.95), st.integers(0, 12),
                             st.floats(0.5, 25.0)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(windows, st.integers(1, 3), st.integers(0, 2))
def test_properties_over_random_windows(seq: list[tuple[float, float, int, float]],
                                        hysteresis: int, spares: int) -> None:
    """Random windows (E2E level, share, samples, then a gap before the next decide): no
    action in a cooldown, none before 1 + hysteresis windows after a (re)start, and the
    action's direction matches its share change and E2E rise."""
    cfg = AdjusterConfig(window_s=10.0, min_samples=5, e2e_rise=0.25, share_delta=0.08,
                         hysteresis=hysteresis, cooldown_s=25.0, min_per_role=2)
    adj = Adjuster(cfg)
    t, restart = 0.0, 0.0
    adj.observe(t, "s", [])
    for e2e, share, n, gap in seq:
        adj.observe(t + 0.5, "s", [(share * e2e, e2e)] * n)
        t += gap
        out = adj.decide(t, "s", 3, 3, spares)
        if out is None:
            continue
        assert t >= restart + (1 + hysteresis) * cfg.window_s
        shift = out.current_share - out.baseline_share
        assert out.current_e2e > out.baseline_e2e * (1 + cfg.e2e_rise)
        if out.action == ADD_PREFILL:
            assert shift >= cfg.share_delta
        else:
            assert out.action == ADD_DECODE and shift <= -cfg.share_delta
        assert out.source == ("spare" if spares else "reassign")
        restart = t + cfg.cooldown_s
        assert adj.decide(t + cfg.cooldown_s * 0.99, "s", 3, 3, spares) is None
