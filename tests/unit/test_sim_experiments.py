"""tools/sim_experiments.py at --quick size, in process: every experiment runs and writes its
JSON (and its PNG where matplotlib is installed) with the structure docs/benchmarks.md reads;
(b) checks its policies' success rates, (a) the planner comparison. Needs shared/traces."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT.parent / "shared" / "traces"
pytestmark = pytest.mark.skipif(not (TRACES / "mooncake").is_dir(),
                                reason=f"no shared traces at {TRACES}")


def _tool() -> ModuleType:
    name = "sim_experiments_tool"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "sim_experiments.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("sim_exp")
    plot = importlib.util.find_spec("matplotlib") is not None
    argv = ["--quick", "--out-dir", str(out), "--traces", str(TRACES)]
    assert _tool().main(argv + ([] if plot else ["--no-plot"])) == 0
    data = {x: json.loads((out / f"sim_exp_{x}.json").read_text()) for x in "abcd"}
    return data, out


def test_every_experiment_writes_its_report(results: tuple[dict[str, Any], Path]) -> None:
    data, out = results
    for name, d in data.items():
        assert d["experiment"] == name and d["quick"] is True
        for key in ("title", "date", "command", "git_commit", "machine", "options", "sizes",
                    "table", "wall_s", "sim_events"):
            assert key in d, (name, key)
        assert d["sim_events"] > 0 and d["options"]["ttft_bands"][-1][0] is None
        if importlib.util.find_spec("matplotlib") is not None:
            assert (out / f"sim_exp_{name}.png").stat().st_size > 0


def test_a_compares_the_planner_with_every_split(results: tuple[dict[str, Any], Path]) -> None:
    a = results[0]["a"]
    assert set(a["scenarios"]) == {"arxiv", "sharegpt"}
    for info in a["scenarios"].values():
        splits = info["splits"]
        assert [s["n_p"] for s in splits] == list(range(1, a["budget"]))
        assert all(s["n_p"] + s["n_d"] == a["budget"] for s in splits)
        assert info["plan"]["n_p"] in {s["n_p"] for s in splits}
        for s in splits:
            assert s["peak_throughput_rps"] >= s["saturated_throughput_rps"] >= 0
            assert set(s["goodput"]) == {"0.99", "0.95", "0.9"}
            assert s["ladder"]["rows"] and s["saturated"]["point"]["load"] == "saturated"
        for c in info["planner_vs_others"].values():
            assert 1 <= c["planner_rank"] <= len(splits)
            assert c["planner_is_best"] == (c["planner_rank"] == 1)


def test_b_reports_each_policy_per_load(results: tuple[dict[str, Any], Path]) -> None:
    b = results[0]["b"]
    assert b["A_rps"] > 0 and b["calibration"]
    for pt in b["points"]:
        for policy in ("forwarding", "fifo", "round_robin"):
            assert 0.0 <= pt[policy]["success"] <= 1.0
        assert pt["gap_vs_fifo"] == pytest.approx(pt["forwarding"]["success"]
                                                  - pt["fifo"]["success"])


def test_c_and_d_compare_at_equal_instances(results: tuple[dict[str, Any], Path]) -> None:
    c, d = results[0]["c"], results[0]["d"]
    assert c["prefix_families_check"]["top"] and len(c["scenarios"]) == c["copies"]
    for pt in c["points"]:
        for layout in ("groups", "mixed"):
            assert 0.0 <= pt[layout]["prefix_hit_rate"] <= 1.0
    for info in d["scenarios"].values():
        assert info["plan"]["n_p"] + info["plan"]["n_d"] == d["budget"]
        assert info["disaggregated"]["points"] and info["aggregated"]["points"]
        assert "peak_throughput" in info["ratios"]
