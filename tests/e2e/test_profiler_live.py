"""The profiler against a real local deployment (decode, prefill and gateway processes, torch
backend, demo model): it measures a sane ScenarioProfile that the planner can use. Only robust
relations are asserted (timings on a small shared machine are noisy): positive latencies, the
structure of the tables (T_p non-decreasing in the batch), exact token counts, a 64x longer
prompt taking longer to prefill, and the note on a profile that stops short of b_p."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from pd_serve.orchestrator import perf_model as pm
from pd_serve.orchestrator.planner import plan_ratio
from pd_serve.orchestrator.profiler import (
    ProfileError,
    ProfileWorkload,
    profile_report,
    profile_scenario,
)
from tests.e2e.pd_cluster import PDCluster

pytestmark = pytest.mark.e2e
B_P = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDCluster]:
    c = PDCluster(tmp_path_factory.mktemp("profiler"), "torch", b_p=B_P)
    try:
        yield c.start()
    finally:
        c.stop()


def _url(c: PDCluster) -> str:
    assert c.frontend is not None
    return c.frontend.url


def test_profile_is_sane_and_plannable(cluster: PDCluster) -> None:
    short = ProfileWorkload(prompt_tokens=16, output_tokens=6, b_p=B_P, b_d=2, repeats=2)
    long = ProfileWorkload(prompt_tokens=1024, prefix_tokens=512, output_tokens=4, b_p=B_P,
                           b_d=1, repeats=2, seed=1)
    p = asyncio.run(profile_scenario(_url(cluster), "default", short))
    report = asyncio.run(profile_report(_url(cluster), "default", long, batches=(1,),
                                        decode_batches=(1,)))
    q = report.profile
    print(json.dumps({"short": p.to_dict(), "long": report.to_dict()}, indent=1))
    # only batch 1 was profiled for b_p = 2: T_p(b_p) is clamped, and the report says so
    assert any(f"b_p={B_P}" in n for n in report.notes)
    for prof, w in ((p, short), (q, long)):
        assert prof.name == "default" and (prof.b_p, prof.b_d) == (w.b_p, w.b_d)
        assert prof.ttft_by_batch and all(1 <= k <= w.b_p for k in prof.ttft_by_batch)
        assert all(v > 0 for v in prof.ttft_by_batch.values())
        tp = list(prof.ttft_by_batch.values())  # makespans, made non-decreasing in the batch
        assert tp == sorted(tp)
        assert prof.tpot_by_batch and all(v > 0 for v in prof.tpot_by_batch.values())
        assert prof.xi >= 0 and 0 < prof.r_pre <= 1
        assert prof.G == w.output_tokens - 1  # ignore_eos: every request ran to max_tokens
        assert prof.output_tokens == w.output_tokens
        assert pm.e2e(prof) > pm.t_p(prof) > 0
        plan = plan_ratio(prof, budget=6)
        assert plan.n_p + plan.n_d == 6 and plan.phi > 0
        assert pm.ScenarioProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    assert p.r_pre == 1.0  # no shared prefix: not measured
    assert p.ttft_by_batch is not None and q.ttft_by_batch is not None
    assert min(q.ttft_by_batch.values()) > max(p.ttft_by_batch.values())


def test_unknown_scenario_and_oversized_workload(cluster: PDCluster) -> None:
    with pytest.raises(ProfileError, match="404"):
        asyncio.run(profile_scenario(_url(cluster), "nope", ProfileWorkload(b_p=1, b_d=1)))
    with pytest.raises(ValueError, match="^prompt_tokens"):
        asyncio.run(profile_scenario(_url(cluster), "default",
                                     ProfileWorkload(prompt_tokens=4000, b_p=1, b_d=1)))
    with pytest.raises(ValueError, match="^batches"):
        asyncio.run(profile_scenario(_url(cluster), "default", ProfileWorkload(b_p=2, b_d=1),
                                     batches=(3,)))
