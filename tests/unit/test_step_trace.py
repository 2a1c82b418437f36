"""Step traces: the engine's per-step JSONL (pd_serve.engine.step_trace), written by an
aggregated engine and by both P/D roles, read back with clear errors; step periods, samples in
a time window, profiles refitted from the steps (pd_serve.sim.steps) and
`pd-serve sim profile-steps`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.async_engine import AsyncEngine
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.outputs import RequestOutput
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.engine.step_trace import SCHEMA, StepTrace
from pd_serve.models.tokenizer import Tokenizer
from pd_serve.sim.cli import sim_app
from pd_serve.sim.latency import (
    DecodeModel,
    HandoffModel,
    LatencyProfile,
    PrefillModel,
)
from pd_serve.sim.steps import (
    StepRecord,
    periods,
    profile_from_steps,
    read_step_trace,
    trace_files,
    trace_samples,
)
from tests.fakes import FakeModelRunner
from tests.inprocess_pd import PDPair, patch_runtime, pd_config


def base_profile(padded: bool = False) -> LatencyProfile:
    return LatencyProfile(PrefillModel(0.01, 0.0, 1e-4, 0.0, padded),
                          DecodeModel(0.005, 0.001, 0.0, padded),
                          HandoffModel(0.001, 1e9), 1024, {"backend": "torch", "model": "m"})


def write_trace(path: Path, steps: list[dict[str, Any]], role: str = "decode") -> Path:
    lines = [{"schema": SCHEMA, "role": role, "pid": 1, "started": 0.0}, *steps]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# ----- the writer -----------------------------------------------------------------------------

def test_writer_round_trip_and_flush_on_close(tmp_path: Path) -> None:
    tr = StepTrace.in_dir(tmp_path / "t", "prefill")
    tr.record(100.0, 0.02, True, ("prefill", [[0, 12], [4, 3]]))
    tr.record(100.03, 0.004, False, ("decode", [13, 8]))
    tr.close()
    tr.record(101.0, 0.004, False, ("decode", [14]))  # after close: dropped, no error
    (path,) = trace_files([tmp_path / "t"])
    assert path.name.startswith("steps-prefill-")
    header, steps = read_step_trace(path)
    assert header["role"] == "prefill" and header["schema"] == SCHEMA
    assert steps == [StepRecord(100.0, 0.02, True, "prefill", ((0, 12), (4, 3))),
                     StepRecord(100.03, 0.004, False, "decode", (13, 8))]


def test_a_write_error_stops_the_trace_without_raising(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    tr = StepTrace(tmp_path / "s.jsonl", "decode")
    assert tr._f is not None
    tr._f.close()  # the next write fails as a full disk would
    tr.record(1.0, 0.01, False, ("decode", [3]))
    tr.record(2.0, 0.01, False, ("decode", [4]))
    tr.close()
    assert tr._f is None
    assert sum("writing failed" in r.message for r in caplog.records) == 1


# ----- reading --------------------------------------------------------------------------------

def test_bad_lines_name_file_and_line(tmp_path: Path) -> None:
    ok = {"t": 1.0, "s": 0.01, "idle": True, "kind": "decode", "ctx": [5]}
    p = write_trace(tmp_path / "a.jsonl", [ok, {"t": 2.0}, ok])
    with pytest.raises(ValueError, match=r"a\.jsonl:3: bad step record"):
        read_step_trace(p)
    p.write_text(p.read_text().replace('{"t": 2.0}', "{nope"))
    with pytest.raises(ValueError, match=r"a\.jsonl:3: not JSON"):
        read_step_trace(p)
    bad_kind = write_trace(tmp_path / "b.jsonl", [{**ok, "kind": "mixed"}])
    with pytest.raises(ValueError, match=r"b\.jsonl:2: .*unknown kind 'mixed'"):
        read_step_trace(bad_kind)
    zero = write_trace(tmp_path / "c.jsonl", [{**ok, "s": 0}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: .*non-positive"):
        read_step_trace(zero)
    (tmp_path / "d.jsonl").write_text('{"t": 1}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: not a step trace"):
        read_step_trace(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="cannot read"):
        read_step_trace(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no such step trace"):
        trace_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no step traces"):
        trace_files([tmp_path / "empty"])


def test_a_cut_last_line_and_a_restart_header_are_skipped(tmp_path: Path) -> None:
    ok = {"t": 1.0, "s": 0.01, "idle": True, "kind": "decode", "ctx": [5]}
    p = write_trace(tmp_path / "a.jsonl", [ok, {"schema": SCHEMA, "role": "decode"}, ok])
    p.write_text(p.read_text() + '{"t": 3.0, "s": 0.0')  # killed mid-write
    _, steps = read_step_trace(p)
    assert len(steps) == 2


# ----- periods, windows, fits -----------------------------------------------------------------

def rec(t: float, s: float, idle: bool, kind: str = "decode",
        shape: tuple[Any, ...] = (10,)) -> StepRecord:
    return StepRecord(t, s, idle, kind, shape)


def test_periods_run_to_the_next_start_unless_the_engine_waited() -> None:
    steps = [rec(0.0, 0.004, True), rec(0.005, 0.004, False), rec(0.0112, 0.003, False),
             rec(5.0, 0.004, True)]
    assert periods(steps) == pytest.approx([0.005, 0.0062, 0.003, 0.004])
    pre, dec = trace_samples([steps], since=0.001, until=5.0)
    assert [d.seconds for d in dec] == pytest.approx([0.0062, 0.003])
    _, own = trace_samples([steps], use_period=False)
    assert [d.seconds for d in own] == [0.004, 0.004, 0.003, 0.004]
    assert pre == []


def synthetic_steps(prof: LatencyProfile, gap: float = 0.0) -> list[dict[str, Any]]:
    """Steps timed exactly by `prof` (plus `gap` of engine-thread work between steps)."""
    out, t = [], 1000.0
    for i in range(12):
        chunks = [[0, 20 + 37 * i]] + ([[16, 5 + 3 * i]] if i % 3 else [])
        s = prof.prefill.time_of([tuple(c) for c in chunks])
        out.append({"t": t, "s": s, "idle": i % 4 == 0, "kind": "prefill", "chunks": chunks})
        t += s + gap
    for i in range(30):
        ctx = [40 + 7 * i + j for j in range(1 + i % 9)]
        s = prof.decode.time_of(ctx)
        out.append({"t": t, "s": s, "idle": False, "kind": "decode", "ctx": ctx})
        t += s + gap
    out.append({"t": t + 9.0, "s": prof.decode.time_of([3]), "idle": True, "kind": "decode",
                "ctx": [3]})
    return out


def test_profile_from_steps_recovers_the_models(tmp_path: Path) -> None:
    truth = LatencyProfile(PrefillModel(0.02, 0.003, 2e-4, 1e-7), DecodeModel(0.004, 0.0015, 2e-6),
                           HandoffModel(0.001, 1e9), 1024)
    path = write_trace(tmp_path / "steps-x-1.jsonl", synthetic_steps(truth))
    base = base_profile()
    fit = profile_from_steps([path], base, use_period=False)
    assert fit.prefill.per_token_s == pytest.approx(2e-4, rel=1e-6)
    assert fit.prefill.intercept_s == pytest.approx(0.02, rel=1e-6)
    assert fit.decode.per_seq_s == pytest.approx(0.0015, rel=1e-6)
    assert fit.decode.per_context_s == pytest.approx(2e-6, rel=1e-6)
    assert fit.handoff == base.handoff and fit.kv_bytes_per_token == base.kv_bytes_per_token
    assert fit.provenance["steps"] == {"prefill": 12, "decode": 31}
    # the periods add the engine thread's work between steps: 1 ms more per step, except
    # where the next step follows a wait (its own time) and the step before a wait
    slow = write_trace(tmp_path / "steps-y-1.jsonl", synthetic_steps(truth, gap=0.001))
    pfit = profile_from_steps([slow], base, until=1e9)
    assert pfit.decode.time(4, 400) == pytest.approx(truth.decode.time(4, 400) + 0.001,
                                                     rel=0.02)
    # a round trip through the saved JSON
    pfit.save(tmp_path / "p.json")
    assert LatencyProfile.load(tmp_path / "p.json").decode == pfit.decode


def test_fitted_models_add_up_to_the_steps_total_time(tmp_path: Path) -> None:
    """A slow tail (every tenth step three times as long) barely moves a relative-error fit;
    the models are scaled so that they add up to the samples' total, the busy time."""
    truth = base_profile()
    steps = synthetic_steps(truth)
    for i, st in enumerate(steps):
        if i % 10 == 0:
            st["s"] *= 3
    path = write_trace(tmp_path / "s.jsonl", steps)
    fit = profile_from_steps([path], truth, use_period=False)
    _, recs = read_step_trace(path)
    for kind, model in (("prefill", fit.prefill), ("decode", fit.decode)):
        mine = [r for r in recs if r.kind == kind]
        total = sum(model.time_of(r.shape) for r in mine)
        assert total == pytest.approx(sum(r.s for r in mine), rel=1e-9)
        assert fit.provenance["total_scale"][kind] > 1.05


