"""P/D-Serve's four results (issue E) reproduced with the simulator (pd_serve.sim), which drives
pd-serve's own policy code, on the demo model's CPU latency profile at cluster scale.

(a) ratio: every n_p:n_d split of a fixed budget per scenario, for a prefill-heavy mix (arXiv
    summarisation lengths) and a decode-heavy one (ShareGPT lengths), both scaled to the
    2,048-token context, Poisson arrivals; the planner's split (sim.plan.plan_groups, i.e.
    orchestrator.planner.plan_ratio on the profile) marked and compared with the others
    (gain over their mean, median, worst and best). Per split: throughput (finished
    requests/s in the steady-state window) under a saturating load (the same stream for every
    split), peak throughput and goodput over a load ladder (fractions of the split's modelled
    capacity, refined around the knee): goodput = the highest SLO-met completion rate among
    the loads whose SLO attainment (TTFT band and TPOT) reaches --attainment (the paper's
    throughput test: load raised until the success rate drops).
(b) gateway: TTFT-SLO success rate vs offered load for forwarding (on-demand, rejections) vs
    fifo (prefill-local queues, fewest open streams) vs round_robin, on the Mooncake
    conversation trace (hash-id blocks scaled 1/16, buckets spread, arrivals compressed to
    each rate) with per-prompt-length TTFT bands (the gateway's ttft_slo), several prefill
    instances, prefix caches on. Load in multiples of A, the highest rate at which fifo still
    has >= 99% success (calibrated first, as docs/benchmarks.md section 3 did).
(c) groups: per-scenario P/D groups vs one mixed pool with the same instances, prefill prefix
    caches limited (a sweep of capacities in hash blocks, as `sim run --prefix-cache-blocks`):
    prefix hit rate, TTFT p50/p90, throughput. The trace's own prefix families
    (bench.tagging.tag_scenarios) are far too small to be scenarios (the JSON records that
    check), so scenarios are built: rotated copies of the Mooncake trace merged with
    bench.tagging.merge_traces (each copy its own hash ids and conversations), each with its
    own shared system prompts (`with_templates`) in place of the trace-wide first block.
(d) aggregated: disaggregated (the planner's split) vs aggregated serving on the same number
    of instances, the mixes of (a): peak throughput and goodput on a load ladder, and their
    ratios.

Each experiment writes docs/results/sim_exp_<x>.json and .png (`--packed`: *_packed.*, the
what-if of a backend that packs mixed-length batches) and prints a table. Simulations are
deterministic (noise off by default); `--jobs N` runs them in N spawned processes with the
same results.

This file is the command line; the code lives beside it: sim_exp_common.py (sizes, options,
workloads), sim_exp_runs.py (tasks, metrics, the process pool), sim_exp_report.py (goodput,
JSON, tables, plot helpers) and sim_exp_a.py ... sim_exp_d.py (one experiment each).

    PYTHONPATH=. python tools/sim_experiments.py --jobs 16            # all four, full size
    PYTHONPATH=. python tools/sim_experiments.py --quick --only a     # seconds: smoke test
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent  # the sim_exp_* modules beside this file
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from sim_exp_a import exp_a  # noqa: E402
from sim_exp_b import exp_b  # noqa: E402
from sim_exp_c import exp_c  # noqa: E402
from sim_exp_common import (  # noqa: E402
    EXPERIMENTS,
    MOONCAKE,
    QUICK,
    ROOT,
    Options,
    Sizes,
    parse_bands,
)
from sim_exp_d import exp_d  # noqa: E402
from sim_exp_report import Experiment, dumps, rounded  # noqa: E402
from sim_exp_runs import Runner  # noqa: E402

from pd_serve.sim.config import GatewaySpec, InstanceSpec  # noqa: E402
from pd_serve.sim.summary import clean  # noqa: E402

RUNNERS: dict[str, Callable[[Options, Sizes, Runner], Experiment]] = {
    "a": exp_a, "b": exp_b, "c": exp_c, "d": exp_d}
TITLES = {"a": "throughput vs P/D ratio and the planner's choice",
          "b": "TTFT-SLO success vs offered load: forwarding vs fifo vs round_robin",
          "c": "per-scenario groups vs one mixed pool under limited prefix caches",
          "d": "disaggregated vs aggregated at equal instance count"}


# ---------------------------------------------------------------------------------------------
# Main


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                    .splitlines() if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=False).stdout.strip()
    except OSError:
        return ""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="P/D-Serve's four results (issue E) with the simulator "
                                "at scale: writes docs/results/sim_exp_<x>.{json,png}")
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS),
                   help="experiments to run (default all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds per experiment")
    p.add_argument("--jobs", type=int, default=1, help="simulations run in parallel")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--profile", type=Path,
                   default=ROOT / "docs" / "results" / "sim_profile_cpu_torch.json")
    p.add_argument("--traces", type=Path, default=None,
                   help="shared/traces folder (default ../shared/traces or ./shared/traces)")
    p.add_argument("--ttft-bands", default="512:2,1024:3,*:4",
                   help="TTFT SLO (and gateway deadline) per prompt length: tokens:seconds,...")
    p.add_argument("--tpot-slo-s", type=float, default=0.15)
    p.add_argument("--attainment", type=float, default=0.99,
                   help="SLO attainment a goodput point needs")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--block-tokens", type=int, default=32,
                   help="Mooncake: tokens per 512-token hash block after scaling")
    p.add_argument("--min-per-role", type=int, default=2, help="planner's floor per role")
    p.add_argument("--noise-cv", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packed", action="store_true",
                   help="what-if: refit the profile's prefill/decode models in packed form (no "
                        "padding of mixed-length batches); writes sim_exp_<x>_packed.*")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def traces_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    for cand in (ROOT.parent / "shared" / "traces", ROOT / "shared" / "traces"):
        if (cand / MOONCAKE).exists():
            return cand
    raise SystemExit("shared/traces not found: pass --traces")


def options_of(args: argparse.Namespace) -> Options:
    return Options(profile=str(args.profile), traces=str(traces_dir(args.traces)),
                   bands=parse_bands(args.ttft_bands), tpot_slo_s=args.tpot_slo_s,
                   attainment=args.attainment,
                   targets=tuple(sorted({args.attainment, 0.99, 0.95, 0.9}, reverse=True)),
                   packed=args.packed, max_model_len=args.max_model_len,
                   block_tokens=args.block_tokens, min_per_role=args.min_per_role,
                   noise_cv=args.noise_cv, seed=args.seed, warmup=0.2,
                   instance=InstanceSpec(b_p=4, max_num_seqs=16, max_num_batched_tokens=2048,
                                         kv_blocks=4096, block_size=16),
                   gateway=GatewaySpec(rtt_s=0.001, retry_interval_s=0.02))


def options_report(o: Options) -> dict[str, Any]:
    return {"ttft_bands": [[b.max_prompt_tokens, b.deadline_s] for b in o.bands],
            "tpot_slo_s": o.tpot_slo_s, "attainment": o.attainment,
            "attainment_targets": list(o.targets), "packed": o.packed,
            "max_model_len": o.max_model_len,
            "block_tokens": o.block_tokens,
            "min_per_role": o.min_per_role, "noise_cv": o.noise_cv,
            "seed": o.seed, "warmup_share": o.warmup,
            "instance": asdict(o.instance), "gateway": asdict(o.gateway)}


def run_one(name: str, args: argparse.Namespace, o: Options, sizes: Sizes, runner: Runner,
            command: str) -> None:
    """Runs experiment `name`, writes its JSON (and PNG) and prints its table."""
    print(f"== ({name}) {TITLES[name]}", flush=True)
    t0, ev0, cpu0 = time.perf_counter(), runner.events, runner.sim_s
    exp = RUNNERS[name](o, sizes, runner)
    wall = time.perf_counter() - t0
    profile = Path(o.profile).resolve()
    report = {"experiment": name, "title": TITLES[name],
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": command, "git_commit": git_commit(), "machine": machine(),
              "quick": args.quick, "jobs": args.jobs,
              "wall_s": wall, "sim_events": runner.events - ev0,
              "sim_cpu_s": runner.sim_s - cpu0,
              "profile": str(profile.relative_to(ROOT) if profile.is_relative_to(ROOT)
                             else o.profile),
              "options": options_report(o),
              "sizes": asdict(sizes), "table": exp.text} | exp.data
    stem = f"sim_exp_{name}" + ("_packed" if args.packed else "")
    out = args.out_dir / f"{stem}.json"
    out.write_text(dumps(rounded(clean(report))) + "\n")
    print(exp.text)
    if not args.no_plot:
        exp.plot(args.out_dir / f"{stem}.png")
    print(f"({name}) {wall:.1f} s wall, {runner.events - ev0:,} events; wrote {out}\n",
          flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    o = options_of(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.jobs)
    command = " ".join(["python", "tools/sim_experiments.py", *(argv if argv is not None
                                                               else sys.argv[1:])])
    try:
        for name in args.only:
            run_one(name, args, o, sizes, runner, command)
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
