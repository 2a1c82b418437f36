"""Scenario tagging and merging (pd_serve.bench.tagging): prefix families on Mooncake, files on
merged traces, clients on ServeGen; tagging always partitions the trace (every request in exactly
one scenario) and the summary adds up, including the infinite-cache prefix hit ratio."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.bench.tagging import merge_traces, prefix_hits, scenario_summary, tag_scenarios
from pd_serve.bench.trace_formats import load_trace
from pd_serve.bench.traces import Trace, TraceRequest

TRACES = Path(__file__).parents[3] / "shared" / "traces"
real = pytest.mark.skipif(not TRACES.is_dir(), reason=f"no shared traces at {TRACES}")
AZURE = TRACES / "azure_llm_2023"


@real
def test_mooncake_prefix_families() -> None:
    t = load_trace(TRACES / "mooncake" / "conversation_trace.jsonl")
    hits = prefix_hits(t)  # README: infinite-cache hit ratio 0.374 of prompt tokens
    assert sum(hits) / sum(r.input_len for r in t.requests) == pytest.approx(0.374, abs=5e-4)
    tagged, summary = tag_scenarios(t)
    assert "k=2" in tagged.notes[-1] and "7373 key(s), largest 43, 27, 25" in tagged.notes[-1]
    assert list(summary)[:2] == ["other", "prefix-0-7402"] and len(summary) == 9
    assert summary["prefix-0-7402"]["requests"] == 43 and summary["other"]["keys"] == 7365
    assert sum(row["requests"] for row in summary.values()) == len(t) == 12031
    overall = sum(row["prefix_hit_ratio"] * row["mean_input"] * row["requests"]
                  for row in summary.values()) / sum(r.input_len for r in t.requests)
    assert overall == pytest.approx(0.374, abs=5e-4)
    one, summary1 = tag_scenarios(t, k=1)  # every request starts with hash id 0
    assert list(summary1) == ["prefix-0"] and summary1["prefix-0"]["share"] == 1.0


@real
def test_merged_azure_traces_tag_by_file() -> None:
    code = load_trace(AZURE / "AzureLLMInferenceTrace_code.csv", limit=300)
    conv = load_trace(AZURE / "AzureLLMInferenceTrace_conv.csv", limit=300)
    merged = merge_traces([code, conv])
    assert len(merged) == 600 and merged.timed and merged.fmt == "azure"
    arrivals = [r.arrival_s for r in merged.requests]
    assert arrivals == sorted(arrivals)
    assert {r.scenario for r in merged.requests} == {code.name, conv.name}
    tagged, summary = tag_scenarios(merged)  # by source: file stems minus their common prefix
    assert set(summary) == {"code", "conv"} and summary["code"]["requests"] == 300
    by_name = merge_traces([code, conv], names=["c", "v"])
    assert [r.scenario for r in by_name.requests] == [
        {"code": "c", "conv": "v"}[r.scenario] for r in tagged.requests]


@real
def test_servegen_by_client_top_n() -> None:
    t = load_trace(TRACES / "servegen" / "reason" / "deepseek-r1", clients=[1, 35, 48, 60],
                   duration_s=600)
    tagged, summary = tag_scenarios(t, top_n=2)
    assert set(summary) == {"client-35", "client-48", "other"}
    assert summary["other"]["keys"] == len({r.scenario for r in t.requests}) - 2
    assert "prefix_hit_ratio" not in summary["other"]


def test_merge_namespaces_hash_ids_and_checks_kinds() -> None:
    a = Trace("a", (TraceRequest(0.0, 10, 1, (0, 1)), TraceRequest(2.0, 10, 1, (0, 2))),
              timed=True, block_size=8)
    b = Trace("b", (TraceRequest(1.0, 10, 1, (0, 1)),), timed=True, block_size=8)
    m = merge_traces([a, b])
    assert [(r.scenario, r.hash_ids) for r in m.requests] == [
        ("a", (0, 1)), ("b", (3, 4)), ("a", (0, 2))]
    assert prefix_hits(m) == [0, 0, 8]
    with pytest.raises(ValueError, match="timed and untimed"):
        merge_traces([a, Trace("u", (TraceRequest(0.0, 1, 1),), timed=False)])
    with pytest.raises(ValueError, match="block sizes"):
        merge_traces([a, Trace("c", b.requests, timed=True, block_size=16)])
    with pytest.raises(ValueError, match="distinct name"):
        merge_traces([a, a])


def test_tagging_errors() -> None:
    plain = Trace("p", (TraceRequest(0.0, 1, 1, source="x.csv:2"),), timed=True)
    with pytest.raises(ValueError, match="no hash ids"):
        tag_scenarios(plain, by="prefix")
    with pytest.raises(ValueError, match="no ServeGen client"):
        tag_scenarios(plain, by="client")
    with pytest.raises(ValueError, match="modes: auto, prefix, source, client"):
        tag_scenarios(plain, by="length")
    with pytest.raises(ValueError, match="'x' is taken"):
        tag_scenarios(plain, other="x")
    assert list(tag_scenarios(plain)[1]) == ["x"]


request = st.builds(
    TraceRequest, st.just(0.0), st.integers(1, 64), st.integers(1, 9),
    st.lists(st.integers(0, 4), min_size=1, max_size=4).map(tuple),
    st.just("default"),
    st.tuples(st.sampled_from(["run_a.csv", "run_b.csv", "chunk-3-trace.csv",
                               "chunk-12-trace.csv"]), st.integers(1, 99)).map(
        lambda fl: f"{fl[0]}:{fl[1]}"))


@settings(max_examples=80, deadline=None)
@given(st.lists(request, min_size=1, max_size=40), st.sampled_from(["prefix", "source", "client"]),
       st.one_of(st.none(), st.integers(1, 5)), st.one_of(st.none(), st.integers(1, 3)))
def test_tagging_partitions_the_trace(reqs: list[TraceRequest], by: str, top_n: int | None,
                                      k: int | None) -> None:
    if by == "client":
        reqs = [replace(r, source=f"chunk-{r.input_len % 5}-trace.csv:1") for r in reqs]
    t = Trace("h", tuple(reqs), timed=False, block_size=16)
    tagged, summary = tag_scenarios(t, by=by, top_n=top_n, k=k)
    assert len(tagged) == len(t)
    for before, after in zip(t.requests, tagged.requests):
        assert after.scenario in summary
        assert (after.input_len, after.output_len, after.hash_ids, after.source) == (
            before.input_len, before.output_len, before.hash_ids, before.source)
    assert sum(row["requests"] for row in summary.values()) == len(t)
    assert sum(row["share"] for row in summary.values()) == pytest.approx(1.0)
    assert top_n is None or len(summary) <= top_n + 1
    base = scenario_summary(tagged)  # tag_scenarios adds `keys` on top of it
    assert all({f: v for f, v in row.items() if f != "keys"} == base[name]
               for name, row in summary.items())
    for row in summary.values():
        assert 0.0 <= row["prefix_hit_ratio"] <= 1.0
