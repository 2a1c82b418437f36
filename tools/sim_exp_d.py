"""(d) disaggregated vs aggregated serving at equal instance count.

Per length scenario of (a): the planner's disaggregated split of the budget vs the same number
of aggregated instances, on a load ladder (fractions of the disaggregated plan's modelled
capacity, refined around each deployment's goodput knee): peak throughput and goodput, and
their ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from sim_exp_common import Options, Sizes, Workload, length_plans, load_profile
from sim_exp_report import (
    Experiment,
    best_goodput,
    finish_axes,
    fmt,
    pyplot,
    save_figure,
    scenario_axes,
    table,
)
from sim_exp_runs import Runner, Task, refine, sim_config

MODES = ("disaggregated", "aggregated")
POINT_KEYS = ("throughput_rps", "goodput_rps", "attainment", "ttft_attainment", "ttft_p50_s",
              "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")


def exp_d(o: Options, sizes: Sizes, runner: Runner) -> Experiment:
    scen, tasks = scenario_tasks(o, sizes)

    def again(t: Task, rate: float) -> Task:
        point = dict(t.point)
        cap = scen[point["scenario"]]["capacity_rps"]
        return replace(t, point=tuple((point | {"load": rate / cap}).items()),
                       workload=replace(t.workload, rate=rate),
                       cost=rate * sizes.d_duration_s)

    res = refine(runner, tasks, lambda t: (dict(t.point)["scenario"], dict(t.point)["mode"]),
                 again, o, sizes.refine_steps, "d")
    rows: list[list[Any]] = []
    for name, info in scen.items():
        for mode in MODES:
            pts = sorted((r for r in res if r["point"]["scenario"] == name
                          and r["point"]["mode"] == mode), key=lambda r: r["point"]["load"])
            info[mode] = mode_summary(pts, o)
        info["ratios"] = ratios(info["disaggregated"], info["aggregated"])
        rows += scenario_rows(name, info, sizes.d_budget, f"{o.attainment:g}")
    data = {"budget": sizes.d_budget, "duration_s": sizes.d_duration_s,
            "loads": list(sizes.d_loads), "scenarios": scen}
    return Experiment(data, describe(rows, o, sizes.d_budget),
                      partial(plot_d, scen=scen, budget=sizes.d_budget))


def scenario_tasks(o: Options, sizes: Sizes) -> tuple[dict[str, Any], list[Task]]:
    """Per scenario: the planner's split and its modelled capacity (the report's body), and
    both deployments' runs on the load ladder."""
    prof = load_profile(o.profile, o.packed)
    scen: dict[str, Any] = {}
    tasks = []
    for name, stats, plan in length_plans(o, prof, sizes.d_budget):
        cap = min(plan.prefill_capacity, plan.decode_capacity)
        scen[name] = {"plan": plan.to_dict(), "capacity_rps": cap,
                      "mean_prompt": stats.mean_prompt, "mean_output": stats.mean_output}
        for mode in MODES:
            for load in sizes.d_loads:
                w = Workload("lengths", name, load * cap, sizes.d_duration_s, seed=o.seed)
                tasks.append(Task("d", (("scenario", name), ("mode", mode), ("load", load)), w,
                                  sim_config(o, [(name, plan.n_p, plan.n_d)], mode=mode), o,
                                  sizes, load * cap * sizes.d_duration_s))
    return scen, tasks


def mode_summary(pts: Sequence[dict[str, Any]], o: Options) -> dict[str, Any]:
    """One deployment's peak throughput, goodput per attainment target and its load points."""
    return {
        "peak_throughput_rps": max(p["metrics"]["overall"]["throughput_rps"] for p in pts),
        "goodput": best_goodput(pts, "attainment", o.targets),
        "ttft_goodput": best_goodput(pts, "ttft_attainment", o.targets),
        "points": [{"load": p["point"]["load"], "offered_rps": p["offered_rps"],
                    **{k: p["metrics"]["overall"][k] for k in POINT_KEYS},
                    "events": p["sim"]["events"]} for p in pts]}


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def ratios(dis: dict[str, Any], agg: dict[str, Any]) -> dict[str, float | None]:
    """Disaggregated over aggregated: peak throughput and goodput per target."""
    return {
        "peak_throughput": ratio(dis["peak_throughput_rps"], agg["peak_throughput_rps"]),
        **{f"goodput_{t}": ratio(dis["goodput"][t]["goodput_rps"],
                                 agg["goodput"][t]["goodput_rps"]) for t in dis["goodput"]},
        **{f"ttft_goodput_{t}": ratio(dis["ttft_goodput"][t]["goodput_rps"],
                                      agg["ttft_goodput"][t]["goodput_rps"])
           for t in dis["ttft_goodput"]}}


def scenario_rows(name: str, info: dict[str, Any], budget: int, key: str) -> list[list[Any]]:
    """Both deployments and their ratio."""
    rows = []
    for mode in MODES:
        m = info[mode]
        split = (f"{info['plan']['n_p']}P:{info['plan']['n_d']}D" if mode == "disaggregated"
                 else f"{budget} aggregated")
        rows.append([name, split, fmt(m["peak_throughput_rps"], 1),
                     fmt(m["goodput"][key]["goodput_rps"], 1),
                     fmt(m["ttft_goodput"][key]["goodput_rps"], 1)])
    rt = info["ratios"]
    rows.append([name, "disagg / agg", fmt(rt["peak_throughput"], 2) + "x",
                 fmt(rt[f"goodput_{key}"], 2) + "x", fmt(rt[f"ttft_goodput_{key}"], 2) + "x"])
    return rows


def describe(rows: Sequence[Sequence[Any]], o: Options, budget: int) -> str:
    text = table(rows, ["scenario", "deployment", "peak req/s",
                        f"goodput@{o.attainment:.0%} (TTFT+TPOT)",
                        f"goodput@{o.attainment:.0%} (TTFT)"])
    return text + (f"\n{budget} instances per scenario either way; SLO: TTFT bands "
                   f"{[(b.max_prompt_tokens, b.deadline_s) for b in o.bands]}, TPOT <= "
                   f"{o.tpot_slo_s} s; goodput = highest SLO-met rate on the load ladder whose "
                   f"attainment >= {o.attainment:.0%}")


def plot_d(path: Path, scen: dict[str, Any], budget: int) -> None:
    plt = pyplot()
    fig, axes = scenario_axes(plt, len(scen))
    for ax, (name, info) in zip(axes[0], scen.items()):
        for mode, mark in (("disaggregated", "o"), ("aggregated", "s")):
            pts = info[mode]["points"]
            x = [p["offered_rps"] for p in pts]
            ax.plot(x, [p["throughput_rps"] for p in pts], mark + "-",
                    label=f"{mode}: throughput")
            ax.plot(x, [p["goodput_rps"] for p in pts], mark + "--",
                    label=f"{mode}: goodput (TTFT+TPOT)")
        ax.set_title(f"{name}: {info['plan']['n_p']}P:{info['plan']['n_d']}D vs "
                     f"{budget} aggregated")
        finish_axes(ax, "offered req/s", "req/s")
    save_figure(plt, fig, path)
