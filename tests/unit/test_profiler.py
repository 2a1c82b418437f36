"""The profiler's pure parts: workload validation, default batch lists, the effective batch
(time-averaged overlap) that keys its measurements, and the whole measurement against a fake
gateway with exact latencies."""

from __future__ import annotations

import asyncio

import pytest

from pd_serve.orchestrator.profile_client import Sample
from pd_serve.orchestrator.profiler import (
    ProfileWorkload,
    default_batches,
    effective_batches,
    measure,
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
    """A gateway with one prefill and one decode instance and exact latencies: a burst of n
    prefills together in 0.1*n s (half that for a prompt whose first tokens an earlier burst
    sent: a prefix hit), hands off in XI s and decodes at 0.01*n s per token."""

    XI = 0.05

    def __init__(self) -> None:
        self.seen: set[tuple[int, ...]] = set()
        self.bursts: list[tuple[int, int]] = []
        self.clock = 0.0

    async def max_model_len(self) -> int:
        return 2048

    async def burst(self, prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        n, t0 = len(prompts), self.clock
        self.bursts.append((n, max_tokens))
        out = []
        for p in prompts:
            ttft = 0.1 * n * (0.5 if tuple(p[:8]) in self.seen else 1.0)
            first = t0 + ttft
            tokens = [(first, 1)] + [(first + self.XI + 0.01 * n * k, 1 + k)
                                     for k in range(1, max_tokens)]
            out.append(Sample("http://p0", ttft, t0, first, "http://d0" if max_tokens > 1
                              else None, tuple(tokens)))
        self.seen |= {tuple(p[:8]) for p in prompts}
        self.clock = max(s.tokens[-1][0] for s in out) + 1.0
        return out


def test_measure_recovers_the_fake_latencies() -> None:
    fake = FakeProbe()
    w = ProfileWorkload(prompt_tokens=64, prefix_tokens=32, output_tokens=5, b_p=4, b_d=4,
                        repeats=2)
    prof = asyncio.run(measure(fake, "chat", w, (1, 2, 4), (1, 4)))
    assert dict(prof.ttft_by_batch or {}) == pytest.approx({1: 0.1, 2: 0.2, 4: 0.4})
    assert dict(prof.tpot_by_batch) == pytest.approx({1: 0.01, 4: 0.04})
    assert prof.xi == pytest.approx(FakeProbe.XI)
    assert prof.r_pre == pytest.approx(0.5)
    assert (prof.G, prof.output_tokens, prof.prompt_tokens) == (4, 5, 64)
    assert fake.bursts == [(1, 5), (1, 1), (1, 1), (2, 1), (2, 1), (4, 1), (4, 1), (1, 5),
                           (4, 5), (4, 1), (1, 1), (1, 1), (2, 1), (2, 1), (4, 1), (4, 1)]


def test_measure_refuses_a_workload_over_the_context() -> None:
    w = ProfileWorkload(prompt_tokens=2040, output_tokens=16, b_p=1, b_d=1)
    with pytest.raises(ValueError, match="^prompt_tokens"):
        asyncio.run(measure(FakeProbe(), "chat", w, (1,), (1,)))
