"""Settings planner (pd_device.planner) and its profiles: feasibility against an independent
display timeline, optimality against brute force over small grids, monotonicity, fallbacks
with reasons, purity, simulator-style inputs, and profile validation and JSON round trips."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_device.planner import (
    Grid,
    Plan,
    RequestClass,
    Targets,
    catchup_steps,
    explain,
    kept_tokens,
    pace_candidates,
    pd_feasible,
    plan,
)
from pd_device.profiles import (
    CloudProfile,
    DeviceProfile,
    Profiles,
    QualityBand,
    QualityCurve,
    TimeCurve,
)

TOL = 1e-9


@st.composite
def time_curves(draw: st.DrawFn, max_s: float) -> TimeCurve:
    xs = sorted(draw(st.sets(st.integers(1, 2048), min_size=1, max_size=4)))
    ys = [draw(st.floats(0.0, max_s)) for _ in xs]
    return TimeCurve(tuple((float(x), y) for x, y in zip(xs, ys)))


@st.composite
def linear_curves(draw: st.DrawFn, per_token: tuple[float, float]) -> TimeCurve:
    """Roughly linear times (a phone or a cloud prefill) with up to 20% noise per point."""
    a, b = draw(st.floats(0.0, 0.1)), draw(st.floats(*per_token))
    xs = sorted(draw(st.sets(st.integers(1, 2048), min_size=2, max_size=5)))
    return TimeCurve(tuple((float(x), (a + b * x) * draw(st.floats(0.8, 1.2))) for x in xs))


@st.composite
def profiles_st(draw: st.DrawFn, realistic: bool) -> Profiles:
    """Arbitrary curves, or the realistic regime where P/D-Device wins (a phone-class device
    prefilling 300-10k tokens/s, a cloud 5k-1M tokens/s)."""
    if realistic:
        device = DeviceProfile(draw(linear_curves((1e-4, 3e-3))), draw(st.floats(0.005, 0.06)))
        cloud = CloudProfile(draw(linear_curves((1e-6, 2e-4))), draw(st.floats(0.002, 0.03)))
    else:
        device = DeviceProfile(draw(time_curves(3.0)), draw(st.floats(0.001, 0.2)))
        cloud = CloudProfile(draw(time_curves(1.0)), draw(st.floats(0.001, 0.1)))
    rhos = sorted(draw(st.sets(st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.7, 0.9]), max_size=4)))
    quality = QualityCurve(tuple((r, draw(st.floats(0.0, 1.0))) for r in rhos))
    edges = sorted(draw(st.sets(st.integers(1, 2048), max_size=4)))
    bands = tuple(QualityBand(lo, hi, QualityCurve(tuple((r, draw(st.floats(0.0, 1.0)))
                                                         for r in rhos)))
                  for lo, hi in zip(edges[::2], edges[1::2]))
    return Profiles(device, cloud, quality, quality_bands=bands)


@st.composite
def classes(draw: st.DrawFn, device: DeviceProfile, realistic: bool) -> RequestClass:
    lo = draw(st.integers(256 if realistic else 1, 1500))
    hi = draw(st.integers(lo, 2048))
    bw = draw(st.sampled_from([math.inf, 1e6, 1e7, 1e8]))
    return RequestClass((lo, hi), draw(st.floats(0.0, 0.1 if realistic else 0.3)), bw, device)


def targets_st(realistic: bool) -> st.SearchStrategy[Targets]:
    if realistic:
        return st.builds(Targets, st.floats(0.15, 0.6), st.floats(0.03, 0.15),
                         st.floats(0.0, 0.9))
    return st.builds(Targets, st.floats(0.05, 3.0), st.floats(0.01, 0.3), st.floats(0.0, 1.0))


small_grids = st.builds(
    Grid,
    rhos=st.sets(st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.7, 0.9]), max_size=3).map(
        lambda s: tuple(sorted(s | {1.0}))),
    paces_s=st.sets(st.sampled_from([0.01, 0.02, 0.05, 0.1, 0.2]), min_size=1, max_size=3).map(
        lambda s: tuple(sorted(s))),
    n_max=st.integers(0, 150), margin_s=st.sampled_from([0.0, 0.01]),
    margin_frac=st.sampled_from([0.0, 0.2]), chunk_max_tokens=st.sampled_from([64, 256, 4096]),
    allow_device_only=st.sampled_from([True, True, False]),
    display_jitter_s=st.sampled_from([0.0, 0.005]))


def worker_steps(kept: int, n: int, chunk: int, block: int = 16) -> list[int]:
    """The device steps to its first own token, written out independently of the planner: a
    block-aligned first chunk while cloud tokens are expected, then chunk-sized pieces."""
    total = kept + n + 1
    head = [] if n == 0 or kept + 1 < block else [min(kept + 1, chunk) // block * block]
    rest = total - sum(head)
    return head + [chunk] * (rest // chunk) + ([rest % chunk] if rest % chunk else [])


def steps_time(dev: DeviceProfile, steps: list[int]) -> float:
    """Each step from an empty cache, or, after cached tokens, the profile's increment over
    them plus its smallest step, whichever is larger (attention over the context)."""
    total, ctx = 0.0, 0
    for t in steps:
        grown = dev.prefill_s(ctx + t) - dev.prefill_s(ctx) + dev.prefill_s(1) if ctx else 0.0
        total += max(dev.prefill_s(t), grown)
        ctx += t
    return total


def chunked_prefill_s(dev: DeviceProfile, tokens: int, chunk: int) -> float:
    return steps_time(dev, worker_steps(tokens - 1, 0, chunk))


@st.composite
def cases(draw: st.DrawFn) -> tuple[Profiles, RequestClass, Targets, Grid]:
    realistic = draw(st.sampled_from([True, True, False]))
    prof = draw(profiles_st(realistic))
    return (prof, draw(classes(prof.device, realistic)), draw(targets_st(realistic)),
            draw(small_grids))


def displayed_gaps(cls: RequestClass, prof: Profiles, grid: Grid, p: Plan,
                   outputs: int = 64) -> tuple[float, list[float]]:
    """Independent display timeline of a P/D-Device plan: (TTFT, gaps between shown tokens).
    Cloud tokens arrive every c after T1 and are shown at T1 + k * pace (never before they
    arrive); the device's own tokens come one decode step apart from its catch-up time and are
    shown at once."""
    s, hi = p.settings, cls.prompt_len_band[1]
    bits = 0.0 if math.isinf(cls.bandwidth_bps) else 8.0 / cls.bandwidth_bps
    t1 = (cls.rtt_s + (grid.request_bytes + hi * grid.bytes_per_prompt_token) * bits
          + prof.cloud.ttft(hi))
    c = max(prof.cloud.tpot_s, grid.token_event_bytes * bits)
    k = min(hi, max(math.ceil(Fraction(s.rho) * hi), grid.refine_window))
    work = steps_time(cls.device_speed, worker_steps(k, s.n_cloud, grid.chunk_max_tokens))
    ready = t1 + (k * grid.bytes_per_index * bits + work) * (1 + grid.margin_frac) \
        + grid.margin_s
    shown = [t1]
    for i in range(1, s.n_cloud + 1):
        shown.append(max(t1 + i * s.pace_s, t1 + i * c, shown[-1]))
    for j in range(outputs):
        shown.append(max(ready + j * cls.device_speed.decode_step_s, shown[-1]))
    return t1, [b - a for a, b in zip(shown, shown[1:])]


def check_meets_targets(cls: RequestClass, prof: Profiles, tg: Targets, grid: Grid,
                        p: Plan) -> None:
    """Every planned gap within max TPOT less the display's wake-up allowance, quality from
    the class's band."""
    dev, bound = cls.device_speed, tg.max_tpot_s - grid.display_jitter_s
    if p.settings.mode == "device_only":
        assert chunked_prefill_s(dev, cls.prompt_len_band[1], grid.chunk_max_tokens) <= \
            tg.ttft_s + TOL
        assert dev.decode_step_s <= bound + TOL
        return
    assert p.settings.mode == "pd_device"
    ttft, gaps = displayed_gaps(cls, prof, grid, p)
    assert ttft <= tg.ttft_s + TOL
    assert max(gaps) <= bound + TOL
    band = [b.curve for b in prof.quality_bands if b.lo <= cls.prompt_len_band[1] and
            b.hi >= cls.prompt_len_band[0]]
    if band:  # every overlapping band's bound meets the floor
        assert min(c(p.settings.rho) for c in band) >= tg.quality_floor
    assert prof.quality_for(cls.prompt_len_band)(p.settings.rho) >= tg.quality_floor
    assert math.isclose(ttft, p.ttft_s) and max(gaps) <= p.max_gap_s + TOL


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_feasible_plans_meet_every_target(data: st.DataObject) -> None:
    prof, cls, tg, grid = data.draw(cases())
    p = explain(cls, prof, tg, grid)
    if p.feasible and p.settings.mode == "cloud_only":
        assert p.ttft_s <= tg.ttft_s and p.max_gap_s <= tg.max_tpot_s - grid.display_jitter_s
    elif p.feasible:
        check_meets_targets(cls, prof, tg, grid, p)


