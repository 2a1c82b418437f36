"""(a) throughput vs P/D ratio, and the planner's choice among every split.

Per length scenario (arXiv: prefill-heavy, ShareGPT: decode-heavy), every split n_p:n_d of a
fixed budget runs under a saturating load (the same stream for every split) and on a load
ladder (fractions of the split's modelled capacity, refined around the goodput knee). The
planner's split (sim.plan.plan_groups) is compared with the others: gain over their mean,
median, worst and best, by saturated throughput, peak throughput and goodput.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from sim_exp_common import Options, Sizes, Workload, length_plans, load_profile
from sim_exp_report import (
    Experiment,
    as_rows,
    best_goodput,
    compact,
    finish_axes,
    fmt,
    pyplot,
    save_figure,
    scenario_axes,
    table,
)
from sim_exp_runs import Runner, Task, refine, sim_config

from pd_serve.orchestrator import perf_model as pm
from pd_serve.orchestrator import planner
from pd_serve.sim.latency import LatencyProfile
from pd_serve.sim.plan import scenario_profile


def exp_a(o: Options, sizes: Sizes, runner: Runner) -> Experiment:
    prof = load_profile(o.profile, o.packed)
    scen, tasks = scenario_tasks(o, sizes, prof)
    res = run_splits(o, sizes, runner, tasks)
    key = f"{o.attainment:g}"
    rows: list[list[Any]] = []
    lines: list[str] = []
    for name, info in scen.items():
        planned = summarize_scenario(name, info, res, o, sizes.a_budget, prof)
        rows += split_rows(name, info["splits"], planned, key)
        lines += planner_lines(name, info, planned)
    data = {"budget": sizes.a_budget, "duration_s": sizes.a_duration_s,
            "overload": sizes.a_overload,
            "ladder_fractions_of_model_capacity": list(sizes.a_ladder), "scenarios": scen}
    return Experiment(data, describe(rows, lines, o),
                      partial(plot_a, scen=scen, o=o, budget=sizes.a_budget))


# ---------------------------------------------------------------------------------------------
# Tasks


def scenario_tasks(o: Options, sizes: Sizes,
                   prof: LatencyProfile) -> tuple[dict[str, Any], list[Task]]:
    """Per scenario: its lengths, plan and modelled profile (the report's body), and the runs
    of every split (saturated and the load ladder)."""
    scen: dict[str, Any] = {}
    tasks: list[Task] = []
    for name, stats, plan in length_plans(o, prof, sizes.a_budget):
        sp = scenario_profile(name, prof, o.instance, o.gateway.rtt_s, stats.mean_prompt,
                              stats.mean_output)
        saturating = sizes.a_overload * min(plan.prefill_capacity, plan.decode_capacity)
        scen[name] = {"mean_prompt": stats.mean_prompt, "mean_output": stats.mean_output,
                      "plan": plan.to_dict(), "saturating_rps": saturating,
                      "profile": {"tp_by_batch": dict(sp.tp_by_batch or {}), "xi": sp.xi,
                                  "G": sp.G,
                                  "tpot_b_d": pm.tpot(sp)}}
        tasks += split_tasks(o, sizes, name, sp, saturating)
    return scen, tasks


def split_tasks(o: Options, sizes: Sizes, name: str, sp: pm.ScenarioProfile,
                saturating: float) -> list[Task]:
    """Every split n_p:n_d of the budget: one saturated run, then the load ladder (fractions
    of the split's modelled capacity)."""
    tasks = []
    for n_p in range(1, sizes.a_budget):
        n_d = sizes.a_budget - n_p
        model_rps = planner.split(sp, n_p, n_d).bottleneck_capacity
        loads = [("saturated", saturating)] + [(f"{f:g}", f * model_rps)
                                               for f in sizes.a_ladder]
        for label, rate in loads:
            w = Workload("lengths", name, rate, sizes.a_duration_s, seed=o.seed)
            tasks.append(Task("a", (("scenario", name), ("n_p", n_p), ("n_d", n_d),
                                    ("load", label)),
                              w, sim_config(o, [(name, n_p, n_d)]), o, sizes,
                              rate * sizes.a_duration_s))
    return tasks


def run_splits(o: Options, sizes: Sizes, runner: Runner,
               tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """The saturated runs, then the load ladders refined per (scenario, split)."""

    def again(t: Task, rate: float) -> Task:
        point = dict(t.point) | {"load": "refined"}
        return replace(t, point=tuple(point.items()), workload=replace(t.workload, rate=rate),
                       cost=rate * sizes.a_duration_s)

    sat_tasks = [t for t in tasks if dict(t.point)["load"] == "saturated"]
    return runner.run(sat_tasks, "a: saturated") + refine(
        runner, [t for t in tasks if dict(t.point)["load"] != "saturated"],
        lambda t: (dict(t.point)["scenario"], dict(t.point)["n_p"]), again, o,
        sizes.refine_steps, "a: load ladder")


# ---------------------------------------------------------------------------------------------
# Results


def split_result(res: Sequence[dict[str, Any]], name: str, n_p: int, budget: int,
                 sp: pm.ScenarioProfile, o: Options) -> dict[str, Any]:
    """One split's report: saturated throughput, peak throughput, goodput, the model's
    capacities and its runs."""
    pts = [r for r in res if r["point"]["scenario"] == name and r["point"]["n_p"] == n_p]
    sat = next(r for r in pts if r["point"]["load"] == "saturated")
    ladder = sorted((r for r in pts if r is not sat), key=lambda r: r["offered_rps"])
    model = planner.split(sp, n_p, budget - n_p)
    m = sat["metrics"]["overall"]
    return {
        "n_p": n_p, "n_d": budget - n_p,
        "saturated_throughput_rps": m["throughput_rps"],
        "saturated_output_tokens_per_s": m["output_tokens_per_s"],
        "saturated_goodput_rps": m["goodput_rps"],
        "peak_throughput_rps": max(r["metrics"]["overall"]["throughput_rps"] for r in pts),
        "goodput": best_goodput(ladder, "attainment", o.targets),
        "ttft_goodput": best_goodput(ladder, "ttft_attainment", o.targets),
        "model_prefill_rps": model.prefill_capacity,
        "model_decode_rps": model.decode_capacity,
        "saturated": compact(sat), "ladder": as_rows(ladder)}


def summarize_scenario(name: str, info: dict[str, Any], res: Sequence[dict[str, Any]],
                       o: Options, budget: int, prof: LatencyProfile) -> dict[str, Any]:
    """Adds the splits and the planner comparison to `info`; returns the planner's split."""
    sp = scenario_profile(name, prof, o.instance, o.gateway.rtt_s, info["mean_prompt"],
                          info["mean_output"])
    splits = [split_result(res, name, n_p, budget, sp, o) for n_p in range(1, budget)]
    info["splits"] = splits
    planned = next(s for s in splits if s["n_p"] == info["plan"]["n_p"])
    key = f"{o.attainment:g}"
    info["planner_vs_others"] = {
        "saturated_throughput": compare(splits, planned, ("saturated_throughput_rps",)),
        "peak_throughput": compare(splits, planned, ("peak_throughput_rps",)),
        "goodput": compare(splits, planned, ("goodput", key, "goodput_rps"))}
    return planned


def gain(x: float, ref: float) -> float | None:
    return x / ref - 1 if ref > 0 else None


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def compare(splits: Sequence[dict[str, Any]], planned: dict[str, Any],
            path: tuple[str, ...]) -> dict[str, Any]:
    """The planner's split against every other split of the budget by the value at `path`."""

    def get(s: dict[str, Any]) -> float:
        for k in path:
            s = s[k]
        return float(s)  # type: ignore[arg-type]

    others = [get(s) for s in splits if s is not planned]
    best = max(splits, key=get)
    x = get(planned)
    return {"planner": x, "best_split": f"{best['n_p']}:{best['n_d']}", "best": get(best),
            "planner_is_best": x >= get(best) * (1 - 1e-9),
            "planner_rank": 1 + sum(v > x for v in others),
            "gain_over_mean": gain(x, statistics.fmean(others)) if others else None,
            "gain_over_median": gain(x, statistics.median(others)) if others else None,
            "gain_over_worst": gain(x, min(others)) if others else None,
            "gain_over_best_other": gain(x, max(others)) if others else None}


# ---------------------------------------------------------------------------------------------
# Table and plot


def split_rows(name: str, splits: Sequence[dict[str, Any]], planned: dict[str, Any],
               key: str) -> list[list[Any]]:
    return [[name, f"{s['n_p']}:{s['n_d']}" + (" *" if s is planned else ""),
             fmt(min(s["model_prefill_rps"], s["model_decode_rps"]), 1),
             fmt(s["saturated_throughput_rps"], 1),
             fmt(s["saturated_output_tokens_per_s"], 0),
             fmt(s["peak_throughput_rps"], 1),
             fmt(s["goodput"][key]["goodput_rps"], 1),
             fmt(s["ttft_goodput"][key]["goodput_rps"], 1)] for s in splits]


def planner_lines(name: str, info: dict[str, Any], planned: dict[str, Any]) -> list[str]:
    """The planner's split against the others, one line per metric under a heading line."""
    lines = [f"{name}: planner {planned['n_p']}:{planned['n_d']} ({info['plan']['reason']})"]
    for k, c in info["planner_vs_others"].items():
        lines.append(f"  {k}: planner {c['planner']:.2f} req/s, rank {c['planner_rank']}/"
                     f"{len(info['splits'])} (best {c['best_split']} {c['best']:.2f}); vs the "
                     f"other splits' mean {fmt_pct(c['gain_over_mean'])}, median "
                     f"{fmt_pct(c['gain_over_median'])}, worst "
                     f"{fmt_pct(c['gain_over_worst'])}, best other "
                     f"{fmt_pct(c['gain_over_best_other'])}")
    return lines


def describe(rows: Sequence[Sequence[Any]], lines: Sequence[str], o: Options) -> str:
    text = table(rows, ["scenario", "n_p:n_d", "model req/s", "sat. req/s", "sat. tok/s",
                        "peak req/s", f"goodput@{o.attainment:.0%}", "TTFT-only goodput"])
    text += ("\n(* the planner's split; model = min(prefill, decode) capacity of the E2E model; "
             "sat. = under the saturating load; peak = best throughput over the load ladder; "
             "goodput = highest SLO-met rate on the ladder with attainment >= target)\n")
    return text + "\n".join(lines)


def plot_a(path: Path, scen: dict[str, Any], o: Options, budget: int) -> None:
    plt = pyplot()
    key = f"{o.attainment:g}"
    fig, axes = scenario_axes(plt, len(scen))
    for ax, (name, info) in zip(axes[0], scen.items()):
        sp_ = info["splits"]
        x = [s["n_p"] for s in sp_]
        ax.plot(x, [s["peak_throughput_rps"] for s in sp_], "o-", label="peak throughput")
        ax.plot(x, [s["saturated_throughput_rps"] for s in sp_], "^-", ms=4,
                label="throughput, saturating load")
        ax.plot(x, [s["goodput"][key]["goodput_rps"] for s in sp_], "s-",
                label=f"goodput (SLO attainment >= {o.attainment:.0%})")
        ax.plot(x, [min(s["model_prefill_rps"], s["model_decode_rps"]) for s in sp_], "k--",
                lw=1, label="E2E model bottleneck")
        ax.axvline(info["plan"]["n_p"], color="r", ls=":",
                   label=f"planner {info['plan']['n_p']}:{info['plan']['n_d']}")
        ax.set_title(f"{name} (mean {info['mean_prompt']:.0f} in / "
                     f"{info['mean_output']:.0f} out), budget {budget}")
        finish_axes(ax, "prefill instances n_p (n_d = budget - n_p)", "requests/s")
    save_figure(plt, fig, path)
