"""(c) per-scenario P/D groups vs one mixed pool with the same instances, under limited prefill
prefix caches (a sweep of capacities in hash blocks, as `sim run --prefix-cache-blocks`).

The trace's own prefix families (bench.tagging.tag_scenarios) are far too small to be scenarios
(the JSON records that check), so scenarios are built: rotated copies of the Mooncake trace
merged with bench.tagging.merge_traces (each copy its own hash ids and conversations), each
with its own shared system prompts (`with_templates`) in place of the trace-wide first block.
Reported per load and cache size: prefix hit rate, TTFT p50/p90, throughput, TTFT-SLO success.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sim_exp_common import (
    MOONCAKE,
    Options,
    Sizes,
    Workload,
    load_profile,
    merged_mooncake,
    mooncake_base,
)
from sim_exp_report import Experiment, compact, finish_axes, fmt, pyplot, save_figure, table
from sim_exp_runs import Runner, Task, instance_spec, sim_config

from pd_serve.bench.tagging import scenario_summary, tag_scenarios
from pd_serve.bench.traces import Trace
from pd_serve.orchestrator.planner import Plan
from pd_serve.sim.plan import LengthStats, plan_groups

LAYOUTS = ("groups", "mixed")
CONSTRUCTION = ("rotated copies of the scaled Mooncake trace merged with merge_traces (hash ids "
                "shifted per copy: each scenario its own conversations); the trace-wide "
                "system-prompt block replaced by one of the scenario's own system prompts "
                "(templates, Zipf popularity, fixed per conversation)")


@dataclass(frozen=True)
class Setup:
    """The built scenarios, the plain trace's summary, the prefix-family check and the plan
    of one scenario group (`cap`: planned capacity of all groups, no prefix hits)."""

    merged: Trace
    built: dict[str, Any]
    plain: dict[str, Any]
    families: dict[str, Any]
    plan: Plan
    cap: float


def exp_c(o: Options, sizes: Sizes, runner: Runner) -> Experiment:
    s = setup(o, sizes)
    res = runner.run(make_tasks(o, sizes, s), "c")
    by = {(r["point"]["load"], r["point"]["cache_blocks"], r["point"]["layout"]): r
          for r in res}
    points = [cache_point(load, blocks, s.cap, by)
              for load in sizes.c_loads for blocks in sizes.c_cache_blocks]
    data = {"copies": sizes.c_copies, "plan": s.plan.to_dict(), "capacity_rps": s.cap,
            "scenario_construction": CONSTRUCTION,
            "templates": sizes.c_templates, "template_blocks": sizes.c_template_blocks,
            "plain_trace": {"mean_input": s.plain["mean_input"],
                            "prefix_hit_ratio": s.plain.get("prefix_hit_ratio")},
            "prefix_families_check": s.families,
            "scenarios": s.built, "points": points}
    return Experiment(data, describe(points, o, sizes, s),
                      partial(plot_c, points=points, o=o, sizes=sizes, plan=s.plan))


def family_check(base: Trace, copies: int) -> dict[str, Any]:
    """Do the trace's own prefix families make scenarios? (They do not: the evidence.)"""
    _, fam = tag_scenarios(base, "prefix", top_n=copies)
    fam_rows = {n: {"requests": int(v["requests"]), "share": v["share"],
                    "prefix_hit_ratio": v.get("prefix_hit_ratio")} for n, v in fam.items()}
    top = [v for n, v in fam_rows.items() if n != "other"]
    families_ok = bool(top) and min(float(v["share"] or 0) for v in top) >= 0.5 / copies
    return {"families_large_enough": families_ok, "top": fam_rows}


def setup(o: Options, sizes: Sizes) -> Setup:
    """The scenarios (rotated Mooncake copies with their own system prompts) and the plan of
    one group, sized on scenario s0's lengths without prefix caches."""
    prof = load_profile(o.profile, o.packed)
    base = mooncake_base(o, sizes)
    families = family_check(base, sizes.c_copies)
    merged = merged_mooncake(str(Path(o.traces) / MOONCAKE), o.max_model_len, o.block_tokens,
                             sizes.mooncake_limit, sizes.c_copies, sizes.c_templates,
                             sizes.c_template_blocks)
    built = {n: {"requests": int(v["requests"]), "prefix_hit_ratio": v.get("prefix_hit_ratio"),
                 "mean_input": v["mean_input"], "mean_output": v["mean_output"]}
             for n, v in scenario_summary(merged).items()}
    stats = LengthStats()
    for req in merged.requests:
        if req.scenario == "s0":
            stats.add(req)
    plain = scenario_summary(base)["default"]
    spec0 = instance_spec(o, 0, o.block_tokens)
    plan = plan_groups({"s": stats}, prof, spec0, o.gateway.rtt_s, sizes.c_budget,
                       o.min_per_role)["s"]
    cap = sizes.c_copies * min(plan.prefill_capacity, plan.decode_capacity)
    return Setup(merged, built, plain, families, plan, cap)


