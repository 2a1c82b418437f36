"""Benchmark: how fast the simulator runs a large deployment (pure Python, one process).

A synthetic trace of `--requests` requests over `--scenarios` scenarios: each scenario has
its own prompt and output length distributions (lognormal around a per-scenario mean) and a
few shared prompt prefixes (hash ids, so the prefix caches work); each scenario gets
`--instances / --scenarios` instances split P:D by the real planner from the latency profile,
and Poisson arrivals at `--loads` times its planned bottleneck capacity (one run each). Each
trace is generated first (timed apart) and the simulation then runs it end to end with
conservation and leak checks.

    python tools/bench_sim_scale.py --out docs/results/sim_scale.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pd_serve.bench.traces import TraceRequest  # noqa: E402
from pd_serve.config import TTFTBand  # noqa: E402
from pd_serve.sim.config import GatewaySpec, InstanceSpec, ScenarioSpec, SimConfig  # noqa: E402
from pd_serve.sim.latency import LatencyProfile  # noqa: E402
from pd_serve.sim.plan import LengthStats, plan_groups  # noqa: E402
from pd_serve.sim.run import simulate  # noqa: E402
from pd_serve.sim.summary import clean  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--scenarios", type=int, default=100)
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8],
                   help="offered / planned capacity; one run per value")
    p.add_argument("--policy", default="forwarding")
    p.add_argument("--profile", type=Path, default=ROOT / "docs/results/sim_profile_cpu_torch.json")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--ttft-slo-s", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def scenario_shapes(n: int, max_len: int, seed: int) -> list[tuple[str, float, float]]:
    """(name, mean prompt, mean output) per scenario, spread over prefill- to decode-heavy."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = math.exp(rng.uniform(math.log(128), math.log(max_len * 0.6)))
        output = math.exp(rng.uniform(math.log(8), math.log(256)))
        out.append((f"s{i:03d}", prompt, output))
    return out


def make_trace(args: argparse.Namespace, shapes: list[tuple[str, float, float]],
               rates: list[float], block: int) -> list[TraceRequest]:
    rng = random.Random(args.seed + 1)
    total = sum(rates)
    cum = [sum(rates[:i + 1]) / total for i in range(len(rates))]
    prefixes = [[tuple(range(s * 1000 + k * 100, s * 1000 + k * 100 + 4)) for k in range(4)]
                for s in range(len(shapes))]
    t, out, next_id = 0.0, [], 10**7
    for _ in range(args.requests):
        t += rng.expovariate(total)
        s = _pick(cum, rng.random())
        name, mean_in, mean_out = shapes[s]
        n_out = max(1, min(int(rng.lognormvariate(math.log(mean_out), 0.5)), 512))
        n_in = max(1, min(int(rng.lognormvariate(math.log(mean_in), 0.5)),
                          args.max_model_len - n_out))
        shared = rng.choice(prefixes[s])
        n_blocks = -(-n_in // block)
        ids = shared[:n_blocks] + tuple(range(next_id, next_id + max(0, n_blocks - len(shared))))
        next_id += n_blocks
        out.append(TraceRequest(t, n_in, n_out, ids, scenario=name))
    return out


def _pick(cum: list[float], u: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < u:
            lo = mid + 1
        else:
            hi = mid
    return lo


def machine() -> dict[str, object]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def run_one(args: argparse.Namespace, load: float, profile: LatencyProfile) -> dict[str, Any]:
    spec = InstanceSpec(b_p=4, max_num_seqs=16, max_num_batched_tokens=2048, kv_blocks=2048,
                        block_size=16, prefix_cache_blocks=512, hash_block_tokens=64)
    gw = GatewaySpec(rtt_s=0.001, retry_interval_s=0.02)
    shapes = scenario_shapes(args.scenarios, args.max_model_len, args.seed)
    stats = {name: LengthStats(1, round(p), round(o)) for name, p, o in shapes}
    plans = plan_groups(stats, profile, spec, gw.rtt_s, args.instances // args.scenarios,
                        min_per_role=2)
    rates = [load * min(plans[n].prefill_capacity, plans[n].decode_capacity)
             for n, _, _ in shapes]
    t0 = time.perf_counter()
    trace = make_trace(args, shapes, rates, spec.hash_block_tokens)
    gen_s = time.perf_counter() - t0
    bands = (TTFTBand(None, args.ttft_slo_s),)
    cfg = SimConfig(tuple(ScenarioSpec(n, plans[n].n_p, plans[n].n_d, args.policy, bands)
                          for n, _, _ in shapes), instance=spec, gateway=gw, seed=args.seed)
    load_before = os.getloadavg()
    result = simulate(trace, cfg, profile)
    o = result.summary["overall"]
    print(f"load {load}: {len(trace):,} requests, {result.events:,} events in "
          f"{result.wall_s:.1f} s ({result.events / result.wall_s:,.0f} events/s, "
          f"{len(trace) / result.wall_s:,.0f} requests/s); finished {o['finished']}, "
          f"terminated {o['terminated']}, SLO ok {o['slo_success_rate']:.3f}", flush=True)
    return {"load": load, "offered_rps": sum(rates), "requests": len(trace),
            "instances": sum(s.n_p + s.n_d for s in cfg.scenarios),
            "prefill_instances": sum(s.n_p for s in cfg.scenarios),
            "decode_instances": sum(s.n_d for s in cfg.scenarios),
            "scenarios": len(cfg.scenarios), "trace_generation_s": gen_s,
            "wall_s": result.wall_s, "events": result.events,
            "events_per_s": result.events / result.wall_s,
            "requests_per_s": len(trace) / result.wall_s, "simulated_s": result.sim_end_s,
            "offers": result.offers, "rejections": result.rejections,
            "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "summary": o}


def main() -> None:
    args = parse_args()
    profile = LatencyProfile.load(args.profile)
    runs = [run_one(args, load, profile) for load in args.loads]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "tools/bench_sim_scale.py", *sys.argv[1:]]),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                     capture_output=True).stdout.strip(),
        "machine": machine(),
        "profile": str(args.profile.relative_to(ROOT) if args.profile.is_relative_to(ROOT)
                       else args.profile),
        "policy": args.policy, "ttft_slo_s": args.ttft_slo_s,
        "instance": {"b_p": 4, "max_num_seqs": 16, "max_num_batched_tokens": 2048,
                     "kv_blocks": 2048, "block_size": 16, "prefix_cache_blocks": 512,
                     "hash_block_tokens": 64},
        "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(clean(report), indent=1) + "\n")


if __name__ == "__main__":
    main()
