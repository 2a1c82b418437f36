"""Simulator validation: the same trace and deployment run for real here and in `pd-serve sim`;
TTFT p50/p90, TPOT p50 and throughput compared per offered rate (each must be within
`--tolerance`, 15 % by default).

Real side: a static deployment of the demo model (torch backend, one thread per instance):
1 decode instance, 1 prefill instance peered with it, 1 gateway, each a `python -m pd_serve`
process (config in a temp dir; prefix caching off, because `pd-serve bench run` synthesises the
same prompt for the same request index in every run and the workload has no shared prefixes).
Workload: ShareGPT lengths (first N rows) times `--scale-factor` (the 8k-filtered lengths
to the demo model's 2,048 context), Poisson arrivals, temperature 0, ignore_eos (exact output
lengths), sent by `pd-serve bench run --save-requests`.

Steps (one process, about 10 minutes on the 2-core VM; `--quick`: about 3):
1. before every measurement (probes, capacity, each rate) wait while a `bench_orchestrator`
   process (or anything named in `--wait-for`, e.g. `pytest`) runs: poll every 30 s, at most
   15 min, then go ahead; the load average is recorded before and after each;
2. start the deployment; calibration probes on it, each a small workload sent with the bench
   client (pd_serve.bench.client), never the validation requests:
   * bare RTT: GET /health of the prefill instance;
   * first-token path: lone prompts of 16 and 64 tokens with one output token; TTFT minus the
     simulated TTFT at RTT 0 (the profile's prefill time) is the round trip as the simulator
     defines it (TTFT of a lone request = prefill + RTT): HTTP, JSON and SSE through gateway
     and prefill instance, in Python. Used as `--rtt-ms`;
   * per-step decode overhead: B = 1, 2, 4, 8, 16 requests of 64 prompt tokens and 128
     outputs sent at once; the mean inter-token gap while all B decode (TPOT is a mean of gaps)
     minus the profile's step time is what the runner profile does not see (scheduler,
     sampler, one SSE event per token sharing the decode process's GIL, OS jitter); fitted as
     a + b*B (relative error, non-negative) and added to the decode model;
   * profile check: lone prefills of 256, 512 and 1,024 tokens and a batch of 16 at context
     ~1,100 against the profile; off by more than the tolerance: `pd-serve sim profile` is
     rerun (threads 1) into docs/results/sim_profile_cpu_torch_validate.json;
   * co-location at the workload's operating point: a decode batch of 2 x (256 prompt, 600
     output) alone and while prefill-only requests of 16 and 512 tokens (in turn) run back to
     back. The decode step slowdown is f_d; under decode load TTFT(n) = rtt_loaded + f_p x
     prefill(n): the short prompt gives the additive delay (event loops and SSE relays busy
     with the decode stream), the long one the compute slowdown f_p. Both instances, the
     gateway and the client share the 2 cores; a profile measured in isolation sees none of it;
   the decode and co-location probes are repeated until two repetitions agree within
   `--tolerance` (at most 4 tries; tools/validate_sim_checks.py), else the session is flagged;
3. capacity: a closed loop (`--max-concurrency 20`) of the workload; the rates are `--loads` of it;
4. `--repeats` rounds (2 by default) over the rates: `pd-serve bench run` per rate (load
   average and CPU per process recorded); every repeat of a rate sends the same requests at the
   same times, so their spread is the real system's own; then the probes again, and the drift
   of the probe times and calibrated terms from before to after is reported (`drift`; beyond
   `--tolerance` the session is flagged in `flags`);
5. per rate: `pd-serve sim run` with the same workload options and seed, `--groups 1:1`, the
   same instance shape and `--vllm-metrics`, three times: *raw* (the profile as is, `--rtt-ms`
   = bare RTT), *host* (decode overhead added, RTT of the first-token path, both instances on
   one shared host of the simulator: a step stretches by f_p or f_d only while the other
   instance computes) and *mean field* (the earlier approximation, kept for comparison: every
   step scaled by the mean slowdown, iterated to a fixed point). Each is compared with the mean
   of the real repeats and with every repeat (tools/validate_sim_analyse.py). Nothing is
   fitted to the validation runs;
6. per real run, three more simulations whose step models come from the deployment's step
   traces (`server.step_trace_dir`; tools/validate_sim_inrun.py): *held_out* (the verdict:
   the steps of every other run), *other_rates* (the runs at the other rates only) and
   *inrun* (the run's own steps: what the simulator adds to given step times).

    python tools/validate_sim.py [--quick] [--out docs/results/sim_validation.json]
    python tools/validate_sim.py --reuse WORK/real.json   # analysis only, on saved real runs

Modules: this file is the CLI and driver (measure, report); tools/validate_sim_lib.py the
deployment, the bench/sim subprocesses and the wait for other runs;
tools/validate_sim_probes.py the calibration probes on the deployment;
tools/validate_sim_calibrate.py the fits from the probes and the calibrated simulations;
tools/validate_sim_analyse.py the comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from validate_sim_analyse import analyse, print_table, scrub
from validate_sim_calibrate import calibrate
from validate_sim_lib import (
    CONTEXT,
    PROFILE,
    PY,
    ROOT,
    SHAPE,
    TRACE,
    Deployment,
    bench,
    cmdline,
    compact,
    load_avg,
    others,
    reprofile,
    wait_for_other_bench,
    workload_args,
)
from validate_sim_probes import run_probes
from validate_sim_replay import print_replay, replay_all

from pd_serve.sim.latency import LatencyProfile

# ----- the real measurements -------------------------------------------------------------------

def quiet(args: argparse.Namespace, waits: dict[str, Any], label: str) -> None:
    """Before every measurement: no other benchmark or test run may be running."""
    waits[label] = wait_for_other_bench(args.max_wait_s, args.wait_for)
    waits[label]["load_avg"] = load_avg()


def measure(args: argparse.Namespace, work: Path, base: LatencyProfile) -> dict[str, Any]:
    """Every real measurement; saved to WORK/real.json."""
    waits: dict[str, Any] = {}
    real: dict[str, Any] = {"waits": waits, "command": cmdline([PY, *sys.argv]),
                            "started": datetime.datetime.now(datetime.UTC).isoformat(
                                timespec="seconds")}
    quiet(args, waits, "start")
    real["load_avg_start"] = load_avg()
    dep = Deployment(work)
    try:
        real["step_trace_dir"] = str(dep.step_trace_dir)
        real["deployment"] = {"config": dep.config, "processes": [
            " ".join(p.proc.args[2:]) if isinstance(p.proc.args, list) else str(p.proc.args)
            for p in dep.procs]}
        real.update(measure_probes(dep, args, waits, base))
        real["capacity"] = measure_capacity(dep, args, work, waits)
        capacity = real["capacity"]["req_per_s"]
        print(f"capacity {capacity:.3f} req/s", flush=True)
        # rounds over every rate (not every rate twice in a row): a slow drift of the machine
        # then spreads over the rates instead of biasing one
        real["runs"] = [measure_rate(dep, args, work, waits, load, capacity,
                                     f"load{load:g}-r{rnd + 1}")
                        for rnd in range(args.repeats) for load in args.loads]
        # the probes again: their drift over the runs says whether the calibration still held
        quiet(args, waits, "probes_after")
        try:
            real["probes_after"] = run_probes(dep, args.quick, args.tolerance)
        except (RuntimeError, ValueError, OSError) as e:  # keep the runs: they are the result
            real["probes_after_error"] = repr(e)
        real["probes_after_disturbed_by"] = others(args.wait_for)
    finally:
        dep.stop()
    real["load_avg_end"] = load_avg()
    return real


def measure_probes(dep: Deployment, args: argparse.Namespace, waits: dict[str, Any],
                   base: LatencyProfile) -> dict[str, Any]:
    """The calibration probes; `pd-serve sim profile` rerun when `--reprofile` asks for it."""
    quiet(args, waits, "probes")
    t0 = time.monotonic()
    out: dict[str, Any] = {"probes": run_probes(dep, args.quick, args.tolerance)}
    out["probes_wall_s"] = round(time.monotonic() - t0, 1)
    out["probes_load_avg_after"] = load_avg()
    out["probes_disturbed_by"] = others(args.wait_for)
    print(f"probes done in {out['probes_wall_s']} s", flush=True)
    check = calibrate(out["probes"], base)["profile_check"]
    if args.reprofile == "always" or (args.reprofile == "auto" and max(
            abs(check["prefill_rel_err"]), abs(check["decode_rel_err"])) > args.tolerance):
        out["reprofile"] = reprofile()
    return out


def measure_capacity(dep: Deployment, args: argparse.Namespace, work: Path,
                     waits: dict[str, Any]) -> dict[str, Any]:
    """`--capacity`, or the throughput of a closed loop (`--max-concurrency 20`)."""
    if args.capacity:
        return {"req_per_s": args.capacity, "source": "--capacity"}
    n = 30 if args.quick else 60
    quiet(args, waits, "capacity")
    cap = bench(dep, [*workload_args(None, n, args.seed, args.scale_factor),
                      "--max-concurrency", "20"], work / "capacity.json", "capacity")
    return {"req_per_s": cap["metrics"]["request_throughput"],
            "source": "closed loop, --max-concurrency 20", **cap}


def measure_rate(dep: Deployment, args: argparse.Namespace, work: Path, waits: dict[str, Any],
                 load: float, capacity: float, label: str) -> dict[str, Any]:
    """One offered rate (`load` x capacity), redone once if another run started during it."""
    rate = load * capacity
    n = max(args.min_requests, round(rate * args.window_s))
    wl = workload_args(rate, n, args.seed, args.scale_factor)
    for attempt in range(2):
        quiet(args, waits, label if not attempt else f"{label}-redo")
        t_start = time.time()
        res = bench(dep, wl, work / f"real_{label}.json", label)
        res.update(t_start=t_start, t_end=time.time())  # the run's steps in the step traces
        res["disturbed_by"] = others(args.wait_for)
        if not res["disturbed_by"]:
            break
        print(f"{label}: {res['disturbed_by']} started during the run", flush=True)
    m = res["metrics"]
    print(f"{label}: {rate:.3f} req/s x {n}: TTFT p50 {m['median_ttft_ms']:.0f} ms, "
          f"p90 {m['p90_ttft_ms']:.0f} ms, TPOT p50 {m['median_tpot_ms']:.1f} ms, "
          f"{m['request_throughput']:.3f} req/s, failed {m['failed']}, load "
          f"{res['load_avg_after']}", flush=True)
    return {"label": label, "load": load, "rate": rate, "requests": n, "workload_args": wl,
            **res, "per_request": compact(json.loads(Path(res["result"]).read_text()))}


# ----- CLI ------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "sim_validation.json")
    ap.add_argument("--work", type=Path, help="where raw results go (default: a temp dir)")
    ap.add_argument("--reuse", type=Path, help="WORK/real.json of an earlier run: analysis only")
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.3, 0.6, 0.85], help="fractions of the measured capacity")
    ap.add_argument("--capacity", type=float, help="req/s (skips the closed-loop measurement)")
    ap.add_argument("--window-s", type=float, default=110.0,
                    help="requests per rate = max(--min-requests, rate x this)")
    ap.add_argument("--min-requests", type=int, default=60)
    ap.add_argument("--scale-factor", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=2,
                    help="real runs per rate (same requests, same arrival times), in rounds "
                         "over the rates; the simulator is compared with their mean and each")
    ap.add_argument("--reprofile", choices=("auto", "always", "never"), default="auto")
    ap.add_argument("--max-wait-s", type=float, default=900.0)
    ap.add_argument("--wait-for", type=lambda v: v.split(","), default=["bench_orchestrator"],
                    help="wait while a process with one of these in its command line runs")
    ap.add_argument("--quick", action="store_true", help="smoke run (about 3 minutes)")
    args = ap.parse_args()
    if args.quick:
        args.loads, args.window_s, args.min_requests, args.repeats = [0.3, 0.85], 25.0, 15, 1
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    # SIGTERM (and SIGINT, which a background job may ignore) stop the deployment cleanly
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    work = args.work or Path(tempfile.mkdtemp(prefix="validate_sim_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    started = datetime.datetime.now(datetime.UTC)
    if args.reuse:
        real = json.loads(args.reuse.read_text())
    else:
        real = measure(args, work, LatencyProfile.load(PROFILE))
        (work / "real.json").write_text(json.dumps(real, indent=1))
    result = analyse(real, args.tolerance, work)
    print_table(result["rows"], args.tolerance)
    for flag in result["flags"]:
        print(f"FLAG {flag}", flush=True)
    if any(work.glob("real_load*.json")):  # the bench results with per-token times
        result["replay"] = replay_all(work, real)
        print_replay(result["replay"])
    out = scrub(output(args, started, real, result), machine_paths(real, work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


def output(args: argparse.Namespace, started: datetime.datetime, real: dict[str, Any],
           result: dict[str, Any]) -> dict[str, Any]:
    """The result file (schema pd-serve/sim-validation/v2, docs/benchmarks.md section 7)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    out = {"schema": "pd-serve/sim-validation/v2",
           "date": started.isoformat(timespec="seconds"), "commit": commit,
           "command": cmdline([PY, *sys.argv]),
           "machine": {"cpu": platform.processor() or _cpu_name(), "cores": os.cpu_count(),
                       "python": platform.python_version(), "platform": platform.platform()},
           "tolerance": args.tolerance, "shape": SHAPE,
           "workload": {"trace": str(TRACE.relative_to(ROOT.parent)),
                        "scale_factor": args.scale_factor, "max_model_len": CONTEXT,
                        "arrival": "poisson", "seed": args.seed, "temperature": 0,
                        "ignore_eos": True},
           "real": {k: v for k, v in real.items() if k not in ("runs",)}, **result}
    out["real"]["runs"] = [{k: v for k, v in r.items() if k != "result"} for r in real["runs"]]
    return out


def machine_paths(real: dict[str, Any], work: Path) -> list[tuple[str, str]]:
    """(path prefix, replacement) pairs that make the result file free of this machine's
    paths: work dirs (this analysis's and the measuring run's) become WORK, checkouts (this
    one and the one that measured, if elsewhere) repository-relative, their parents ../."""
    procs = " ".join(real.get("deployment", {}).get("processes", []))
    works = {str(work), *re.findall(r"--config (\S+)/pd\.yaml", procs)}
    roots = {str(ROOT)}
    model = real.get("deployment", {}).get("config", {}).get("model", {}).get("path")
    if model:
        roots.add(str(Path(model).parents[1]))
    pairs = [p for w in sorted(works, key=len, reverse=True) for p in ((f"{w}/", "WORK/"),
                                                                        (w, "WORK"))]
    pairs += [(f"{r}/", "") for r in sorted(roots, key=len, reverse=True)]
    return pairs + [(f"{Path(r).parent}/", "../") for r in sorted(roots, key=len, reverse=True)]


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    main()