def brute_force(cls: RequestClass, prof: Profiles, tg: Targets,
                grid: Grid) -> str | tuple[float, int, float, float] | None:
    """"device_only" when allowed and it meets the targets, else the smallest (occupancy, N,
    -rho, pace) over every grid point, None when nothing is feasible."""
    hi = cls.prompt_len_band[1]
    if grid.allow_device_only and \
            chunked_prefill_s(cls.device_speed, hi, grid.chunk_max_tokens) <= tg.ttft_s and \
            cls.device_speed.decode_step_s <= tg.max_tpot_s - grid.display_jitter_s:
        return "device_only"
    best = None
    for n in range(grid.n_max + 1):
        for rho in grid.rhos:
            for pace in pace_candidates(tg, grid):
                if pd_feasible(cls, prof, tg, n, rho, pace, grid):
                    key = (prof.cloud.ttft(hi) + n * prof.cloud.tpot_s, n, -rho, pace)
                    best = key if best is None or key < best else best
    return best


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_plan_is_optimal_against_brute_force(data: st.DataObject) -> None:
    prof, cls, tg, grid = data.draw(cases())
    p = explain(cls, prof, tg, grid)
    best = brute_force(cls, prof, tg, grid)
    s = p.settings
    if best is None:
        assert s.mode in ("device_only", "cloud_only") and p.reason
        assert s.mode == "cloud_only" or not p.feasible
    elif best == "device_only":
        assert s.mode == "device_only" and p.feasible and p.occupancy_s == 0.0
    else:
        assert s.mode == "pd_device" and p.feasible
        assert (p.occupancy_s, s.n_cloud, -s.rho, s.pace_s) == best


