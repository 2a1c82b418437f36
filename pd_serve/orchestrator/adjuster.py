"""The online P/D ratio adjuster of P/D-Serve (papers.md §1.7), pure: per-scenario latency
windows and an explicit clock in, "add prefill" / "add decode" recommendations out.

Rule: E2E up and T_p/E2E up -> prefill is the bottleneck -> add prefill; E2E up and T_p/E2E
down -> decode dominates -> add decode. E2E up with the share unchanged (both phases slowed
alike) is ambiguous and recommends nothing. "T_p/E2E" is the ratio of the window's means,
mean(TTFT) / mean(E2E), which is also what sums of pre-aggregated metrics give.

Lifecycle, per scenario (all times are the caller's clock, seconds):
1. the first `observe`/`decide` for a scenario starts its first window; windows are
   consecutive `window_s` intervals, and each sample counts in the window in which it is
   observed; a window that closes with fewer than `min_samples` samples is thin: it is
   ignored and breaks any streak;
2. the first full window becomes the baseline (mean E2E and share, the reference state);
3. every later full window is compared with the baseline: "E2E up" = mean E2E above
   baseline * (1 + e2e_rise); the direction comes from the share moving by `share_delta` or
   more. A signal must hold for `hysteresis` consecutive windows (same direction) before
   `decide` acts on it. A window with E2E not up pulls the baseline toward itself
   (EMA with `baseline_alpha`), so slow drifts never trigger;
4. `decide` acts on a standing signal: a spare instance if there is one, else one instance
   moved from the other role if that role keeps `min_per_role`, else nothing (the signal
   stands until resources exist or it fades);
5. after an action: `cooldown_s` with no decisions and no samples kept, then back to 1 with a
   fresh baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

ADD_PREFILL, ADD_DECODE = "add_prefill", "add_decode"


@dataclass(frozen=True)
class AdjusterConfig:
    window_s: float = 30.0
    min_samples: int = 20
    e2e_rise: float = 0.25  # relative rise of mean E2E over the baseline that counts as "up"
    share_delta: float = 0.08  # absolute change of T_p/E2E that gives the direction
    hysteresis: int = 2  # consecutive full windows a signal must hold
    cooldown_s: float = 120.0  # after an action: no decisions, then a fresh baseline
    min_per_role: int = 2  # a reassignment never leaves the giving role below this
    baseline_alpha: float = 0.2  # EMA weight of a quiet window in the baseline

    def __post_init__(self) -> None:
        for key in ("window_s", "e2e_rise", "share_delta"):
            _positive(key, getattr(self, key))
        _positive("cooldown_s", self.cooldown_s, allow_zero=True)
        for key in ("min_samples", "hysteresis", "min_per_role"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        _positive("baseline_alpha", self.baseline_alpha)
        if self.baseline_alpha > 1:
            raise ValueError(f"baseline_alpha: expected a value in (0, 1], "
                             f"got {self.baseline_alpha!r}")


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}: expected a {'non-negative' if allow_zero else 'positive'} "
                         f"finite number, got {value!r}")


@dataclass(frozen=True)
class WindowStats:
    """Finished requests of one window: count and sums of TTFT and E2E (seconds)."""

    count: int = 0
    ttft_sum: float = 0.0
    e2e_sum: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"count: expected a non-negative integer, got {self.count!r}")
        _positive("ttft_sum", self.ttft_sum, allow_zero=True)
        _positive("e2e_sum", self.e2e_sum, allow_zero=True)
        if self.ttft_sum > self.e2e_sum * (1 + 1e-9) or (self.count and self.e2e_sum == 0):
            raise ValueError("e2e_sum: expected positive and at least ttft_sum")

    def __add__(self, other: WindowStats) -> WindowStats:
        return WindowStats(self.count + other.count, self.ttft_sum + other.ttft_sum,
                           self.e2e_sum + other.e2e_sum)

    @property
    def e2e_mean(self) -> float:
        return self.e2e_sum / self.count if self.count else math.nan

    @property
    def share(self) -> float:
        """mean(TTFT) / mean(E2E)."""
        return self.ttft_sum / self.e2e_sum if self.e2e_sum else math.nan


def window_stats(samples: Iterable[tuple[float, float]]) -> WindowStats:
    """Aggregates (ttft_s, e2e_s) samples of finished requests; ValueError on a bad sample."""
    count, ttft_sum, e2e_sum = 0, 0.0, 0.0
    for i, sample in enumerate(samples):
        try:
            ttft, e2e = (float(x) for x in sample)
        except (TypeError, ValueError):
            raise ValueError(f"samples[{i}]: expected (ttft_s, e2e_s), got {sample!r}") from None
        if not (math.isfinite(ttft) and math.isfinite(e2e)) or ttft < 0 or e2e <= 0 \
                or ttft > e2e:
            raise ValueError(f"samples[{i}]: expected 0 <= ttft_s <= e2e_s, e2e_s > 0, "
                             f"got {sample!r}")
        count, ttft_sum, e2e_sum = count + 1, ttft_sum + ttft, e2e_sum + e2e
    return WindowStats(count, ttft_sum, e2e_sum)


@dataclass(frozen=True)
class Adjustment:
    """Add one instance to a role. `source`: "spare" (a stateless spare takes the role) or
    "reassign" (one instance of `from_role` is re-roled)."""

    scenario: str
    action: str
    source: str
    from_role: str | None
    reason: str
    baseline_e2e: float
    current_e2e: float
    baseline_share: float
    current_share: float
    at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _State:
    """One scenario's windows, baseline and standing signal."""

    window_start: float
    window: WindowStats = field(default_factory=WindowStats)
    baseline: tuple[float, float] | None = None  # (mean E2E, share)
    direction: str | None = None  # of the current streak
    streak: int = 0
    last: tuple[float, float] | None = None  # the latest full window (mean E2E, share)
    cooldown_until: float = -math.inf


