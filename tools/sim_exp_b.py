"""(b) TTFT-SLO success vs offered load: forwarding vs fifo vs round_robin.

The Mooncake conversation trace (hash-id blocks scaled, buckets spread, arrivals compressed to
each rate) on several prefill instances with prefix caches, per-prompt-length TTFT bands (the
gateway's ttft_slo). Load is in multiples of A, the highest rate at which fifo still has >= 99%
success, calibrated first (as docs/benchmarks.md section 3 did).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sim_exp_common import (
    POLICIES,
    Options,
    Sizes,
    Workload,
    length_stats_of,
    load_profile,
    mooncake_base,
)
from sim_exp_report import Experiment, compact, finish_axes, fmt, pyplot, save_figure, table
from sim_exp_runs import Runner, Task, instance_spec, sim_config

from pd_serve.bench.tagging import scenario_summary
from pd_serve.bench.traces import Trace
from pd_serve.orchestrator import perf_model as pm
from pd_serve.sim.config import InstanceSpec
from pd_serve.sim.plan import LengthStats, scenario_profile


@dataclass(frozen=True)
class Pool:
    """The Mooncake deployment the policies are compared on."""

    base: Trace
    stats: LengthStats
    spec: InstanceSpec
    n_p: int
    n_d: int  # decode sized to 2x the prefill instances' modelled capacity
    model_a: float  # the E2E model's prefill capacity (no prefix hits)


def exp_b(o: Options, sizes: Sizes, runner: Runner) -> Experiment:
    pool = pool_of(o, sizes)
    calib, calibrated, a_rps = calibrate(runner, o, sizes, pool)
    tasks = [make_task(o, sizes, pool, load * a_rps, policy, (("load", load),))
             for load in sizes.b_loads for policy in POLICIES]
    res = runner.run(tasks, "b")
    by = {(r["point"]["load"], r["point"]["policy"]): r for r in res}
    points = [load_point(load, a_rps, by) for load in sizes.b_loads]
    summary = {"max_gap_vs_fifo": max(p["gap_vs_fifo"] for p in points),
               "min_gap_vs_fifo": min(p["gap_vs_fifo"] for p in points),
               "max_gap_vs_round_robin": max(p["gap_vs_round_robin"] for p in points),
               "min_gap_vs_round_robin": min(p["gap_vs_round_robin"] for p in points)}
    text = describe(points, a_rps, calibrated, pool, summary)
    data = {"A_rps": a_rps, "model_prefill_capacity_rps": pool.model_a,
            "calibration": calibration_rows(calib),
            "n_p": pool.n_p, "n_d": pool.n_d, "requests": len(pool.base.requests),
            "mean_prompt": pool.stats.mean_prompt, "mean_output": pool.stats.mean_output,
            "prefix_cache_blocks": pool.spec.prefix_cache_blocks,
            "infinite_cache_prefix_hit_ratio": scenario_summary(pool.base)["default"].get(
                "prefix_hit_ratio"),
            "points": points, "summary": summary}
    return Experiment(data, text, partial(plot_b, points=points, a_rps=a_rps, o=o, pool=pool))


def pool_of(o: Options, sizes: Sizes) -> Pool:
    prof = load_profile(o.profile, o.packed)
    base = mooncake_base(o, sizes)
    stats = length_stats_of(base)
    spec = instance_spec(o, sizes.b_cache_blocks, o.block_tokens)
    sp = scenario_profile("mooncake", prof, spec, o.gateway.rtt_s, stats.mean_prompt,
                          stats.mean_output)
    n_p = sizes.b_prefill
    model_a = pm.prefill_capacity(sp, n_p)
    n_d = max(o.min_per_role, math.ceil(2 * model_a / pm.decode_capacity(sp, 1)))
    return Pool(base, stats, spec, n_p, n_d, model_a)


def make_task(o: Options, sizes: Sizes, pool: Pool, rate: float, policy: str,
              point: tuple[tuple[str, Any], ...]) -> Task:
    return Task("b", point + (("policy", policy),),
                Workload("mooncake", "mooncake", rate, seed=o.seed),
                sim_config(o, [("mooncake", pool.n_p, pool.n_d)], policy, spec=pool.spec,
                           tpot=False),
                o, sizes,
                len(pool.base.requests) * (1 + rate / pool.model_a))


def calibrate(runner: Runner, o: Options, sizes: Sizes,
              pool: Pool) -> tuple[list[dict[str, Any]], bool, float]:
    """A, as the paper and docs/benchmarks.md section 3 define it: the highest offered rate at
    which the local-queue baseline (fifo) still meets the TTFT SLO for >= 99% of requests (the
    lowest calibration rate when none does). Returns the calibration runs, whether one met it,
    and A."""
    calib = runner.run([make_task(o, sizes, pool, f * pool.model_a, "fifo", (("calibration", f),))
                        for f in sizes.b_calibration], "b: calibrating A with fifo")
    calib.sort(key=lambda r: r["offered_rps"])
    ok = [r["offered_rps"] for r in calib if r["summary"]["slo_success_rate"] >= 0.99]
    return calib, bool(ok), (max(ok) if ok else calib[0]["offered_rps"])


def calibration_rows(calib: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"fraction_of_model": r["point"]["calibration"], "offered_rps": r["offered_rps"],
             "success": r["summary"]["slo_success_rate"],
             "ttft_p99_s": r["summary"]["ttft_p99_s"],
             "throughput_rps": r["metrics"]["overall"]["throughput_rps"]} for r in calib]


def load_point(load: float, a_rps: float,
               by: dict[tuple[float, str], dict[str, Any]]) -> dict[str, Any]:
    """One load's result per policy and forwarding's gaps to the others."""
    pt: dict[str, Any] = {"load": load, "offered_rps": load * a_rps}
    for policy in POLICIES:
        r = by[(load, policy)]
        s = r["summary"]
        pt[policy] = {"success": s["slo_success_rate"],
                      "terminated_share": s["terminated"] / s["requests"],
                      "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"],
                      "throughput_rps": r["metrics"]["overall"]["throughput_rps"],
                      "prefix_hit_rate": r["metrics"]["overall"]["prefix_hit_rate"],
                      "rejections_per_request": s["rejections_per_request"],
                      "run": compact(r)}
    fwd = pt["forwarding"]["success"]
    pt["gap_vs_fifo"] = fwd - pt["fifo"]["success"]
    pt["gap_vs_round_robin"] = fwd - pt["round_robin"]["success"]
    return pt


def describe(points: Sequence[dict[str, Any]], a_rps: float, calibrated: bool, pool: Pool,
             summary: dict[str, float]) -> str:
    rows = [[f"{pt['load']:g}A", fmt(pt["offered_rps"], 1)]
            + [f"{100 * pt[p]['success']:.1f}% ({fmt(pt[p]['ttft_p99_s'], 2)})"
               for p in POLICIES]
            + [f"{100 * pt['gap_vs_fifo']:+.1f}", f"{100 * pt['gap_vs_round_robin']:+.1f}"]
            for pt in points]
    text = table(rows, ["load", "req/s", *(f"{p} (TTFT p99 s)" for p in POLICIES),
                        "fwd-fifo pts", "fwd-rr pts"])
    spec = pool.spec
    return text + (
        f"\nA = {a_rps:.1f} req/s: highest calibration rate with fifo >= 99% TTFT-SLO "
        f"success" + ("" if calibrated else " (none reached 99%: the lowest rate)") + f" (the "
        f"E2E model's prefill capacity, no prefix hits: {pool.model_a:.1f} req/s); "
        f"{pool.n_p}P:{pool.n_d}D, b_p {spec.b_p}, prefix cache {spec.prefix_cache_blocks} "
        f"blocks of {spec.hash_block_tokens} tokens; gap forwarding - fifo "
        f"{100 * summary['min_gap_vs_fifo']:+.1f} to {100 * summary['max_gap_vs_fifo']:+.1f}"
        f" points, - round_robin {100 * summary['min_gap_vs_round_robin']:+.1f} to "
        f"{100 * summary['max_gap_vs_round_robin']:+.1f} points")


def plot_b(path: Path, points: Sequence[dict[str, Any]], a_rps: float, o: Options,
           pool: Pool) -> None:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = [p["load"] for p in points]
    for policy, mark in zip(POLICIES, "osd"):
        ax.plot(x, [100 * p[policy]["success"] for p in points], mark + "-", label=policy)
        ax2.plot(x, [p[policy]["ttft_p99_s"] or 0 for p in points], mark + "-", label=policy)
    ax.set_title(f"Mooncake (1/{512 // o.block_tokens} lengths), {pool.n_p}P:{pool.n_d}D")
    xlabel = f"offered load (x A = {a_rps:.1f} req/s)"
    finish_axes(ax, xlabel, "TTFT-SLO success rate (%)", 8)
    finish_axes(ax2, xlabel, "TTFT p99 of computed requests (s)", 8)
    save_figure(plt, fig, path)
