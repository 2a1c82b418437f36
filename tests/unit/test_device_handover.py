"""The planner and the speed controller together keep every displayed gap, the one into the
first device-made token included, within the max-TPOT target whenever the device is as fast as
its profile says (hypothesis): a request planned by pd_device.planner is simulated step by step
with the worker's chunking rule, device steps taking at most their profiled time, cloud tokens
arriving at most one profiled TPOT apart, the real controller picking every display time, and
the display waking up to the planned allowance (`Grid.display_jitter_s`) late."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pd_device.controller import ControllerConfig, ControllerState, next_display_time
from pd_device.planner import Grid, RequestClass, Targets, explain, kept_tokens
from pd_device.profiles import CloudProfile, DeviceProfile, Profiles, QualityCurve, TimeCurve

EPS = 1e-9
BLOCK, CHUNK = 16, 256


@dataclass(frozen=True)
class Run:
    """One simulated request, times from the cloud's first token at the device (T1 = 0)."""

    kept: int  # K: refined prompt tokens
    n: int  # N: cloud tokens after the first
    c: float  # actual gap between cloud tokens
    tr: float  # refined prompt's transfer time
    step_factor: float  # actual device step time / profiled
    d: float  # actual decode step


def step_time(dev: DeviceProfile, ctx: int, tokens: int) -> float:
    """A device step at most as slow as the planner's cost of it (a chunk after `ctx` cached
    tokens attends to them: the profile's increment plus its smallest step)."""
    grown = dev.prefill_s(ctx + tokens) - dev.prefill_s(ctx) + dev.prefill_s(1) if ctx else 0.0
    return max(dev.prefill_s(tokens), grown)


def device_timeline(run: Run, dev: DeviceProfile) -> tuple[list[tuple[float, int, int]], float,
                                                             int]:
    """The worker's rule (pd_device/worker.py) on the simulated clock: chunks of whole blocks
    while cloud tokens are expected, else the hand-over. Returns the (time, computed, seq
    length) after each chunk, the first local token's time and the cut."""
    t, computed, marks = run.tr, 0, []
    while True:
        received = min(run.n + 1, math.floor(t / run.c + EPS) + 1) if run.c > 0 else run.n + 1
        seq = run.kept + received
        end = (min(seq, computed + CHUNK) // BLOCK) * BLOCK
        if received < run.n + 1 and end - computed >= BLOCK:
            t += run.step_factor * step_time(dev, computed, end - computed)
            computed = end
            marks.append((t, computed, seq))
            continue
        rest = seq - computed
        while rest > 0:  # the hand-over request, in engine steps of at most CHUNK
            t += run.step_factor * step_time(dev, seq - rest, min(rest, CHUNK))
            rest -= min(rest, CHUNK)
        return marks, t, received


def simulate(run: Run, dev: DeviceProfile, cfg: ControllerConfig, n_local: int = 3,
             late: tuple[float, ...] = ()) -> list[float]:
    """Display times of the whole stream (cloud part, then `n_local` device tokens); token i
    is shown `late[i % len(late)]` seconds after the controller's time (a late wake-up)."""
    marks, h, cut = device_timeline(run, dev)
    avail = [i * run.c for i in range(cut)] + [h + j * run.d for j in range(n_local)]
    events = sorted({*(i * run.c for i in range(run.n + 1)), *(m[0] for m in marks), *avail})
    shown: list[float] = []
    now = 0.0
    while len(shown) < len(avail):
        local = sum(1 for a in avail[cut:] if a <= now + EPS)
        received = min(cut if now >= h else run.n + 1, math.floor(now / run.c + EPS) + 1) \
            if run.c > 0 else cut
        computed = max([m[1] for m in marks if m[0] <= now + EPS], default=0)
        state = ControllerState(
            now=now, last_display=shown[-1] if shown else None,
            buffered=(received if local == 0 else cut + local) - len(shown),
            prefill_tps=run.kept / max(dev.prefill_s(run.kept), EPS),
            decode_step_s=dev.decode_step_s,
            to_prefill=max(run.kept + received - computed, 0) if local == 0 else 0,
            cloud_expected=run.n + 1 - received if now < h else 0, cloud_gap_s=run.c or None,
            local_started=local > 0)
        t = next_display_time(state, cfg)
        future = [e for e in events if e > now + EPS]
        if t is not None and (not future or t <= future[0] + EPS):
            now = max(t, now) + (late[len(shown) % len(late)] if late else 0.0)
            shown.append(now)
        else:
            now = future[0]
    return shown


@st.composite
def planned(draw: st.DrawFn) -> tuple[Profiles, RequestClass, Targets, Grid]:
    step = draw(st.floats(0.005, 0.05))  # per-step cost of the device
    per_token = draw(st.floats(1e-4, 2e-3))
    quad = draw(st.sampled_from([0.0, 0.5, 2.0]))  # attention: superlinear in tokens
    dev = DeviceProfile(TimeCurve(tuple((float(n), step + per_token * n * (1 + quad * n / 4096))
                                        for n in (1, 256, 512, 1024, 2048, 4096))),
                        draw(st.floats(0.005, 0.04)))
    cloud = CloudProfile(TimeCurve(((1.0, 0.02), (4096.0, draw(st.floats(0.05, 1.0))))),
                         draw(st.floats(0.002, 0.03)))
    prof = Profiles(dev, cloud, QualityCurve(((0.2, 0.9),)))
    p = draw(st.integers(64, 2000))
    cls = RequestClass((p, p), draw(st.floats(0.0, 0.1)),
                       draw(st.sampled_from([math.inf, 2e7, 1e8])), dev)
    targets = Targets(2.0, draw(st.floats(0.05, 0.2)), draw(st.sampled_from([0.0, 0.95])))
    grid = Grid(margin_s=draw(st.sampled_from([0.0, 0.01])), n_max=64, chunk_max_tokens=CHUNK,
                block_size=BLOCK, allow_device_only=False,
                display_jitter_s=draw(st.sampled_from([0.0, 0.005, 0.01, 0.02])))
    return prof, cls, targets, grid


lateness = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8).map(tuple)


