"""The simulated deployment beyond a fixed group: the real Adjuster reacting to a workload
shift (a spare takes the decode role, or a prefill instance is drained and re-roled), the
planner sizing groups from a latency profile, and the `pd-serve sim` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pd_serve.bench.slo import SLO
from pd_serve.bench.traces import TraceRequest
from pd_serve.config import TTFTBand
from pd_serve.orchestrator.adjuster import AdjusterConfig
from pd_serve.sim.cli import sim_app
from pd_serve.sim.config import AdjustSpec, GatewaySpec, InstanceSpec, ScenarioSpec, SimConfig
from pd_serve.sim.options import gateway_slo, parse_groups, slo_table
from pd_serve.sim.plan import LengthStats, plan_groups
from pd_serve.sim.run import simulate
from tests.unit.test_sim_run import PROFILE

ROOT = Path(__file__).resolve().parents[2]


def _shift_trace() -> list[TraceRequest]:
    """8 req/s; outputs grow from 4 to 120 tokens at t = 80 s (decode becomes the bottleneck)."""
    rng = np.random.default_rng(0)
    t, out = 0.0, []
    while t < 200:
        t += float(rng.exponential(1 / 8))
        out.append(TraceRequest(t, int(rng.integers(100, 400)), 4 if t < 80 else 120))
    return out


@pytest.mark.parametrize(("n_p", "spares", "source"), [(2, 1, "spare"), (3, 0, "reassign")])
def test_adjuster_adds_decode_when_outputs_grow(n_p: int, spares: int, source: str) -> None:
    adjust = AdjustSpec(AdjusterConfig(window_s=5, min_samples=5, hysteresis=2, cooldown_s=20,
                                       min_per_role=1), interval_s=1.0, switch_s=2.0)
    cfg = SimConfig((ScenarioSpec("default", n_p, 2),), spares=spares,
                    gateway=GatewaySpec(0.002), adjust=adjust)
    result = simulate(_shift_trace(), cfg, PROFILE)  # leak checks include the drained one
    first = result.adjustments[0]
    assert (first["action"], first["source"]) == ("add_decode", source)
    assert first["at"] > 80
    assert result.final_groups["default"]["decode"] == 3
    decodes = [i for i in result.instances.values() if i["role"] == "decode"]
    assert len(decodes) == 3
    # every request has more than one output token, so a decode instance finished each one
    assert sum(i["served"] for i in decodes) == result.summary["overall"]["requests"]
    assert result.summary["overall"]["finished"] == result.summary["overall"]["requests"]


def test_planner_sizes_groups_from_the_profile() -> None:
    stats = {"prefill_heavy": LengthStats(1, 1800, 2), "decode_heavy": LengthStats(1, 50, 400)}
    plans = plan_groups(stats, PROFILE, InstanceSpec(), 0.001, budget=10, min_per_role=1)
    assert plans["prefill_heavy"].n_p > plans["prefill_heavy"].n_d
    assert plans["decode_heavy"].n_d > plans["decode_heavy"].n_p
    assert all(p.n_p + p.n_d == 10 for p in plans.values())


def test_group_and_slo_specs() -> None:
    assert parse_groups("2:3", ["a", "b"]) == {"a": (2, 3), "b": (2, 3)}
    assert parse_groups("a=1:1, b=2:0", ["a", "b"]) == {"a": (1, 1), "b": (2, 0)}
    with pytest.raises(ValueError, match="no group for scenario"):
        parse_groups("a=1:1", ["a", "b"])
    with pytest.raises(ValueError, match="not n_p:n_d"):
        parse_groups("2-3", ["a"])
    bands, tpot, e2e = gateway_slo(slo_table(["ttft:1500", "tpot:50"], None).of("x"))
    assert [(b.max_prompt_tokens, b.deadline_s) for b in bands] == [(None, 1.5)]
    assert (tpot, e2e) == (0.05, None)
    bands, _, _ = gateway_slo(SLO(ttft_slo=(TTFTBand(256, 1.0), TTFTBand(None, 4.0))))
    assert [b.deadline_s for b in bands] == [1.0, 4.0]
    assert gateway_slo(SLO())[0][0].deadline_s == 30.0  # no TTFT SLO: the gateway default


def test_sim_run_command_on_a_mooncake_slice(tmp_path: Path) -> None:
    trace = ROOT.parent / "shared/traces/mooncake/conversation_trace.jsonl"
    if not trace.exists():
        pytest.skip("the shared Mooncake trace is not here")
    out, records = tmp_path / "r.json", tmp_path / "r.jsonl"
    args = ["run", "--profile", str(ROOT / "docs/results/sim_profile_cpu_torch.json"),
            "--trace", str(trace), "--num-prompts", "150", "--max-model-len", "2048",
            "--spread", "--time-scale", "0.2", "--goodput", "ttft:5000",
            "--prefix-cache-blocks", "64", "--result", str(out), "--records", str(records),
            "--vllm-metrics"]
    res = CliRunner().invoke(sim_app, [*args, "--budget", "6"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    overall = data["summary"]["overall"]
    assert overall["requests"] == 150 and overall["prefix_hit_rate"] > 0
    assert data["vllm_metrics"]["overall"]["completed"] == overall["finished"]
    assert data["vllm_metrics"]["overall"]["median_ttft_ms"] > 0
    assert sum(1 for _ in records.open()) == 150
    bad = CliRunner().invoke(sim_app, [*args, "--budget", "6", "--groups", "1:1"])
    assert bad.exit_code == 2 and "exactly one of --groups and --budget" in bad.output
