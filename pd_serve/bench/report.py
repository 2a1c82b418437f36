"""Benchmark reports: the results JSON of a run or a sweep, the terminal summary (rich tables in
the manner of vLLM's result block) and matplotlib plots (TTFT / TPOT CDFs per scenario,
attainment and goodput against offered load).

Run JSON (`schema: pd-serve-bench-run/1`): `date`, `command`, `label`, `metadata`,
`environment`, `server`, `config`, `metrics` (vLLM key names, see metrics.py), `scenarios`
(name -> metrics), `errors` (text -> count) and, with `--save-requests`, `requests` (one object
per request, times in s from the run's start). Sweep JSON (`schema: pd-serve-bench-sweep/1`)
has `sweep` (target, instances, max and interpolated rates, per instance) and `points` (rate,
attainment, refined, metrics, scenarios, errors).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pd_serve.bench.client import RequestRecord
from pd_serve.bench.metrics import BenchMetrics, percentile_label, tpot_s
from pd_serve.bench.runner import RunResult
from pd_serve.bench.sweep import SweepOutcome

RUN_SCHEMA = "pd-serve-bench-run/1"
SWEEP_SCHEMA = "pd-serve-bench-sweep/1"
ROOT = Path(__file__).resolve().parents[2]


def environment() -> dict[str, Any]:
    """Where the client ran (the server's machine is the user's to state)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "pd_serve_commit": commit or None}


def header(label: str, metadata: dict[str, str]) -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "label": label, "metadata": metadata,
            "environment": environment()}


def _num(x: float | None) -> float | str | None:
    """JSON-safe number: inf as the string "inf" (vLLM's `request_rate`)."""
    return "inf" if x is not None and math.isinf(x) else x


def record_dict(rec: RequestRecord) -> dict[str, Any]:
    return {"index": rec.index, "scenario": rec.scenario, "scheduled_s": rec.scheduled_s,
            "send_s": rec.send_s, "ttft_s": rec.ttft_s, "e2el_s": rec.e2el_s,
            "tpot_s": tpot_s(rec), "itl_s": rec.itl_s, "done_s": rec.done_s,
            "input_len": rec.input_len, "max_tokens": rec.max_tokens,
            "prompt_tokens": rec.prompt_tokens,
            "output_tokens": rec.output_tokens, "usage_reported": rec.usage_reported,
            "status": rec.status, "success": rec.success, "error": rec.error}


def run_json(base: dict[str, Any], result: RunResult, save_requests: bool) -> dict[str, Any]:
    """`base` (header, server, config) plus the run's metrics, scenarios, errors [, requests]."""
    out = {"schema": RUN_SCHEMA, **base,
           "request_rate": _num(result.arrivals.rate), "arrival": result.arrivals.process,
           "metrics": result.metrics.to_dict(),
           "scenarios": {n: m.to_dict() for n, m in result.scenarios.items()},
           "errors": result.errors}
    if save_requests:
        out["requests"] = [record_dict(r) for r in result.load.records]
    return out


def sweep_json(base: dict[str, Any], sweep: SweepOutcome) -> dict[str, Any]:
    points = []
    for p in sweep.points:
        res: RunResult = p.data
        points.append({"rate": p.rate, "attainment": p.attainment, "refined": p.refined,
                       "metrics": res.metrics.to_dict(),
                       "scenarios": {n: m.to_dict() for n, m in res.scenarios.items()},
                       "errors": res.errors})
    return {"schema": SWEEP_SCHEMA, **base, "sweep": {
        "target": sweep.target, "instances": sweep.instances, "max_rate": sweep.max_rate,
        "bounded": sweep.bounded, "max_rate_per_instance": sweep.max_rate_per_instance,
        "interpolated_rate": sweep.interpolated_rate,
        "interpolated_rate_per_instance": sweep.interpolated_per_instance}, "points": points}


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_table(m: BenchMetrics, title: str = "Serving Benchmark Result") -> Table:
    """vLLM's result block as a two-column table."""
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("Successful requests", str(m.completed)), ("Failed requests", str(m.failed)),
        ("Benchmark duration (s)", _f(m.duration_s)),
        ("Total input tokens", str(m.total_input_tokens)),
        ("Total generated tokens", str(m.total_output_tokens)),
        ("Request throughput (req/s)", _f(m.request_throughput)),
        ("Request goodput (req/s)", _f(m.request_goodput)),
        ("SLO attainment (%)", _f(None if m.slo_attainment is None else 100 * m.slo_attainment)),
        ("Output token throughput (tok/s)", _f(m.output_throughput)),
        ("Total token throughput (tok/s)", _f(m.total_token_throughput))]
    for label, value in rows:
        t.add_row(label, value)
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
    for key, s in m.stats:
        t.add_section()
        t.add_row(f"Mean {names[key]} (ms)", _f(s.mean))
        t.add_row(f"Median {names[key]} (ms)", _f(s.median))
        for p, v in s.percentiles:
            if p != 50:  # the median
                t.add_row(f"P{percentile_label(p)} {names[key]} (ms)", _f(v))
    return t