def make_tasks(o: Options, sizes: Sizes, s: Setup) -> list[Task]:
    """Per load and cache size: the scenarios as their own groups, and as one mixed pool."""
    copies, plan = sizes.c_copies, s.plan
    names = [f"s{j}" for j in range(copies)]
    tasks = []
    for load in sizes.c_loads:
        for blocks in sizes.c_cache_blocks:
            spec = instance_spec(o, blocks, o.block_tokens)
            for layout in LAYOUTS:
                groups_ = ([(n, plan.n_p, plan.n_d) for n in names] if layout == "groups"
                           else [("mixed", copies * plan.n_p, copies * plan.n_d)])
                w = Workload("mooncake", "mixed", load * s.cap, copies=copies,
                             mixed=layout == "mixed", templates=sizes.c_templates,
                             template_blocks=sizes.c_template_blocks, seed=o.seed)
                tasks.append(Task("c", (("load", load), ("cache_blocks", blocks),
                                        ("layout", layout)), w,
                                  sim_config(o, groups_, spec=spec), o, sizes,
                                  len(s.merged.requests) * (2 if layout == "mixed" else 1)))
    return tasks


def cache_point(load: float, blocks: int, cap: float,
                by: dict[tuple[float, int, str], dict[str, Any]]) -> dict[str, Any]:
    pt: dict[str, Any] = {"load": load, "offered_rps": load * cap, "cache_blocks": blocks}
    for layout in LAYOUTS:
        r = by[(load, blocks, layout)]
        m = r["metrics"]["overall"]
        pt[layout] = {"prefix_hit_rate": m["prefix_hit_rate"],
                      "ttft_p50_s": m["ttft_p50_s"], "ttft_p90_s": m["ttft_p90_s"],
                      "throughput_rps": m["throughput_rps"],
                      "ttft_attainment": m["ttft_attainment"], "run": compact(r)}
    return pt


def point_row(pt: dict[str, Any]) -> list[Any]:
    """groups / mixed side by side."""
    g, mx = pt["groups"], pt["mixed"]
    return [f"{pt['load']:g}", fmt(pt["offered_rps"], 1), pt["cache_blocks"],
            f"{100 * g['prefix_hit_rate']:.1f}% / {100 * mx['prefix_hit_rate']:.1f}%",
            f"{fmt(g['ttft_p50_s'], 3)} / {fmt(mx['ttft_p50_s'], 3)}",
            f"{fmt(g['ttft_p90_s'], 3)} / {fmt(mx['ttft_p90_s'], 3)}",
            f"{fmt(g['throughput_rps'], 1)} / {fmt(mx['throughput_rps'], 1)}",
            f"{100 * g['ttft_attainment']:.1f}% / {100 * mx['ttft_attainment']:.1f}%"]


def describe(points: Sequence[dict[str, Any]], o: Options, sizes: Sizes, s: Setup) -> str:
    copies, plan = sizes.c_copies, s.plan
    top = [v for n, v in s.families["top"].items() if n != "other"]
    text = table([point_row(pt) for pt in points],
                 ["load", "req/s", "cache blocks", "prefix hit (groups / mixed)",
                  "TTFT p50 s", "TTFT p90 s", "throughput req/s", "TTFT-SLO ok"])
    return text + (
        f"\n{copies} scenarios x {plan.n_p}P:{plan.n_d}D (groups) vs one pool of "
        f"{copies * plan.n_p}P:{copies * plan.n_d}D (mixed); load x {s.cap:.1f} req/s (planned "
        f"capacity without prefix hits); cache blocks of {o.block_tokens} tokens per prefill "
        f"instance. Scenarios: {copies} rotated copies of the Mooncake trace, merged (own "
        f"hash ids each), each with {sizes.c_templates} system prompts of "
        f"{sizes.c_template_blocks} blocks; infinite-cache hit ratio per scenario "
        f"{statistics.fmean(v['prefix_hit_ratio'] or 0 for v in s.built.values()):.3f} "
        f"(plain trace {s.plain.get('prefix_hit_ratio') or 0:.3f}). "
        f"Trace prefix families as scenarios: top {len(top)} hold "
        f"{sum(float(v['share'] or 0) for v in top):.1%} of requests"
        + (" (large enough, but this tool always uses the construction)"
           if s.families["families_large_enough"] else " (far too small to be scenarios)"))


def plot_c(path: Path, points: Sequence[dict[str, Any]], o: Options, sizes: Sizes,
           plan: Plan) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for load, ls in zip(sizes.c_loads, ("-", "--", ":", "-.")):
        pts = [p for p in points if p["load"] == load]
        x = [p["cache_blocks"] for p in pts]
        for layout, mark in (("groups", "o"), ("mixed", "s")):
            lab = f"{layout}, load {load:g}"
            axes[0].plot(x, [100 * p[layout]["prefix_hit_rate"] for p in pts], mark + ls,
                         label=lab)
            axes[1].plot(x, [p[layout]["ttft_p90_s"] or 0 for p in pts], mark + ls, label=lab)
            axes[2].plot(x, [p[layout]["throughput_rps"] for p in pts], mark + ls, label=lab)
    for ax, yl in zip(axes, ("prefix hit rate (% of computed prompt tokens)",
                             "TTFT p90 (s)", "throughput (req/s)")):
        ax.set_xscale("log", base=2)
        finish_axes(ax, f"prefix cache per prefill instance (blocks of {o.block_tokens} tokens)",
                    yl)
    fig.suptitle(f"{sizes.c_copies} scenario groups of {plan.n_p}P:{plan.n_d}D vs one mixed pool")
    save_figure(plt, fig, path)
