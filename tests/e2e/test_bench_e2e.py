"""`pd-serve bench run` as a subprocess against a real local P/D deployment (decode, prefill and
gateway processes, torch backend, demo model) replaying the first 20 requests of the Mooncake
conversation trace (lengths scaled 16/512 and capped to the context, quantised timestamps
spread, compressed in time): the results JSON counts every request as completed, token counts
match the workload exactly (token-id prompts, ignore_eos), and the latency metrics are sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.pd_cluster import PDCluster
from tests.e2e.server_process import REPO

pytestmark = pytest.mark.e2e
TRACE = REPO.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"
N, MAX_OUTPUT = 20, 6


def _bench_command() -> list[str]:
    """`python -m pd_serve bench` once the sub-app is registered in pd_serve.cli, else the
    sub-app's own module (the same typer app)."""
    from pd_serve.cli import app

    if any(g.name == "bench" for g in app.registered_groups):
        return [sys.executable, "-m", "pd_serve", "bench"]
    return [sys.executable, "-m", "pd_serve.bench.cli"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDCluster]:
    c = PDCluster(tmp_path_factory.mktemp("bench-pd"), "torch", b_p=4)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.mark.skipif(not TRACE.exists(), reason=f"no trace at {TRACE}")
def test_bench_run_replays_a_trace_through_the_gateway(cluster: PDCluster,
                                                       tmp_path: Path) -> None:
    assert cluster.frontend is not None
    out, plot = tmp_path / "run.json", tmp_path / "run.png"
    cmd = [*_bench_command(), "run", "--base-url", cluster.frontend.url, "--trace", str(TRACE),
           "--num-prompts", str(N), "--block-tokens", "16", "--max-output", str(MAX_OUTPUT),
           "--spread", "--time-scale", "0.5", "--temperature", "0", "--goodput",
           "ttft:30000,tpot:5000", "--percentiles", "50,90,99", "--save-requests",
           "--result", str(out), "--plot", str(plot), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stdout + proc.stderr + cluster.logs()
    assert "Serving Benchmark Result" in proc.stdout

    data = json.loads(out.read_text())
    m = data["metrics"]
    assert (m["completed"], m["failed"]) == (N, 0), data["errors"]
    assert data["arrival"] == "trace" and data["server"]["model"] == "shakespeare-llama"
    reqs = data["requests"]
    assert len(reqs) == N and all(r["success"] and r["usage_reported"] for r in reqs)
    # token-id prompts arrive exactly; ignore_eos gives exactly max_tokens
    assert all(r["prompt_tokens"] == r["input_len"] for r in reqs)
    assert all(r["output_tokens"] == r["max_tokens"] <= MAX_OUTPUT for r in reqs)
    assert m["total_output_tokens"] == sum(r["output_tokens"] for r in reqs)
    assert m["total_input_tokens"] == sum(r["input_len"] for r in reqs)
    assert all(0 < r["ttft_s"] <= r["e2el_s"] < 60 for r in reqs)
    assert 0 < m["mean_ttft_ms"] <= m["p99_ttft_ms"] <= m["mean_e2el_ms"] * N
    assert m["mean_tpot_ms"] > 0 and m["mean_itl_ms"] > 0
    assert m["request_throughput"] > 0 and m["duration"] > 0
    assert m["slo_attainment"] == 1.0 and m["request_goodput"] == pytest.approx(
        m["request_throughput"])
    assert set(data["scenarios"]) == {"default"}
    assert plot.stat().st_size > 0