def cloud_tokens(p: Plan) -> float:
    return {"device_only": 0.0, "cloud_only": math.inf}.get(p.settings.mode,
                                                            float(p.settings.n_cloud))


@settings(max_examples=200, deadline=None)
@given(st.data(), st.floats(0.1, 1.0))
def test_faster_device_never_needs_more_cloud(data: st.DataObject, speedup: float) -> None:
    prof, cls, tg, grid = data.draw(cases())
    fast = RequestClass(cls.prompt_len_band, cls.rtt_s, cls.bandwidth_bps,
                        cls.device_speed.scaled(speedup))
    slow_p, fast_p = explain(cls, prof, tg, grid), explain(fast, prof, tg, grid)
    assert fast_p.occupancy_s <= slow_p.occupancy_s
    assert cloud_tokens(fast_p) <= cloud_tokens(slow_p)


@settings(max_examples=150, deadline=None)
@given(st.data(), st.floats(1.0, 3.0), st.floats(1.0, 3.0), st.floats(0.0, 1.0))
def test_looser_targets_never_cost_more(data: st.DataObject, ttft_x: float, tpot_x: float,
                                        floor_x: float) -> None:
    prof, cls, tg, grid = data.draw(cases())
    strict = explain(cls, prof, tg, grid)
    loose = explain(cls, prof, Targets(tg.ttft_s * ttft_x, tg.max_tpot_s * tpot_x,
                                       tg.quality_floor * floor_x), grid)
    if strict.feasible and strict.settings.mode != "cloud_only":
        assert loose.feasible and loose.occupancy_s <= strict.occupancy_s


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_pure_and_deterministic(data: st.DataObject) -> None:
    prof, cls, tg, grid = data.draw(cases())
    before = (repr(prof), repr(cls), repr(tg), repr(grid))
    first = explain(cls, prof, tg, grid)
    assert explain(cls, prof, tg, grid) == first
    assert plan(cls, prof, tg, grid) == first.settings
    assert (repr(prof), repr(cls), repr(tg), repr(grid)) == before


