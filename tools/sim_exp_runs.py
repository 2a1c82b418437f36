"""Simulation runs of tools/sim_experiments.py: tasks, their metrics and the process pool.

A `Task` is one simulation (a point of an experiment: workload, SimConfig, options); `run_task`
builds its requests, simulates them and measures the steady-state window (`window_metrics`);
`Runner` runs a list of tasks serially or in spawned processes (the same results either way);
`refine` adds load points around each configuration's goodput knee.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from sim_exp_common import Options, Sizes, Workload, build_requests, load_profile

from pd_serve.sim.config import InstanceSpec, ScenarioSpec, SimConfig
from pd_serve.sim.run import SimResult, simulate


@dataclass(frozen=True)
class Task:
    exp: str
    point: tuple[tuple[str, Any], ...]
    workload: Workload
    cfg: SimConfig
    options: Options
    sizes: Sizes
    cost: float = 1.0  # expected requests (scheduling: largest first)


def instance_spec(o: Options, cache_blocks: int = 0, hash_block_tokens: int = 512) -> InstanceSpec:
    return replace(o.instance, prefix_cache_blocks=cache_blocks,
                   hash_block_tokens=hash_block_tokens)


def sim_config(o: Options, scenarios: Sequence[tuple[str, int, int]], policy: str = "forwarding",
               mode: str = "disaggregated", spec: InstanceSpec | None = None,
               tpot: bool = True) -> SimConfig:
    """Groups (name, n_p, n_d) with the TTFT bands (also the gateway's deadlines) and, with
    `tpot`, the TPOT limit in the summary's SLO success (the window metrics apply it apart)."""
    return SimConfig(tuple(ScenarioSpec(n, p, d, policy, o.bands, o.tpot_slo_s if tpot else None)
                           for n, p, d in scenarios), mode, spec or o.instance, o.gateway,
                     noise_cv=o.noise_cv, seed=o.seed)


# ---------------------------------------------------------------------------------------------
# One simulation (runs in a worker process)


def window_metrics(cols: dict[str, np.ndarray], mask: np.ndarray, w0: float, w1: float,
                   tpot_slo_s: float) -> dict[str, Any]:
    """Steady-state metrics of the requests in `mask`: throughput and goodput over the ends in
    [w0, w1]; SLO attainment of the requests that arrived in it (TTFT band, and TTFT band plus
    TPOT); prefix hit rate of the prompts that were computed; TTFT percentiles."""
    arrival, first, end = cols["arrival_s"], cols["first_token_s"], cols["end_s"]
    tokens, outcome = cols["output_tokens"], cols["outcome"]
    fin = (outcome == 0) & mask
    ttft_ok = fin & (cols["ttft_slo_met"] == 1)
    multi = tokens >= 2
    tpot = np.zeros(len(arrival))
    tpot[fin & multi] = (end[fin & multi] - first[fin & multi]) / (tokens[fin & multi] - 1)
    slo_ok = ttft_ok & (~multi | (tpot <= tpot_slo_s))
    length = max(w1 - w0, 1e-9)
    ended = fin & (end >= w0) & (end <= w1)
    arrived = mask & (arrival >= w0) & (arrival <= w1)
    n_arr = max(int(arrived.sum()), 1)
    computed = mask & ~np.isnan(first)
    prompt = cols["prompt_tokens"][computed].astype(np.int64).sum()
    ttft = (first - arrival)[computed]
    pct = {f"ttft_p{p}_s": (float(np.percentile(ttft, p)) if len(ttft) else None)
           for p in (50, 90, 99)}
    tp = tpot[fin & multi]
    return {"requests": int(mask.sum()),
            "throughput_rps": float(ended.sum() / length),
            "output_tokens_per_s": float(tokens[ended].sum() / length),
            "goodput_rps": float((ended & slo_ok).sum() / length),
            "ttft_goodput_rps": float((ended & ttft_ok).sum() / length),
            "attainment": float((arrived & slo_ok).sum() / n_arr),
            "ttft_attainment": float((arrived & ttft_ok).sum() / n_arr),
            "terminated_share": float((arrived & (outcome == 1)).sum() / n_arr),
            "prefix_hit_rate": (float(cols["cached_tokens"][computed].sum() / prompt)
                                if prompt else 0.0),
            "tpot_p50_s": float(np.percentile(tp, 50)) if len(tp) else None,
            "tpot_p90_s": float(np.percentile(tp, 90)) if len(tp) else None} | pct


def result_metrics(res: SimResult, o: Options) -> dict[str, Any]:
    cols = res.recorder.columns()
    arrival = cols["arrival_s"]
    last = float(arrival.max()) if len(arrival) else 0.0
    w0, w1 = o.warmup * last, last
    out = {"overall": window_metrics(cols, np.ones(len(arrival), dtype=bool), w0, w1,
                                     o.tpot_slo_s),
           "window_s": [w0, w1]}
    names = res.recorder.scenario_names
    if len(names) > 1:
        out["scenarios"] = {n: window_metrics(cols, cols["scenario"] == i, w0, w1, o.tpot_slo_s)
                            for i, n in enumerate(names)}
    return out


def run_task(task: Task) -> dict[str, Any]:
    t0 = time.perf_counter()
    reqs = build_requests(task.workload, task.options, task.sizes)
    build_s = time.perf_counter() - t0
    res = simulate(reqs, task.cfg, load_profile(task.options.profile, task.options.packed))
    s = res.summary["overall"]
    return {"exp": task.exp, "point": dict(task.point), "offered_rps": task.workload.rate,
            "metrics": result_metrics(res, task.options),
            "summary": {k: s.get(k) for k in ("requests", "finished", "terminated", "failed",
                                               "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
                                               "tpot_p50_s", "e2e_p50_s", "throughput_rps",
                                               "slo_success_rate", "prefix_hit_rate",
                                               "rejections_per_request")},
            "sim": {"events": res.events, "wall_s": res.wall_s, "build_s": build_s,
                    "sim_end_s": res.sim_end_s, "offers": res.offers,
                    "rejections": res.rejections}}


# ---------------------------------------------------------------------------------------------
# Many simulations


class Runner:
    """Runs tasks serially (jobs 1) or in a process pool (spawn: the same on every platform)."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.pool: ProcessPoolExecutor | None = None
        if jobs > 1:
            self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        self.events = 0
        self.sim_s = 0.0

    def run(self, tasks: Sequence[Task], label: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(tasks)
        order = sorted(range(len(tasks)), key=lambda i: -tasks[i].cost)
        t0, done = time.perf_counter(), 0

        def note(i: int, r: dict[str, Any]) -> None:
            nonlocal done
            out[i] = r
            done += 1
            self.events += r["sim"]["events"]
            self.sim_s += r["sim"]["wall_s"]
            if done == len(tasks) or done % max(1, len(tasks) // 10) == 0:
                print(f"  [{label}] {done}/{len(tasks)} runs, {time.perf_counter() - t0:.1f} s",
                      flush=True)

        if self.pool is None:
            for i in order:
                note(i, run_task(tasks[i]))
        else:
            futures = {self.pool.submit(run_task, tasks[i]): i for i in order}
            for f in as_completed(futures):
                note(futures[f], f.result())
        return [r for r in out if r is not None]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def refine(runner: Runner, tasks: Sequence[Task], config: Callable[[Task], Any],
           again: Callable[[Task, float], Task], o: Options, steps: int,
           label: str) -> list[dict[str, Any]]:
    """Runs a coarse load ladder (`tasks`, several configurations told apart by `config`), then
    per configuration `steps` more rates evenly between its highest rate that met the SLO
    attainment target and the next rate up (from 0 when none met it; none when the top did),
    built by `again(task, rate)`: goodput resolution without a fine ladder everywhere."""
    res = runner.run(tasks, label)
    by: dict[Any, list[tuple[Task, dict[str, Any]]]] = {}
    for t, r in zip(tasks, res):
        by.setdefault(config(t), []).append((t, r))
    more = []
    for pairs in by.values():
        pairs.sort(key=lambda tr: tr[0].workload.rate)
        ok = [i for i, (_, r) in enumerate(pairs)
              if r["metrics"]["overall"]["attainment"] >= o.attainment]
        if ok and ok[-1] == len(pairs) - 1:
            continue
        lo = pairs[ok[-1]][0].workload.rate if ok else 0.0
        hi = pairs[ok[-1] + 1 if ok else 0][0].workload.rate
        more += [again(pairs[0][0], lo + (hi - lo) * j / (steps + 1))
                 for j in range(1, steps + 1)]
    return res + (runner.run(more, label + " (refined)") if more else [])
