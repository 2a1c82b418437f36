"""The profiler's pure parts: workload validation, default batch lists, the per-instance burst
makespans that give T_p, the effective batch (time-averaged overlap) that keys TPOT, and the
whole measurement against a fake gateway with exact latencies (serialised prefill included)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import pytest

from pd_serve.orchestrator import perf_model as pm
from pd_serve.orchestrator.profile_client import Sample
from pd_serve.orchestrator.profiler import (
    ProfileWorkload,
    default_batches,
    effective_batches,
    measure,
    monotone,
    prefill_makespans,
)


def test_default_batches() -> None:
    assert default_batches(1) == (1,)
    assert default_batches(4) == (1, 2, 4)
    assert default_batches(6) == (1, 2, 4, 6)


def test_effective_batches() -> None:
    assert effective_batches([(0.0, 1.0)]) == [1.0]
    assert effective_batches([(0.0, 1.0)] * 3) == [3.0, 3.0, 3.0]
    assert effective_batches([(0.0, 1.0), (0.5, 1.5)]) == [1.5, 1.5]
    assert effective_batches([(0.0, 1.0), (2.0, 3.0)]) == [1.0, 1.0]
    assert effective_batches([(0.5, 0.5), (0.0, 1.0)]) == [2.0, 1.0]  # an instant span


@pytest.mark.parametrize(("kw", "field"), [
    ({"output_tokens": 2}, "output_tokens"),
    ({"prompt_tokens": 8, "prefix_tokens": 8}, "prefix_tokens"),
    ({"prefix_tokens": -1}, "prefix_tokens"),
    ({"b_p": 0}, "b_p"),
    ({"b_d": True}, "b_d"),
    ({"repeats": 0}, "repeats"),
    ({"timeout_s": 0.0}, "timeout_s"),
])
def test_bad_workload_names_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        ProfileWorkload(**kw)  # type: ignore[arg-type]


class FakeProbe:
    """A gateway with one prefill and one decode instance and exact latencies. The prefill
    instance serialises a burst (chunked prefill of long prompts): its i-th request (from 1)
    gets its first token i*UNIT s after the burst (half that for a prompt whose first tokens
    an earlier burst sent: a prefix hit), so the burst's makespan is n*UNIT. Decode hands off
    in XI s and runs at 0.01*n s per token, starting XI after the burst's last first token
    (`together`, so the burst decodes as one batch) or after the request's own."""

    XI = 0.05

    def __init__(self, unit: float = 0.1, together: bool = True) -> None:
        self.unit, self.together = unit, together
        self.seen: set[tuple[int, ...]] = set()
        self.bursts: list[tuple[int, int]] = []
        self.clock = 0.0

    async def max_model_len(self) -> int:
        return 2048

    async def burst(self, prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        n, t0 = len(prompts), self.clock
        self.bursts.append((n, max_tokens))
        firsts = [t0 + self.unit * i * (0.5 if tuple(p[:8]) in self.seen else 1.0)
                  for i, p in enumerate(prompts, 1)]
        out = []
        for first in firsts:
            start = (max(firsts) if self.together else first) + self.XI
            tokens = [(first, 1)] + [(start + 0.01 * n * k, 1 + k)
                                     for k in range(1, max_tokens)]
            out.append(Sample("http://p0", first - t0, t0 + 0.001, first,
                              "http://d0" if max_tokens > 1 else None, tuple(tokens)))
        self.seen |= {tuple(p[:8]) for p in prompts}
        self.clock = max(s.tokens[-1][0] for s in out) + 1.0
        return out


def _sample(instance: str, arrived: float, first: float) -> Sample:
    return Sample(instance, first - arrived, arrived + 0.001, first, None, ((first, 1),))


def test_prefill_makespans_per_instance() -> None:
    # a serialised burst of 4: the first tokens come one by one; T_p(4) is the last, not 0.4
    burst = [_sample("p0", 0.0, t) for t in (0.4, 0.8, 1.2, 1.6)]
    assert prefill_makespans(burst) == [(4, pytest.approx(1.6))]
    # a burst split over two instances: one makespan each, keyed by the requests each took
    burst = [_sample("p0", 0.0, 0.3), _sample("p1", 0.1, 0.5), _sample("p0", 0.2, 0.9)]
    assert sorted(prefill_makespans(burst)) == [(1, pytest.approx(0.4)),
                                                (2, pytest.approx(0.9))]


def test_monotone() -> None:
    assert monotone({4: 0.38, 1: 0.48, 3: 1.55, 2: 0.5}) == {1: 0.48, 2: 0.5, 3: 1.55, 4: 1.55}
    assert monotone({1: 0.1, 2: 0.2}) == {1: 0.1, 2: 0.2}


def test_measure_recovers_the_fake_latencies() -> None:
    fake = FakeProbe()
    w = ProfileWorkload(prompt_tokens=64, prefix_tokens=32, output_tokens=5, b_p=4, b_d=4,
                        repeats=2)
    report = asyncio.run(measure(fake, "chat", w, (1, 2, 4), (1, 4)))
    prof = report.profile
    # makespans (n * UNIT), not the mean TTFT ((n + 1) / 2 * UNIT) nor the first finisher's
    assert dict(prof.ttft_by_batch or {}) == pytest.approx({1: 0.1, 2: 0.2, 4: 0.4})
    assert dict(report.raw_ttft_by_batch) == pytest.approx({1: 0.1, 2: 0.2, 4: 0.4})
    assert dict(prof.tpot_by_batch) == pytest.approx({1: 0.01, 4: 0.04})
    assert prof.xi == pytest.approx(FakeProbe.XI)
    assert prof.r_pre == pytest.approx(0.5)  # warm makespan / cold makespan
    assert pm.t_p(prof) == pytest.approx(0.2)
    assert (prof.G, prof.output_tokens, prof.prompt_tokens) == (4, 5, 64)
    assert report.notes == ()
    assert fake.bursts == [(1, 5), (1, 1), (1, 1), (2, 1), (2, 1), (4, 1), (4, 1), (1, 5),
                           (4, 5), (4, 1), (1, 1), (1, 1), (2, 1), (2, 1), (4, 1), (4, 1)]
    back = json.loads(json.dumps(report.to_dict()))
    assert pm.ScenarioProfile.from_dict(back["profile"]) == prof
    assert back["notes"] == []
    assert back["raw_ttft_by_batch"] == pytest.approx({"1": 0.1, "2": 0.2, "4": 0.4})


def test_serialised_long_prompts_give_the_burst_makespan() -> None:
    """The benchmark's bug: an engine prefilling 1,300-token prompts one at a time returned a
    burst of 4's first tokens at 0.4, 0.8, 1.2, 1.6 s and T_p(4) came out 0.4 s (the first
    finisher, keyed as batch 4). T_p(b) is the burst's makespan; and since the requests then
    reach decode one by one, decode never batches: the notes say TPOT(b_d) is clamped."""
    w = ProfileWorkload(prompt_tokens=1300, output_tokens=5, b_p=4, b_d=4, repeats=2)
    report = asyncio.run(measure(FakeProbe(unit=0.4, together=False), "long", w, (1, 2, 3, 4),
                                 (1, 4)))
    prof = report.profile
    assert dict(prof.ttft_by_batch or {}) == pytest.approx({1: 0.4, 2: 0.8, 3: 1.2, 4: 1.6})
    assert pm.t_p(prof) == pytest.approx(1.6)
    assert pm.prefill_capacity(prof, 1) == pytest.approx(4 / 1.6)
    assert list(prof.tpot_by_batch) == [1]  # the decode spans never overlap
    assert len(report.notes) == 1 and "b_d=4" in report.notes[0]
    assert "decode capacity is overstated" in report.notes[0]


class NoisyProbe(FakeProbe):
    """FakeProbe whose bursts of 4 finish early (the benchmark's non-monotone table)."""

    async def burst(self, prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        out = await super().burst(prompts, max_tokens)
        if len(prompts) != 4 or max_tokens != 1:
            return out
        return [dataclasses.replace(s, ttft=s.ttft / 4, first_token_at=s.arrived_at + s.ttft / 4)
                for s in out]


def test_non_monotone_makespans_are_noted_and_raised(caplog: pytest.LogCaptureFixture) -> None:
    w = ProfileWorkload(prompt_tokens=64, output_tokens=5, b_p=4, b_d=4, repeats=1)
    with caplog.at_level(logging.WARNING, logger="pd_serve.orchestrator.profiler"):
        report = asyncio.run(measure(NoisyProbe(), "chat", w, (1, 2, 3, 4), (1, 4)))
    assert dict(report.raw_ttft_by_batch) == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.1})
    assert dict(report.profile.ttft_by_batch or {}) == pytest.approx(
        {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.3})
    assert len(report.notes) == 1 and "not non-decreasing" in report.notes[0]
    assert "batch [4]" in report.notes[0]
    assert report.notes[0] in caplog.text


def test_a_profile_short_of_b_p_is_noted() -> None:
    w = ProfileWorkload(prompt_tokens=64, output_tokens=5, b_p=4, b_d=1, repeats=1)
    report = asyncio.run(measure(FakeProbe(), "chat", w, (1, 2), (1,)))
    assert len(report.notes) == 1 and "b_p=4" in report.notes[0]


def test_measure_refuses_a_workload_over_the_context() -> None:
    w = ProfileWorkload(prompt_tokens=2040, output_tokens=16, b_p=1, b_d=1)
    with pytest.raises(ValueError, match="^prompt_tokens"):
        asyncio.run(measure(FakeProbe(), "chat", w, (1,), (1,)))