def linear(intercept: float, per_token: float) -> TimeCurve:
    return TimeCurve(((1.0, intercept + per_token), (2048.0, intercept + 2048 * per_token)))


PROF = Profiles(DeviceProfile(linear(0.02, 0.001), 0.03),  # phone-class: 1k tokens/s prefill
                CloudProfile(linear(0.01, 0.00005), 0.01),
                QualityCurve(((0.2, 0.6), (0.5, 0.9), (0.8, 0.97))))


def test_worked_example() -> None:
    cls = RequestClass((512, 1024), 0.05, 1e8, PROF.device)
    p = explain(cls, PROF, Targets(ttft_s=0.3, max_tpot_s=0.06, quality_floor=0.9))
    s = p.settings
    # gaps are planned within B = 60 - 10 ms (the display's default wake-up allowance)
    assert s.mode == "pd_device" and s.rho == 0.5 and s.pace_s == 0.05 and p.feasible
    k = kept_tokens(1024, 0.5, 32)
    assert k == 512
    # catch-up Tr + D(256) + D(256) + D(N + 1) (the worker's steps: a first chunk, then the
    # hand-over request in 256-token steps; the two later steps cost one token more each, the
    # profile's increment over the cached context plus its smallest step D(1)) must fit into
    # N * pace + B, fewest N
    assert s.n_cloud == math.ceil((3 * 0.02 + 0.001 * (k + 3) + 544 * 48 / 1e8 - 0.05)
                                  / (0.05 - 0.001))
    assert p.occupancy_s == pytest.approx(0.01 + 1024 * 5e-5 + s.n_cloud * 0.01)


def test_short_prompt_runs_on_the_device() -> None:
    cls = RequestClass((8, 64), 0.05, 1e8, PROF.device)
    p = explain(cls, PROF, Targets(0.3, 0.05, 0.9))
    assert p.settings.mode == "device_only" and p.occupancy_s == 0.0 and "device alone" in p.reason


def test_device_only_can_be_excluded() -> None:
    cls = RequestClass((8, 64), 0.05, 1e8, PROF.device)
    p = explain(cls, PROF, Targets(0.3, 0.05, 0.9), Grid(allow_device_only=False))
    assert p.settings.mode == "pd_device" and p.feasible and p.occupancy_s > 0.0


def test_slow_cloud_falls_back_to_device_with_reason() -> None:
    cls = RequestClass((1024, 2048), 1.0, 1e6, PROF.device)
    p = explain(cls, PROF, Targets(0.3, 0.05, 0.9))
    assert p.settings.mode == "device_only" and not p.feasible and "cloud TTFT" in p.reason


def test_slow_device_decode_falls_back_to_cloud_with_reason() -> None:
    cls = RequestClass((1024, 2048), 0.01, math.inf, PROF.device.scaled(3.0))
    p = explain(cls, PROF, Targets(0.5, 0.05, 0.9))
    assert p.settings.mode == "cloud_only" and p.feasible and "decode step" in p.reason
    assert p.occupancy_s == math.inf


def test_device_that_never_catches_up_falls_back_to_cloud() -> None:
    slow_prefill = DeviceProfile(linear(0.0, 0.06), 0.01)  # prefill slower than max TPOT/token
    cls = RequestClass((1024, 2048), 0.01, math.inf, slow_prefill)
    p = explain(cls, PROF, Targets(0.5, 0.05, 0.0))
    assert p.settings.mode == "cloud_only" and "catch up" in p.reason


