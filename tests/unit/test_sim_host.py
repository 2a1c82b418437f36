"""Shared hosts in the simulator (pd_serve.sim.host): hand-worked timings of steps that are
overlapped for part of their length, factors of 1 giving the timings of no host exactly, and
work conservation (each step's work, integrated over the stretch timeline the host logged, is
what the latency model asked for)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pd_serve.bench.traces import TraceRequest
from pd_serve.sim import host as host_mod
from pd_serve.sim.config import GatewaySpec, HostSpec, InstanceSpec, ScenarioSpec, SimConfig
from pd_serve.sim.decode import SimDecode
from pd_serve.sim.engine import PrefillWork
from pd_serve.sim.latency import DecodeModel, HandoffModel, LatencyProfile, PrefillModel
from pd_serve.sim.prefill import SimPrefill
from pd_serve.sim.run import simulate

# prefill steps of 1 s, decode steps of 0.1 s, instant hand-offs: easy to work by hand
FLAT = LatencyProfile(PrefillModel(1.0, 0.0, 0.0, 0.0), DecodeModel(0.1, 0.0, 0.0),
                      HandoffModel(0.0, 1e30), 1)
# a profile whose step times depend on batch and context (for the properties)
SHAPED = LatencyProfile(PrefillModel(0.004, 0.001, 1e-4, 1e-8), DecodeModel(0.01, 5e-4, 1e-6),
                        HandoffModel(0.002, 1e9), 6144)


def _cfg(host: HostSpec | None, n_p: int = 1, n_d: int = 1, rtt: float = 0.0) -> SimConfig:
    return SimConfig((ScenarioSpec("default", n_p, n_d),), instance=InstanceSpec(),
                     gateway=GatewaySpec(rtt_s=rtt), host=host)


def _records(trace: list[TraceRequest], cfg: SimConfig, prof: LatencyProfile,
             ) -> list[dict[str, Any]]:
    return list(simulate(trace, cfg, prof).recorder.records())


def test_decode_overlapped_half_way_by_a_prefill() -> None:
    # A: prefill 0..1 alone; decode of its 2 steps (0.2 s of work) from 1.0. B arrives at 1.05:
    # its prefill overlaps decode, so decode runs at 1/3 (0.05 done, 0.15 left -> ends 1.5) and
    # the prefill at 1/2 until 1.5 (0.225 done), then alone (0.775 left -> ends 2.275)
    trace = [TraceRequest(0.0, 10, 3), TraceRequest(1.05, 10, 2)]
    a, b = _records(trace, _cfg(HostSpec(2, 2.0, 3.0)), FLAT)
    assert a["first_token_s"] == pytest.approx(1.0, abs=1e-12)
    assert a["end_s"] == pytest.approx(1.5, abs=1e-12)
    assert b["first_token_s"] == pytest.approx(2.275, abs=1e-12)
    assert b["end_s"] == pytest.approx(2.375, abs=1e-12)  # its decode step alone


def test_prefill_ends_first_and_decode_speeds_up_again() -> None:
    # A decodes 10 steps (1.0 s of work) from 1.0; B's one-token prefill (1.0 s) starts at 1.2:
    # decode 0.2 done alone, then both slowed: the prefill ends at 1.2 + 2 * 1.0 = 3.2, decode
    # has then done 0.2 + 2.0 / 3 and finishes the rest alone
    trace = [TraceRequest(0.0, 10, 11), TraceRequest(1.2, 10, 1)]
    a, b = _records(trace, _cfg(HostSpec(2, 2.0, 3.0)), FLAT)
    assert b["first_token_s"] == pytest.approx(3.2, abs=1e-12)
    assert b["end_s"] == pytest.approx(3.2, abs=1e-12)
    assert a["end_s"] == pytest.approx(3.2 + (1.0 - 0.2 - 2.0 / 3), abs=1e-12)


def test_first_token_delay_only_while_a_neighbour_computes() -> None:
    # A's prefill ends alone (no delay); B's ends at 3.2 while A decodes (delayed)
    trace = [TraceRequest(0.0, 10, 11), TraceRequest(1.2, 10, 1)]
    a, b = _records(trace, _cfg(HostSpec(2, 2.0, 3.0, 0.005)), FLAT)
    assert a["first_token_s"] == pytest.approx(1.0, abs=1e-12)
    assert b["first_token_s"] == pytest.approx(3.205, abs=1e-12)
    assert b["end_s"] == pytest.approx(3.205, abs=1e-12)
    assert a["end_s"] == pytest.approx(3.2 + (1.0 - 0.2 - 2.0 / 3), abs=1e-12)


def test_separate_hosts_do_not_interact() -> None:
    trace = [TraceRequest(0.0, 10, 3), TraceRequest(1.05, 10, 2)]
    assert _records(trace, _cfg(HostSpec(1, 2.0, 3.0)), FLAT) == _records(trace, _cfg(None), FLAT)


def test_host_spec_and_mode_are_checked() -> None:
    with pytest.raises(ValueError, match="host.size"):
        HostSpec(0)
    with pytest.raises(ValueError, match="host.prefill_factor"):
        HostSpec(2, 0.9)
    with pytest.raises(ValueError, match="host.first_token_delay_s"):
        HostSpec(2, 1.0, 1.0, -0.001)
    with pytest.raises(ValueError, match="disaggregated"):
        SimConfig((ScenarioSpec("default", 1, 1),), mode="aggregated", host=HostSpec())


_traces = st.lists(st.tuples(st.floats(0.0, 0.3), st.integers(1, 1500), st.integers(1, 60)),
                   min_size=1, max_size=14).map(
    lambda rows: [TraceRequest(t, n, o) for t, n, o in
                  zip(sorted(r[0] for r in rows), (r[1] for r in rows), (r[2] for r in rows))])
_groups = st.sampled_from([(1, 1, 2), (2, 1, 3), (1, 2, 3), (2, 2, 2), (2, 2, 4)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=_traces, groups=_groups)
def test_factors_of_one_give_the_timings_of_no_host_exactly(
        trace: list[TraceRequest], groups: tuple[int, int, int]) -> None:
    n_p, n_d, size = groups
    plain = _records(trace, _cfg(None, n_p, n_d, 0.002), SHAPED)
    assert _records(trace, _cfg(HostSpec(size), n_p, n_d, 0.002), SHAPED) == plain


class _Log:
    """Each host's busy states after every change, and every step's (start, end, work)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.states: dict[str, list[tuple[float, dict[str, bool], float]]] = defaultdict(list)
        self.steps: list[tuple[str, float, float, float]] = []
        self.open: dict[str, tuple[float, float]] = {}  # prefill name -> (start, work)
        self.seg_start: dict[str, float] = {}  # decode name -> real start of the segment
        log = self
        changed, duration = host_mod.Host.changed, PrefillWork.duration
        hosted, done = SimPrefill._hosted_step, SimPrefill._step_done
        fetched, tick = SimDecode._fetched, SimDecode._tick

        def changed_(host: host_mod.Host, who: host_mod.WorkClock) -> None:
            changed(host, who)
            busy = {c.name: c.busy for c in host.clocks}
            for c in host.clocks:
                log.states[c.name].append((host.loop.now, busy, c.factor))

        def duration_(work: PrefillWork, chunks: Any) -> float:
            log.last_work = duration(work, chunks)
            return log.last_work

        def hosted_(p: SimPrefill, chunks: Any) -> None:
            hosted(p, chunks)
            if chunks is not None:
                log.open[p.name] = (p.loop.now, log.last_work)

        def done_(p: SimPrefill, chunks: Any) -> None:
            start, work = log.open.pop(p.name)
            log.steps.append((p.name, start, p.loop.now, work))
            done(p, chunks)

        def fetched_(d: SimDecode, req: Any) -> None:
            if d.run.size == 0 and not d.scheduled:
                log.seg_start[d.name] = d.loop.now
            fetched(d, req)

        def tick_(d: SimDecode, token: int) -> None:
            if token == d.token:
                work = d.run.boundary(d.next_k) - d.run.t0  # the decode model's, not the clock's
                log.steps.append((d.name, log.seg_start[d.name], d.loop.now, work))
                log.seg_start[d.name] = d.loop.now
            tick(d, token)

        self.last_work = 0.0
        for cls, name, fn in ((host_mod.Host, "changed", changed_),
                              (PrefillWork, "duration", duration_),
                              (SimPrefill, "_hosted_step", hosted_),
                              (SimPrefill, "_step_done", done_), (SimDecode, "_fetched", fetched_),
                              (SimDecode, "_tick", tick_)):
            monkeypatch.setattr(cls, name, fn)

    def work_between(self, name: str, start: float, end: float) -> float:
        """The integral of 1 / stretch over [start, end] from the logged busy states."""
        total, t, stretch = 0.0, start, 1.0
        for when, busy, factor in self.states[name]:
            k = sum(1 for n, b in busy.items() if b and n != name)
            if when <= start:
                stretch = 1.0 + (factor - 1.0) * k
                continue
            if when >= end:
                break
            total += (when - t) / stretch
            t, stretch = when, 1.0 + (factor - 1.0) * k
        return total + (end - t) / stretch


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(trace=_traces, groups=_groups, f_p=st.floats(1.0, 4.0), f_d=st.floats(1.0, 4.0))
def test_every_step_gets_exactly_its_work(
        monkeypatch: pytest.MonkeyPatch, trace: list[TraceRequest], groups: tuple[int, int, int],
        f_p: float, f_d: float) -> None:
    n_p, n_d, size = groups
    with monkeypatch.context() as mp:
        log = _Log(mp)
        recs = _records(trace, _cfg(HostSpec(size, f_p, f_d), n_p, n_d, 0.002), SHAPED)
    assert len(recs) == len(trace) and log.steps and not log.open
    for name, start, end, work in log.steps:
        assert end >= start
        got = log.work_between(name, start, end)
        assert got == pytest.approx(work, rel=1e-9, abs=1e-12), (name, start, end)
