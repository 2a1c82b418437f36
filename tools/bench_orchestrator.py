"""Orchestrator benchmark: (A) saturated throughput at the planner's P/D ratio vs every other
split of a fixed instance budget, for two prompt/output mixes; (B) recovery after kill -9 of a
decode or prefill instance under light load (tools/bench_orchestrator_recovery.py). Every
deployment is a LocalDeployment (the orchestrator with its embedded registry, stateless
instances, the gateway; `pd-serve up`), built by tools/bench_orchestrator_lib.py.

A, per scenario: lengths sampled (seeded, with replacement) from a real length table scaled by
`--scale` (ceil; input cut so input + output <= the 2,048 context): `summarise` = arXiv
summarisation, `chat` = ShareGPT after vLLM's filter (prompt <= 1024, total <= 2048, both >= 4).
A deployment starts at 1P:1D with budget-2 spares; POST /scenarios/{name}/profile profiles it
(prompt/output = the mix's means, b_p = pd.b_p, b_d = max_num_seqs, min_per_role 1) and plans the
budget; a cross-check times bursts of b_p prefill-only prompts (T_p as a burst makespan) and
plans with that T_p too. Then for every n_p:n_d with n_p + n_d = budget (POST
/scenarios/{name}/ratio; the orchestrator re-roles in place; wait until /status lists the split
and everything is idle): a closed loop of C concurrent streams (C = max over the splits of
n_p*b_p + n_d*b_d, plus b_p: every prefill slot and decode batch place of the roomiest split busy
and b_p waiting at the gateway; the same C for every split) for `--warmup-s`, then `--measure-s`
measured: completed req/s, output tokens streamed in the window, TTFT/TPOT p50/p90, the CPU each
process used (from /proc) and every process's /stats at mid-window. The planner's split is
measured again last (`--no-repeat` skips it).

B: 1P:1D plus `--spares`, an open loop of fixed-length requests at `--rate`; after `--steady-s`
the instance of one role is SIGKILLed; the orchestrator's recovery event (reason, detection,
replacement, recovery_s), the replacement's load (its /stats polled), and the client's view
(failed in-flight requests and their errors, time to the first new request served) are recorded.
A fresh deployment per trial.

`--pin` puts each instance, the gateway and the orchestrator on a core of its own (when there
are enough; the client gets the rest). The shared length tables are read from `--traces`
(default: ../shared/traces beside the checkout).

    python tools/bench_orchestrator.py [--quick] [--parts ratio,recovery] [--budget 4] \
        [--pin] [--logs DIR] [--out docs/results/orchestrator]  # PREFIX_{ratio,recovery}.{json,png}
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_orchestrator_lib import (
    MIXES,
    ROOT,
    TRACES,
    Deployment,
    Rec,
    closed_loop,
    load_mix,
    machine,
    prompt,
    secs,
    send,
    stream_client,
    window_stats,
)
from bench_orchestrator_recovery import plot_recovery, recovery_summary, recovery_trial

from pd_serve.orchestrator import perf_model as pm
from pd_serve.orchestrator.perf_model import ScenarioProfile
from pd_serve.orchestrator.planner import plan_ratio, plan_table

# -- part A: throughput per split -----------------------------------------------------------------

def profile_and_plan(dep: Deployment, args: argparse.Namespace,
                     mix: dict[str, Any]) -> dict[str, Any]:
    body = {"prompt_tokens": round(mix["input"]["mean"]),
            "output_tokens": max(3, round(mix["output"]["mean"])), "b_p": args.b_p,
            "b_d": args.b_d, "decode_instances": 1, "repeats": args.profile_repeats,
            "budget": args.budget, "apply": False}
    t = time.perf_counter()
    r = httpx.post(f"{dep.orch}/scenarios/{dep.scenario}/profile", json=body, timeout=1800.0)
    if r.status_code != 200:
        raise RuntimeError(f"profile failed: HTTP {r.status_code} {r.text[:500]}")
    out = dict(r.json())
    out["request"], out["profile_wall_s"] = body, time.perf_counter() - t
    return out


async def _bursts(url: str, scenario: str, n_in: int, b: int, repeats: int) -> list[float]:
    """`repeats` bursts of `b` prefill-only requests sent at once; each burst's makespan (its
    last TTFT)."""
    spans = []
    async with stream_client() as client:
        for k in range(repeats):
            recs = [Rec(time.perf_counter()) for _ in range(b)]
            await asyncio.gather(*(send(client, url, scenario, prompt(10**6 + k * b + j, n_in, 7),
                                        1, r) for j, r in enumerate(recs)))
            if not all(r.ok and r.first for r in recs):
                raise RuntimeError(f"makespan burst failed: {[r.error for r in recs]}")
            spans.append(max(r.first - r.sent for r in recs if r.first))
    return spans


def makespan_model(dep: Deployment, args: argparse.Namespace, profile: ScenarioProfile,
                   n_in: int) -> dict[str, Any]:
    """Cross-check of the profiler's T_p: the profile with T_p(b_p) replaced by the measured
    makespan of a burst of b_p prompts (the time one instance needs to prefill b_p requests),
    its plan and its capacity per split."""
    spans = asyncio.run(_bursts(dep.dep.url, dep.scenario, n_in, args.b_p, args.profile_repeats))
    fixed = dataclasses.replace(profile, ttft_by_batch={args.b_p: float(np.mean(spans))},
                                r_pre=1.0)
    return {"burst_makespans_s": spans, "t_p_makespan_s": float(np.mean(spans)),
            "t_p_profiler_s": pm.t_p(profile), "plan": plan_ratio(fixed, args.budget,
                                                                   min_per_role=1).to_dict(),
            "splits": {s.n_p: s.to_dict() for s in plan_table(fixed, args.budget, min_per_role=1)
                       if s.n_p + s.n_d == args.budget}}


def ratio_scenario(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rows, mix = load_mix(name, args.traces, args.scale)
    sample = [rows[i] for i in np.random.default_rng(args.seed).integers(0, len(rows), 20000)]
    print(f"[{name}] input mean {mix['input']['mean']:.0f} (max {mix['input']['max']}), output "
          f"mean {mix['output']['mean']:.0f} (max {mix['output']['max']}), x{args.scale:g}, "
          f"{mix['inputs_cut']} inputs cut", flush=True)
    dep = Deployment(tmp / name, args, name, 1, 1, args.budget - 2, args.kv_blocks)
    try:
        dep.start(args.start_timeout_s)
        prof = profile_and_plan(dep, args, mix)
        profile = ScenarioProfile.from_dict(prof["profile"])
        plan = prof["plan"]
        model = {s.n_p: s for s in plan_table(profile, args.budget, min_per_role=1)
                 if s.n_p + s.n_d == args.budget}
        check = makespan_model(dep, args, profile, prof["request"]["prompt_tokens"])
        print(f"[{name}] profiled in {prof['profile_wall_s']:.0f} s; plan {plan['n_p']}:"
              f"{plan['n_d']} ({plan['reason']}); T_p(b_p) profiler {check['t_p_profiler_s']:.3f}"
              f" s, burst makespan {check['t_p_makespan_s']:.3f} s -> plan "
              f"{check['plan']['n_p']}:{check['plan']['n_d']}", flush=True)
        conc = args.concurrency or max(n_p * args.b_p + (args.budget - n_p) * args.b_d
                                       for n_p in model) + args.b_p
        order = sorted(model) + ([plan["n_p"]] if args.repeat else [])
        points = [measure_split(dep, args, sample, n_p, conc, k, model[n_p].to_dict(),
                                check["splits"][n_p]) for k, n_p in enumerate(order)]
    finally:
        dep.stop()
    return {"scenario": name, "mix": mix, "profile": prof["profile"], "plan": plan,
            "profile_request": prof["request"], "profile_wall_s": prof["profile_wall_s"],
            "makespan_check": check, "concurrency": conc, "points": points,
            "pinning": dep.cores, "affinity": dep.affinity,
            "summary": ratio_summary(points, plan)}


def measure_split(dep: Deployment, args: argparse.Namespace, sample: list[tuple[int, int]],
                  n_p: int, conc: int, k: int, model: dict[str, Any],
                  model_makespan: dict[str, Any]) -> dict[str, Any]:
    n_d = args.budget - n_p
    t = time.perf_counter()
    dep.set_split(n_p, n_d)
    dep.wait_idle()
    switch_s = time.perf_counter() - t
    load0 = os.getloadavg()[0]
    mid: list[dict[str, Any]] = []
    probe = threading.Timer(args.warmup_s + args.measure_s / 2,
                            lambda: mid.append(dep.snapshot()))
    probe.start()
    recs, t0, cores = asyncio.run(closed_loop(dep.dep.url, dep.scenario, sample, conc,
                                              args.warmup_s, args.measure_s, k, dep.pids()))
    probe.join()
    st = window_stats(recs, t0, args.measure_s)
    roles = {i["id"]: i["role"] for i in dep.status()["instances"]}
    by_role: dict[str, float] = {}
    for proc, c in cores.items():
        key = roles.get(proc) or proc
        by_role[key] = by_role.get(key, 0.0) + c
    res = {"split": f"{n_p}:{n_d}", "n_p": n_p, "n_d": n_d, "run": k, **st,
           "model": model, "model_makespan": model_makespan, "switch_s": switch_s,
           "cores": cores, "cores_by_role": by_role, "mid_window_stats": mid,
           "loadavg_before": load0, "loadavg_after": os.getloadavg()[0]}
    print(f"  {n_p}:{n_d}  {st['req_per_s']:5.2f} req/s  {st['streamed_tok_per_s']:5.0f} tok/s "
          f"streamed  TTFT p50 {secs(st['ttft_p50_s'])}  TPOT p50 {secs(st['tpot_p50_s'])}  "
          f"model "
          f"{model['bottleneck_capacity']:5.2f} / {model_makespan['bottleneck_capacity']:5.2f} "
          f"req/s  failed {st['failed']}  cores "
          + " ".join(f"{k}={v:.2f}" for k, v in sorted(by_role.items())), flush=True)
    if not st["streamed_tok_per_s"]:
        print(f"warning: nothing streamed in the window; mid-window stats: {mid}",
              file=sys.stderr)
    dep.wait_idle()
    return res


def ratio_summary(points: list[dict[str, Any]], plan: dict[str, Any]) -> dict[str, Any]:
    """The planner's split (first measurement) against the other splits, measured."""
    first: dict[int, dict[str, Any]] = {}
    for p in points:
        first.setdefault(p["n_p"], p)
    chosen = first[plan["n_p"]]
    others = [p for n, p in first.items() if n != plan["n_p"]]
    best = max(first.values(), key=lambda p: p["streamed_tok_per_s"])
    out: dict[str, Any] = {"planner_split": chosen["split"], "best_measured": best["split"],
                           "planner_is_best": best is chosen}
    for key in ("req_per_s", "out_tok_per_s", "streamed_tok_per_s"):
        v, o = chosen[key], [p[key] for p in others]
        ref = {"best_other": max(o), "worst_other": min(o), "mean_other": float(np.mean(o))}
        out[key] = {"planner": v, **ref, **{f"gain_vs_{k[:-6]}": _gain(v, x)
                                            for k, x in ref.items()}}
    repeats = [p for p in points if p["n_p"] == plan["n_p"]]
    out["planner_repeats_req_per_s"] = [p["req_per_s"] for p in repeats]
    return out


