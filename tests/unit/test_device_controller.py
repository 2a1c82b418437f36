"""Properties of the P/D-Device speed controller (pd_device/controller.py), on single decisions
and on a simulated request: a cloud streaming every `c` seconds, a device prefilling at `P`
tokens/s that takes over once it has caught up, then decoding every `d` seconds, and a display
that wakes up to the controller's `jitter_s` late."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pd_device.controller import (
    ControllerConfig,
    ControllerState,
    next_display_time,
    prefill_eta_s,
    target_gap,
)

EPS = 1e-9
times = st.floats(0.0, 100.0, allow_nan=False)
speeds = st.floats(1.0, 1e5, allow_nan=False)
steps = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def configs(draw: st.DrawFn) -> ControllerConfig:
    max_gap = draw(st.floats(0.001, 2.0))
    return ControllerConfig(pace_s=draw(st.floats(0.0, max_gap)), max_gap_s=max_gap,
                            margin_s=draw(st.floats(0.0, 0.5)),
                            jitter_s=draw(st.sampled_from([0.0, 0.1, 0.5])) * max_gap)


@st.composite
def states(draw: st.DrawFn) -> ControllerState:
    now = draw(times)
    last = draw(st.none() | st.floats(0.0, now))
    return ControllerState(
        now=now, last_display=last, buffered=draw(st.integers(0, 100)),
        prefill_tps=draw(speeds), decode_step_s=draw(steps), to_prefill=draw(st.integers(0, 5000)),
        cloud_expected=draw(st.integers(0, 200)),
        cloud_gap_s=draw(st.none() | st.floats(0.0, 1.0)), local_started=draw(st.booleans()))


@given(states(), configs())
def test_decision_is_monotone_and_bounded(s: ControllerState, cfg: ControllerConfig) -> None:
    t = next_display_time(s, cfg)
    if s.buffered == 0:
        assert t is None  # nothing to show: wait
        return
    assert t is not None and t >= s.now
    if s.last_display is None:
        assert t == s.now  # the first token at once
        return
    assert t >= s.last_display
    if s.now <= s.last_display + cfg.bound_s:  # gaps planned below the wake-up allowance
        assert t - s.last_display <= cfg.max_gap_s - cfg.jitter_s + EPS


@given(states(), configs())
def test_caught_up_device_never_holds_tokens(s: ControllerState, cfg: ControllerConfig) -> None:
    assume(s.local_started)
    assert target_gap(s, cfg) <= min(cfg.pace_s, s.decode_step_s) + EPS


@given(states(), configs())
def test_pace_when_comfortable(s: ControllerState, cfg: ControllerConfig) -> None:
    """Before the hand-over the gap is never below the pace; a device with nothing left to
    prefill and plenty of buffered tokens is paced exactly."""
    assume(not s.local_started)
    g = target_gap(s, cfg)
    assert min(cfg.pace_s, cfg.bound_s) - EPS <= g <= cfg.bound_s + EPS
    relaxed = ControllerState(now=s.now, last_display=s.now, buffered=10_000, prefill_tps=1e9,
                              decode_step_s=0.0, to_prefill=0, cloud_expected=0)
    assert target_gap(relaxed, cfg) <= cfg.pace_s + cfg.margin_s / 10_000 + EPS


@given(states())
def test_eta_grows_with_work(s: ControllerState) -> None:
    more = ControllerState(**{**s.__dict__, "to_prefill": s.to_prefill + 10})
    assert prefill_eta_s(more) >= prefill_eta_s(s)


# ----- simulated request ---------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    x0: int  # prompt tokens the device prefills
    tps: float  # device prefill tokens/s
    d: float  # device decode step
    c: float  # cloud gap between tokens
    n: int  # cloud tokens after the first
    n_local: int  # local tokens simulated after the hand-over

    def catch_up(self) -> tuple[float, int]:
        """(hand-over time H, cloud tokens used): the device has prefilled the prompt and the
        first k cloud tokens before the (k+1)-th arrives, or all N+1 of them."""
        for k in range(1, self.n + 2):
            t = max((self.x0 + k) / self.tps, (k - 1) * self.c)
            if k == self.n + 1 or t < k * self.c:
                return t, k
        raise AssertionError("unreachable")


def simulate(sc: Scenario, cfg: ControllerConfig,
             late: tuple[float, ...] = ()) -> tuple[list[float], list[float], int]:
    """Display times, availability times of the shown tokens, and the cut (cloud tokens); the
    display shows token i `late[i % len(late)] * jitter_s` after the controller's time (it
    wakes up late), none late without `late`."""
    h, cut = sc.catch_up()
    avail = [i * sc.c for i in range(cut)] + [h + sc.d * (j + 1) for j in range(sc.n_local)]
    events = sorted({*(i * sc.c for i in range(sc.n + 1)), h, *avail})
    shown: list[float] = []
    now = 0.0
    while len(shown) < len(avail):
        t = next_display_time(_state(sc, cfg, now, shown, h, cut), cfg)
        future = [e for e in events if e > now]
        if t is not None and (not future or t <= future[0]):
            now = t + (late[len(shown) % len(late)] * cfg.jitter_s if late else 0.0)
            shown.append(now)
        else:
            now = future[0]
    return shown, avail, cut


def _state(sc: Scenario, cfg: ControllerConfig, now: float, shown: list[float], h: float,
           cut: int) -> ControllerState:
    received = min(sc.n + 1, math.floor(now / sc.c + EPS) + 1)
    local = sum(1 for j in range(sc.n_local) if h + sc.d * (j + 1) <= now + EPS)
    before = now < h
    available = (received if before else cut) + local
    return ControllerState(
        now=now, last_display=shown[-1] if shown else None, buffered=available - len(shown),
        prefill_tps=sc.tps, decode_step_s=sc.d,
        to_prefill=math.ceil(sc.x0 + received - sc.tps * now - EPS) if before else 0,
        cloud_expected=sc.n + 1 - received if before else 0, cloud_gap_s=sc.c,
        local_started=local > 0)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Scenario, ControllerConfig]:
    max_gap = draw(st.floats(0.02, 0.5))
    pace = draw(st.floats(0.0, max_gap))
    sc = Scenario(x0=draw(st.integers(0, 2000)), tps=draw(st.floats(50.0, 20000.0)),
                  d=draw(st.floats(0.001, max_gap)), c=draw(st.floats(0.002, 0.2)),
                  n=draw(st.integers(0, 64)), n_local=draw(st.integers(1, 4)))
    return sc, ControllerConfig(pace_s=pace, max_gap_s=max_gap, margin_s=draw(st.floats(0, 0.05)),
                                jitter_s=draw(st.floats(0.0, max_gap / 2)))


lateness = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8).map(tuple)


@settings(max_examples=300, deadline=None)
@given(scenarios(), lateness)
def test_simulated_stream_is_monotone_and_gap_bounded(case: tuple[Scenario, ControllerConfig],
                                                      late: tuple[float, ...]) -> None:
    """Every token shown once, in order, never before it exists; no gap above max_gap, the
    display's wake-up lateness (up to jitter_s) included, while the next token was there in
    time for the planned bound max_gap - jitter_s."""
    sc, cfg = case
    shown, avail, _ = simulate(sc, cfg, late)
    assert len(shown) == len(avail)
    assert all(t >= a - EPS for t, a in zip(shown, avail))
    assert all(b >= a for a, b in zip(shown, shown[1:]))
    for i in range(1, len(shown)):
        if avail[i] <= shown[i - 1] + cfg.bound_s:
            assert shown[i] - shown[i - 1] <= cfg.max_gap_s + 1e-6


@st.composite
def supplied_scenarios(draw: st.DrawFn) -> tuple[Scenario, ControllerConfig]:
    """The cloud streams at least as fast as the pace; the device's prefill takes a time drawn
    around what N cloud tokens can cover at max_gap each."""
    c = draw(st.floats(0.002, 0.1))
    pace = draw(st.floats(c, 0.3))
    max_gap = draw(st.floats(pace, 0.6))
    n, x0 = draw(st.integers(0, 64)), draw(st.integers(0, 2000))
    prefill_s = draw(st.floats(1e-3, (n + 1) * max_gap))
    sc = Scenario(x0=x0, tps=(x0 + n + 1) / prefill_s, d=draw(st.floats(0.001, max_gap / 2)),
                  c=c, n=n, n_local=draw(st.integers(1, 4)))
    # the allowance leaves the pace within the planned bound (the planner's pace <= B)
    return sc, ControllerConfig(pace_s=pace, max_gap_s=max_gap, margin_s=draw(st.floats(0, 0.02)),
                                jitter_s=draw(st.floats(0.0, max_gap - pace)) * 0.999)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(supplied_scenarios(), lateness)
def test_buffer_lasts_until_the_hand_over(case: tuple[Scenario, ControllerConfig],
                                          late: tuple[float, ...]) -> None:
    """When the cloud supplies enough (it streams at least as fast as the pace) and the
    hand-over is reachable within the planned bound max_gap - jitter_s per token, the display
    never runs dry: no gap, the cloud-to-local one included, exceeds max_gap even when the
    display wakes up to jitter_s late."""
    sc, cfg = case
    h, cut = sc.catch_up()
    assume(h + sc.d + cfg.margin_s + 2 * cfg.pace_s <= cut * cfg.bound_s)
    shown, _, _ = simulate(sc, cfg, late)
    gaps = [b - a for a, b in zip(shown, shown[1:])]
    assert max(gaps, default=0.0) <= cfg.max_gap_s + 1e-6, (gaps, h, cut)