@settings(max_examples=300, deadline=None)
@given(planned(), st.floats(0.3, 1.0), st.floats(0.2, 1.0), st.floats(0.3, 1.0), lateness)
def test_planned_request_keeps_every_gap_within_max_tpot(
        case: tuple[Profiles, RequestClass, Targets, Grid], step_factor: float,
        cloud_factor: float, decode_factor: float, late: tuple[float, ...]) -> None:
    prof, cls, targets, grid = case
    plan = explain(cls, prof, targets, grid)
    assume(plan.feasible and plan.settings.mode == "pd_device")
    s = plan.settings
    k = kept_tokens(cls.prompt_len_band[1], s.rho, grid.refine_window)
    bits = 0.0 if math.isinf(cls.bandwidth_bps) else 8.0 / cls.bandwidth_bps
    c = max(prof.cloud.tpot_s, grid.token_event_bytes * bits)
    run = Run(kept=k, n=s.n_cloud, c=c * cloud_factor, tr=k * grid.bytes_per_index * bits,
              step_factor=step_factor, d=cls.device_speed.decode_step_s * decode_factor)
    cfg = ControllerConfig(pace_s=s.pace_s, max_gap_s=targets.max_tpot_s,
                           margin_s=cls.device_speed.decode_step_s,
                           jitter_s=grid.display_jitter_s)
    shown = simulate(run, cls.device_speed, cfg,
                     late=tuple(x * grid.display_jitter_s for x in late))
    gaps = [b - a for a, b in zip(shown, shown[1:])]
    assert max(gaps) <= targets.max_tpot_s + 1e-6, (plan, run, gaps)


def test_late_wake_ups_need_the_allowance() -> None:
    """Why the allowance: a request planned with none gets a pace equal to max TPOT, and a
    display waking 5 ms late shows gaps above it (the first CPU evaluation's 104 ms gap at a
    100 ms pace); planned with a 10 ms allowance, the same lateness stays within it."""
    dev = DeviceProfile(TimeCurve(((1.0, 0.041), (4096.0, 0.04 + 4096 * 0.002))), 0.02)
    prof = Profiles(dev, CloudProfile(TimeCurve(((1.0, 0.02), (4096.0, 0.3))), 0.01),
                    QualityCurve(((0.1, 0.9),)))
    cls, targets = RequestClass((1500, 1500), 0.0, math.inf, dev), Targets(2.0, 0.1, 0.0)
    worst = []
    for jitter in (0.0, 0.01):
        grid = Grid(n_max=64, allow_device_only=False, display_jitter_s=jitter)
        s = explain(cls, prof, targets, grid).settings
        run = Run(kept=kept_tokens(1500, s.rho, grid.refine_window), n=s.n_cloud, c=0.01,
                  tr=0.0, step_factor=1.0, d=dev.decode_step_s)
        cfg = ControllerConfig(pace_s=s.pace_s, max_gap_s=0.1, margin_s=dev.decode_step_s,
                               jitter_s=jitter)
        shown = simulate(run, dev, cfg, late=(0.005,))
        worst.append((s.pace_s, max(b - a for a, b in zip(shown, shown[1:]))))
    assert worst[0][0] == 0.1 and worst[0][1] > 0.1 + 1e-3
    assert worst[1][0] <= 0.09 and worst[1][1] <= 0.1 + 1e-9


@settings(max_examples=100, deadline=None)
@given(planned())
def test_a_slower_device_than_profiled_can_break_it(
        case: tuple[Profiles, RequestClass, Targets, Grid]) -> None:
    """The guarantee rests on the profile: the same plan on a device 3x slower than profiled
    shows a hand-over gap above the target whenever the catch-up needed cloud tokens."""
    prof, cls, targets, grid = case
    plan = explain(cls, prof, targets, grid)
    assume(plan.feasible and plan.settings.mode == "pd_device" and plan.settings.n_cloud > 0)
    s = plan.settings
    k = kept_tokens(cls.prompt_len_band[1], s.rho, grid.refine_window)
    assume(math.isinf(cls.bandwidth_bps))
    run = Run(kept=k, n=s.n_cloud, c=prof.cloud.tpot_s, tr=0.0, step_factor=3.0,
              d=cls.device_speed.decode_step_s)
    cfg = ControllerConfig(pace_s=s.pace_s, max_gap_s=targets.max_tpot_s)
    _, h, cut = device_timeline(run, cls.device_speed)
    assume(h > cut * targets.max_tpot_s + 1e-3)
    shown = simulate(run, cls.device_speed, cfg)
    assert max(b - a for a, b in zip(shown, shown[1:])) > targets.max_tpot_s