def test_simulator_latency_model_as_profiles() -> None:
    """The simulator's fitted models (pd_serve.sim.latency) sampled into planner profiles."""
    from pd_serve.sim.latency import DecodeModel, PrefillModel

    dev_pre = PrefillModel(0.0037, 0.00054, 0.00011, 1.26e-7, padded=True)
    dev_dec = DecodeModel(0.0034, 0.00022, 2.6e-6, padded=True)
    cloud_pre = PrefillModel(0.001, 0.0001, 0.00001, 1e-8, padded=True)
    lengths = [16, 64, 256, 512, 1024, 2048]
    prof = Profiles(
        DeviceProfile(TimeCurve.sample(lambda n: dev_pre.time_of([(0, n)]), lengths),
                      dev_dec.time_of([512])),
        CloudProfile(TimeCurve.sample(lambda n: cloud_pre.time_of([(0, n)]), lengths), 0.004))
    plans = [explain(RequestClass((lo, hi), 0.02, 5e7, prof.device.scaled(f)), prof,
                     Targets(0.1, 0.03, 1.0))  # gaps planned within 30 - 10 ms
             for lo, hi in [(1, 64), (65, 512), (513, 2048)] for f in (1.0, 4.0)]
    assert [p.settings.mode for p in plans] == ["device_only"] * 3 + ["pd_device"] * 3
    assert all(p.feasible and p.settings.rho == 1.0 for p in plans)
    assert 0 < plans[4].settings.n_cloud < plans[5].settings.n_cloud


def test_time_curve_is_monotone_and_extrapolates() -> None:
    c = TimeCurve(((10.0, 1.0), (20.0, 0.5), (30.0, 2.0)))
    assert c(5) == 1.0 and c(20) == 1.0 and c(25) == 1.5 and c(40) == 3.0
    assert c.scaled(2.0)(25) == 3.0
    with pytest.raises(ValueError, match="strictly increasing"):
        TimeCurve(((2.0, 1.0), (2.0, 2.0)))
    with pytest.raises(ValueError, match="finite"):
        TimeCurve(((1.0, -1.0),))


def test_quality_curve_always_holds_full_prompt() -> None:
    q = QualityCurve(((0.5, 0.8), (1.0, 0.7)))
    # a step function: a rho between measured points gets the one below (never more than
    # was measured for less prompt)
    assert q(1.0) == 1.0 and q(0.75) == 0.8 and q(0.5) == 0.8 and q(0.99) == 0.8
    assert q(0.1) == 0.0 and QualityCurve()(0.99) == 0.0  # unmeasured refinement: no quality
    with pytest.raises(ValueError, match="rho must be in"):
        QualityCurve(((1.5, 0.5),))


def test_catchup_steps_follow_the_worker() -> None:
    """The chunks the runtime ran in the first CPU evaluation's trace (refined prompt K, N):
    a block-aligned first chunk while cloud tokens were expected, then the hand-over."""
    assert catchup_steps(423, 3, 256, 16) == [256, 171]
    assert catchup_steps(231, 1, 256, 16) == [224, 9]
    assert catchup_steps(337, 2, 256, 16) == [256, 84]
    assert catchup_steps(100, 0, 256, 16) == [101]  # N = 0: hand over at once
    assert catchup_steps(600, 0, 256, 16) == [256, 256, 89]
    for k, n in ((1, 0), (5, 3), (15, 1), (700, 9)):
        assert catchup_steps(k, n, 256, 16) == worker_steps(k, n, 256)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="prompt_len_band"):
        RequestClass((10, 5), 0.0, 1e6, PROF.device)
    with pytest.raises(ValueError, match="bandwidth_bps"):
        RequestClass((1, 5), 0.0, 0.0, PROF.device)
    with pytest.raises(ValueError, match="quality_floor"):
        Targets(1.0, 0.05, 1.5)
    with pytest.raises(ValueError, match="ttft_s"):
        Targets(0.0, 0.05, 0.5)
    with pytest.raises(ValueError, match="include 1.0"):
        Grid(rhos=(0.5,))
    with pytest.raises(TypeError, match="decode_step_s"):
        DeviceProfile(linear(0.0, 0.001), "fast")  # type: ignore[arg-type]


def test_profiles_json_round_trip(tmp_path: Path) -> None:
    prof = Profiles(PROF.device, PROF.cloud, PROF.quality, {"machine": "test"})
    prof.save(tmp_path / "p.json")
    back = Profiles.load(tmp_path / "p.json")
    assert back == prof and back.provenance == {"machine": "test"}
    (tmp_path / "bad.json").write_text('{"version": 1, "device": {}}')
    with pytest.raises(ValueError, match="bad.json"):
        Profiles.load(tmp_path / "bad.json")