def test_too_few_steps_in_the_window_is_a_clear_error(tmp_path: Path) -> None:
    truth = base_profile()
    path = write_trace(tmp_path / "s.jsonl", synthetic_steps(truth))
    with pytest.raises(ValueError, match="0 prefill and 0 decode steps"):
        profile_from_steps([path], truth, since=5000.0)


def test_profile_steps_cli(tmp_path: Path) -> None:
    truth = base_profile()
    write_trace(tmp_path / "steps-decode-7.jsonl", synthetic_steps(truth))
    truth.save(tmp_path / "base.json")
    cli = CliRunner()
    res = cli.invoke(sim_app, ["profile-steps", str(tmp_path), "--base",
                               str(tmp_path / "base.json"), "--out", str(tmp_path / "o.json")])
    assert res.exit_code == 0, res.output
    assert LatencyProfile.load(tmp_path / "o.json").provenance["timing"] == "period"
    res = cli.invoke(sim_app, ["profile-steps", str(tmp_path / "nope"), "--base",
                               str(tmp_path / "base.json"), "--out", str(tmp_path / "o.json")])
    assert res.exit_code == 2 and "no such step trace" in res.output


# ----- the engine writes it -------------------------------------------------------------------

def test_the_async_engine_traces_every_step(tmp_path: Path, demo_model_dir: Any) -> None:
    runner = FakeModelRunner(block_size=4, num_blocks=64)
    engine = LLMEngine(runner, Tokenizer(demo_model_dir), CacheConfig(block_size=4, num_blocks=64),
                       SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8))
    ae = AsyncEngine(engine, StepTrace.in_dir(tmp_path, "aggregated"))
    ae.start()
    try:
        async def main() -> list[list[RequestOutput]]:
            params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
            return await asyncio.gather(*(
                _all(ae.generate(f"g{i}", p, params))
                for i, p in enumerate([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])))

        outs = asyncio.run(asyncio.wait_for(main(), timeout=30))
    finally:
        ae.stop()
    engine.leak_check()
    assert sum(len(o.new_token_ids) for r in outs for o in r) == 10
    header, steps = read_step_trace(trace_files([tmp_path])[0])
    assert header["role"] == "aggregated" and steps[0].idle
    prefill_tokens = sum(n for st in steps if st.kind == "prefill" for _, n in st.shape)
    assert prefill_tokens == 13  # chunked at 8 tokens a step: every prompt token once
    assert all(p + n <= 10 for st in steps if st.kind == "prefill" for p, n in st.shape)
    # 2 requests x 4 tokens after the first, each attending over its prompt and the tokens
    # before it
    contexts = sorted(c for st in steps if st.kind == "decode" for c in st.shape)
    assert contexts == [4, 5, 6, 7, 11, 12, 13, 14]
    assert all(st.s > 0 for st in steps) and steps == sorted(steps, key=lambda s: s.t)


async def _all(agen: Any) -> list[RequestOutput]:
    return [o async for o in agen]


def test_prefill_and_decode_instances_trace_their_steps(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """`server.step_trace_dir`: each role's engine writes its own file (the in-process P/D
    pair of tests/inprocess_pd.py, real Instance and Runtime.build); `close` leak-checks."""
    wire = patch_runtime(monkeypatch)
    base = pd_config()
    cfg = replace(base, server=replace(base.server, step_trace_dir=str(tmp_path)))
    prompt = list(range(10, 24))

    async def main() -> list[Any]:
        pair = await PDPair.start(wire, cfg)
        try:
            return await pair.run_request("r1", prompt, 6)
        finally:
            await pair.close()

    events = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert events[-1][0] != "error"
    by_role = {read_step_trace(f)[0]["role"]: read_step_trace(f)[1]
               for f in trace_files([tmp_path])}
    assert set(by_role) == {"prefill", "decode"}
    assert [(st.kind, st.shape) for st in by_role["prefill"]] == [("prefill", ((0, 14),))]
    # the first token came from prefill; decode computes the other five, one context longer
    # each step
    assert [(st.kind, st.shape) for st in by_role["decode"]] == [
        ("decode", (c,)) for c in range(15, 20)]