def _gain(v: float, ref: float) -> float | None:
    """v / ref - 1 (None when ref is 0)."""
    return v / ref - 1 if ref else None


# -- results --------------------------------------------------------------------------------------

def plot_ratio(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        first: dict[int, dict[str, Any]] = {}
        for p in run["points"]:
            first.setdefault(p["n_p"], p)
        pts = [first[n] for n in sorted(first)]
        x = np.arange(len(pts))
        out = run["mix"]["output"]["mean"]
        ax.bar(x, [p["streamed_tok_per_s"] / out for p in pts],
               color=["tab:orange" if p["n_p"] == run["plan"]["n_p"] else "tab:blue"
                      for p in pts], label="measured: streamed tok/s / mean output "
                                           "(orange: planner's split)")
        ax.plot(x, [p["req_per_s"] for p in pts], "ko", label="measured: completed req/s")
        ax.plot(x, [p["model"]["bottleneck_capacity"] for p in pts], "r^--",
                label="model, profiler's T_p")
        ax.plot(x, [p["model_makespan"]["bottleneck_capacity"] for p in pts], "gv:",
                label="model, burst-makespan T_p")
        ax.set_xticks(x, [p["split"] for p in pts])
        ax.set_xlabel("n_p : n_d")
        ax.set_ylabel("requests/s")
        ax.set_title(f"{run['scenario']}: in {run['mix']['input']['mean']:.0f} / out "
                     f"{out:.0f} tokens (mean)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=lambda s: s.split(","), default=["ratio", "recovery"])
    ap.add_argument("--scenarios", type=lambda s: s.split(","), default=list(MIXES))
    ap.add_argument("--traces", type=Path, default=TRACES)
    ap.add_argument("--scale", type=float, default=0.5, help="length scale factor (ceil)")
    ap.add_argument("--budget", type=int, default=4, help="instances of the P/D group")
    ap.add_argument("--b-p", type=int, default=4, help="prefill slots per instance (pd.b_p)")
    ap.add_argument("--b-d", type=int, default=16, help="decode batch (scheduler.max_num_seqs)")
    ap.add_argument("--kv-blocks", type=int, default=8192, help="16-token KV blocks per instance")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="model threads per instance")
    ap.add_argument("--pin", action="store_true", help="one core per instance, gateway, "
                    "orchestrator (when enough cores); the bench client gets the rest")
    ap.add_argument("--concurrency", type=int, default=None, help="closed-loop streams")
    ap.add_argument("--warmup-s", type=float, default=15.0)
    ap.add_argument("--measure-s", type=float, default=30.0)
    ap.add_argument("--profile-repeats", type=int, default=2)
    ap.add_argument("--no-repeat", dest="repeat", action="store_false",
                    help="do not measure the planner's split a second time")
    ap.add_argument("--ttft-deadline-s", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=3, help="recovery trials per role")
    ap.add_argument("--roles", type=lambda s: s.split(","), default=["decode", "prefill"])
    ap.add_argument("--spares", type=int, default=1)
    ap.add_argument("--rate", type=float, default=4.0, help="recovery load, requests/s")
    ap.add_argument("--rec-prompt", type=int, default=256, help="recovery prompt tokens")
    ap.add_argument("--rec-output", type=int, default=64, help="recovery output tokens")
    ap.add_argument("--rec-kv-blocks", type=int, default=1024,
                    help="KV blocks per instance in part B (configs/deploy/local-pd.yaml's)")
    ap.add_argument("--steady-s", type=float, default=5.0)
    ap.add_argument("--after-s", type=float, default=4.0, help="load kept after recovery")
    ap.add_argument("--recovery-timeout-s", type=float, default=90.0)
    ap.add_argument("--start-timeout-s", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: short windows, 1 trial")
    ap.add_argument("--logs", type=Path, default=None,
                    help="keep every process's log (and config) under this folder")
    ap.add_argument("--out", type=Path, default=None,
                    help="prefix: writes PREFIX_ratio.json/.png, PREFIX_recovery.json/.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup_s, args.measure_s, args.trials, args.repeat = 6.0, 10.0, 1, False
        args.profile_repeats, args.steady_s, args.after_s = 1, 3.0, 2.0
    if args.budget < 2 or any(s not in MIXES for s in args.scenarios):
        ap.error(f"--budget must be >= 2 and --scenarios a subset of {list(MIXES)}")
    return args


def _portable(path: Path) -> str:
    """`path` relative to the checkout when inside it, else its name (no machine prefix)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def write(args: argparse.Namespace, part: str, result: dict[str, Any]) -> None:
    if args.out is None:
        return
    path = Path(f"{args.out}_{part}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["traces"] = "shared/traces"
    for key in ("out", "logs"):
        if getattr(args, key) is not None:
            settings[key] = _portable(getattr(args, key))
    base = {"command": " ".join(["python", *sys.argv]), "machine": machine(args),
            "settings": settings}
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as scratch:
        tmp = str(args.logs or scratch)
        if "ratio" in args.parts:
            t = time.time()
            runs = [ratio_scenario(s, args, Path(tmp)) for s in args.scenarios]
            write(args, "ratio", {**base, "part": "ratio", "duration_s": time.time() - t,
                                  "loadavg_end": os.getloadavg(), "scenarios": runs})
            if args.out:
                plot_ratio(runs, Path(f"{args.out}_ratio.png"))
        if "recovery" in args.parts:
            t = time.time()
            trials = [recovery_trial(role, k, args, Path(tmp)) for role in args.roles
                      for k in range(args.trials)]
            write(args, "recovery", {**base, "part": "recovery", "duration_s": time.time() - t,
                                     "loadavg_end": os.getloadavg(),
                                     "summary": recovery_summary(trials), "trials": trials})
            if args.out:
                plot_recovery(trials, Path(f"{args.out}_recovery.png"))


if __name__ == "__main__":
    main()