class Adjuster:
    def __init__(self, cfg: AdjusterConfig) -> None:
        self.cfg = cfg
        self._states: dict[str, _State] = {}

    def observe(self, now: float, scenario: str,
                samples: Iterable[tuple[float, float]]) -> None:
        """Adds finished requests' (ttft_s, e2e_s) to the scenario's current window."""
        self.observe_stats(now, scenario, window_stats(samples))

    def observe_stats(self, now: float, scenario: str, stats: WindowStats) -> None:
        """Adds pre-aggregated requests (e.g. deltas of the gateway's metric sums)."""
        st = self._roll(now, scenario)
        if now >= st.cooldown_until:
            st.window = st.window + stats

    def decide(self, now: float, scenario: str, n_p: int, n_d: int,
               spares: int) -> Adjustment | None:
        """The adjustment to make now, if a signal stands and resources allow; acting starts
        the cooldown (the caller is expected to carry the adjustment out)."""
        for key, value in (("n_p", n_p), ("n_d", n_d), ("spares", spares)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}: expected a non-negative integer, got {value!r}")
        st = self._roll(now, scenario)
        if now < st.cooldown_until or st.streak < self.cfg.hysteresis:
            return None
        assert st.direction is not None and st.baseline is not None and st.last is not None
        giver, giver_count = ("decode", n_d) if st.direction == ADD_PREFILL else ("prefill", n_p)
        if spares > 0:
            source, from_role = "spare", None
        elif giver_count - 1 >= self.cfg.min_per_role:
            source, from_role = "reassign", giver
        else:
            return None
        adj = Adjustment(scenario, st.direction, source, from_role,
                         self._reason(st, source, from_role), st.baseline[0], st.last[0],
                         st.baseline[1], st.last[1], now)
        self._states[scenario] = _State(now + self.cfg.cooldown_s,
                                        cooldown_until=now + self.cfg.cooldown_s)
        return adj

    def _reason(self, st: _State, source: str, from_role: str | None) -> str:
        assert st.baseline is not None and st.last is not None
        (be, bs), (ce, cs) = st.baseline, st.last
        via = "a spare" if from_role is None else f"one {from_role} instance re-roled"
        return (f"mean E2E {ce:.3g} s vs baseline {be:.3g} s (+{(ce / be - 1) * 100:.0f}%), "
                f"T_p/E2E {cs:.2f} vs {bs:.2f} for {st.streak} windows: {st.direction} "
                f"via {via} ({source})")

    def _roll(self, now: float, scenario: str) -> _State:
        """The scenario's state with every window that ended by `now` closed."""
        if not math.isfinite(now):
            raise ValueError(f"now: expected a finite time, got {now!r}")
        st = self._states.get(scenario)
        if st is None:
            st = self._states[scenario] = _State(now)
        w = self.cfg.window_s
        if now < st.window_start + w:
            return st
        self._close(st)
        skipped = math.floor((now - st.window_start) / w) - 1
        if skipped > 0:  # whole windows with no call: empty, hence thin
            st.direction, st.streak = None, 0
        st.window_start += (skipped + 1) * w
        st.window = WindowStats()
        return st

    def _close(self, st: _State) -> None:
        win, cfg = st.window, self.cfg
        if win.count < cfg.min_samples:
            st.direction, st.streak = None, 0
            return
        cur = (win.e2e_mean, win.share)
        st.last = cur
        if st.baseline is None:
            st.baseline = cur
            return
        (be, bs), (ce, cs) = st.baseline, cur
        if ce <= be * (1 + cfg.e2e_rise):
            a = cfg.baseline_alpha
            st.baseline = (be + a * (ce - be), bs + a * (cs - bs))
            st.direction, st.streak = None, 0
            return
        shift = cs - bs
        direction = (ADD_PREFILL if shift >= cfg.share_delta
                     else ADD_DECODE if shift <= -cfg.share_delta else None)
        st.streak = st.streak + 1 if direction is not None and direction == st.direction else \
            int(direction is not None)
        st.direction = direction