def scenario_table(scenarios: dict[str, BenchMetrics]) -> Table:
    t = Table(title="Per scenario", title_justify="left")
    for col in ("scenario", "done", "failed", "p50 TTFT ms", "p99 TTFT ms", "mean TPOT ms",
                "TTFT-SLO %", "SLO %"):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    for name, m in scenarios.items():
        ttft, tpot = m.stat("ttft"), m.stat("tpot")
        pct = dict(ttft.percentiles)
        t.add_row(name, str(m.completed), str(m.failed), _f(ttft.median),
                  _f(pct.get(99.0)), _f(tpot.mean),
                  _f(None if m.ttft_slo_attainment is None else 100 * m.ttft_slo_attainment, 1),
                  _f(None if m.slo_attainment is None else 100 * m.slo_attainment, 1))
    return t


def print_run(console: Console, result: RunResult) -> None:
    console.print(summary_table(result.metrics))
    if len(result.scenarios) > 1:
        console.print(scenario_table(result.scenarios))
    for text, count in list(result.errors.items())[:5]:
        console.print(f"[red]{count} x[/red] {text}")


def sweep_table(sweep: SweepOutcome) -> Table:
    t = Table(title=f"Sweep (target attainment {100 * sweep.target:g} %)", title_justify="left")
    for col in ("rate req/s", "attainment %", "goodput req/s", "done", "failed", "p99 TTFT ms",
                "mean TPOT ms"):
        t.add_column(col, justify="right")
    for p in sweep.points:
        m: BenchMetrics = p.data.metrics
        t.add_row(f"{p.rate:g}{' *' if p.refined else ''}", _f(100 * p.attainment, 1),
                  _f(m.request_goodput), str(m.completed), str(m.failed),
                  _f(dict(m.stat("ttft").percentiles).get(99.0)), _f(m.stat("tpot").mean))
    return t


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, values: Sequence[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def plot_cdfs(result: RunResult, path: Path, title: str = "") -> Path:
    """One PNG: TTFT and TPOT CDFs (ms), one line per scenario (and all when several)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    recs = [r for r in result.load.records if r.success and r.chunk_s]
    groups = {"all": recs} if len(result.scenarios) <= 1 else {
        "all": recs, **{n: [r for r in recs if r.scenario == n] for n in result.scenarios}}
    for name, rs in groups.items():
        _cdf(axes[0], [1000 * (r.ttft_s or 0.0) for r in rs], name)
        _cdf(axes[1], [1000 * t for t in map(tpot_s, rs) if t is not None], name)
    for ax, what in zip(axes, ("TTFT", "TPOT")):
        ax.set_xlabel(f"{what} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(sweep: SweepOutcome, path: Path, title: str = "") -> Path:
    """SLO attainment (%) and goodput (req/s) against offered load, target and maximum marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rates = [p.rate for p in sweep.points]
    ax.plot(rates, [100 * p.attainment for p in sweep.points], marker="o", label="attainment")
    ax.axhline(100 * sweep.target, color="grey", ls="--", lw=1, label="target")
    if sweep.max_rate is not None:
        ax.axvline(sweep.max_rate, color="green", ls=":", lw=1,
                   label=f"max {sweep.max_rate:g} req/s")
    ax.set_xlabel("offered load (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(rates, [p.data.metrics.request_goodput or 0.0 for p in sweep.points], marker="s",
             color="tab:orange", label="goodput")
    ax2.set_ylabel("goodput (req/s)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left")
    ax.set_title(title or "goodput vs load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
