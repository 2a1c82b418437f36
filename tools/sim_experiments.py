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

    PYTHONPATH=. python tools/sim_experiments.py --jobs 16            # all four, full size
    PYTHONPATH=. python tools/sim_experiments.py --quick --only a     # seconds: smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pd_serve.bench.arrivals import poisson_times, trace_times  # noqa: E402
from pd_serve.bench.scaling import scale_trace  # noqa: E402
from pd_serve.bench.tagging import merge_traces, scenario_summary, tag_scenarios  # noqa: E402
from pd_serve.bench.trace_formats import load_trace  # noqa: E402
from pd_serve.bench.traces import Trace, TraceRequest, spread_buckets  # noqa: E402
from pd_serve.config import TTFTBand  # noqa: E402
from pd_serve.orchestrator import perf_model as pm  # noqa: E402
from pd_serve.orchestrator import planner  # noqa: E402
from pd_serve.sim.config import GatewaySpec, InstanceSpec, ScenarioSpec, SimConfig  # noqa: E402
from pd_serve.sim.latency import (  # noqa: E402
    DecodeSample,
    LatencyProfile,
    PrefillSample,
    fit_decode,
    fit_prefill,
)
from pd_serve.sim.plan import LengthStats, plan_groups, scenario_profile  # noqa: E402
from pd_serve.sim.run import SimResult, simulate  # noqa: E402
from pd_serve.sim.summary import clean  # noqa: E402

EXPERIMENTS = ("a", "b", "c", "d")
POLICIES = ("forwarding", "fifo", "round_robin")
LENGTH_TRACES = {  # scenario -> file under --traces
    "arxiv": "arxiv_summarization_lengths/"
             "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    "sharegpt": "sharegpt_lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
}
MOONCAKE = "mooncake/conversation_trace.jsonl"


# ---------------------------------------------------------------------------------------------
# Sizes and options


@dataclass(frozen=True)
class Sizes:
    """How big each experiment is (full run vs --quick)."""

    a_budget: int = 32  # instances per scenario, every split n_p:n_d of it
    a_duration_s: float = 300.0  # simulated seconds of arrivals per run (>= min_requests)
    a_overload: float = 2.0  # saturating load: x the planner's split's modelled capacity
    a_ladder: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
                                   1.2)  # x that split's modelled capacity (then refined)
    b_prefill: int = 8  # prefill instances (decode sized to 2x their modelled capacity)
    b_calibration: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55,
                                        0.6, 0.7, 0.8, 0.9, 1.0)  # x modelled capacity
    b_loads: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0)  # x A
    b_cache_blocks: int = 1024
    c_copies: int = 8  # scenarios (rotated Mooncake copies)
    c_budget: int = 8  # instances per scenario
    c_templates: int = 16  # system prompts per scenario (Zipf popularity)
    c_template_blocks: int = 8  # blocks per system prompt (8 x 32 = 256 tokens)
    c_cache_blocks: tuple[int, ...] = (128, 512, 2048, 8192)
    c_loads: tuple[float, ...] = (0.2, 0.35, 0.5, 0.7)  # x planned capacity (no prefix hits)
    d_budget: int = 32
    d_duration_s: float = 300.0
    d_loads: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
                                  1.2, 1.5, 2.0)  # x the disaggregated plan's modelled capacity
    refine_steps: int = 4  # (a), (d): extra rates around each configuration's goodput knee
    min_requests: int = 2000  # (a), (d): requests per run at least
    mooncake_limit: int | None = None  # first requests of the Mooncake trace (None: all)


QUICK = Sizes(a_budget=4, a_duration_s=15.0, a_ladder=(0.3, 0.6), b_prefill=2,
              b_calibration=(0.2, 0.4), b_loads=(1.0, 3.0), b_cache_blocks=256, c_copies=2,
              c_budget=4, c_templates=4, c_template_blocks=4, c_cache_blocks=(32, 512),
              c_loads=(0.5,), d_budget=4,
              d_duration_s=15.0, d_loads=(0.3, 2.0), refine_steps=1, min_requests=30,
              mooncake_limit=250)


@dataclass(frozen=True)
class Options:
    profile: str
    traces: str
    bands: tuple[TTFTBand, ...]
    tpot_slo_s: float
    attainment: float
    targets: tuple[float, ...]  # attainment targets goodput is reported at
    packed: bool  # latency models refitted in packed form (what-if)
    max_model_len: int
    block_tokens: int  # Mooncake: tokens per 512-token hash block after scaling
    min_per_role: int
    noise_cv: float
    seed: int
    warmup: float  # share of the arrival span before the throughput window opens
    instance: InstanceSpec
    gateway: GatewaySpec


def parse_bands(text: str) -> tuple[TTFTBand, ...]:
    """`512:1,1024:2,*:4` -> TTFT deadline bands (max prompt tokens : seconds; `*`: any)."""
    bands = []
    for item in text.split(","):
        length, _, secs = item.strip().partition(":")
        try:
            bands.append(TTFTBand(None if length.strip() in ("*", "") else int(length),
                                  float(secs)))
        except ValueError as exc:
            raise SystemExit(f"--ttft-bands: bad band {item!r} ({exc})") from None
    if bands[-1].max_prompt_tokens is not None:
        bands.append(TTFTBand(None, bands[-1].deadline_s))
    return tuple(bands)


# ---------------------------------------------------------------------------------------------
# Workloads (built inside the worker from a small picklable description)


@dataclass(frozen=True)
class Workload:
    """`lengths`: one scenario, requests drawn (seeded shuffle, cycled) from a length trace
    scaled to the context, Poisson arrivals at `rate` for `duration_s`. `mooncake`: the scaled
    Mooncake trace (buckets spread), `copies` rotated copies merged (scenario s<j> each, or all
    `mixed`), arrivals compressed to the mean `rate`; `templates` > 0: each copy's shared
    system-prompt block replaced by one of its own `templates` system prompts of
    `template_blocks` blocks (see `with_templates`)."""

    kind: str
    scenario: str
    rate: float
    duration_s: float = 0.0
    copies: int = 1
    mixed: bool = False
    templates: int = 0
    template_blocks: int = 0
    seed: int = 0


@lru_cache(maxsize=8)
def fitted_lengths(path: str, max_model_len: int) -> Trace:
    trace, _ = scale_trace(load_trace(path), max_model_len)  # p99 factor ("quantile")
    return trace


@lru_cache(maxsize=4)
def fitted_mooncake(path: str, max_model_len: int, block_tokens: int,
                    limit: int | None) -> Trace:
    trace, _ = scale_trace(load_trace(path, limit=limit), max_model_len,
                           block_tokens=block_tokens)
    return replace(trace, requests=tuple(spread_buckets(trace.requests)))


def with_templates(reqs: Sequence[TraceRequest], scenario: int, templates: int, blocks: int,
                   block_tokens: int, max_model_len: int) -> list[TraceRequest]:
    """Per-scenario shared system prompts: every Mooncake request starts with hash id 0 (one
    system-prompt block shared by the whole trace); here it is replaced by one of the
    scenario's `templates` system prompts of `blocks` blocks (ids of their own, negative, so
    they never meet the trace's), picked per conversation (hash_ids[:2], Mooncake's prefix
    family: every turn keeps its template) with Zipf(1) popularity. The prompt grows by the
    template's tokens less the dropped block, cut to fit the context."""
    weights = [1.0 / (i + 1) for i in range(templates)]
    out = []
    for r in reqs:
        family = r.hash_ids[1] if len(r.hash_ids) > 1 else r.source
        t = random.Random(f"template:{scenario}:{family}").choices(range(templates), weights)[0]
        n_in = r.input_len - min(block_tokens, r.input_len) + blocks * block_tokens
        n_in = max(1, min(n_in, max_model_len - r.output_len))
        ids = tuple(-(1 + t * blocks + b) for b in range(blocks)) + r.hash_ids[1:]
        out.append(replace(r, input_len=n_in, hash_ids=ids[:-(-n_in // block_tokens)]))
    return out


def mooncake_copies(base: Trace, copies: int, templates: int = 0, template_blocks: int = 0,
                    max_model_len: int = 0) -> Trace:
    """`copies` copies of `base`, copy j rotated in time by j/copies of its period, merged so
    each is a scenario `s<j>` with hash ids of its own (merge_traces shifts them), optionally
    with per-scenario system prompts (`with_templates`)."""
    n = len(base.requests)
    span = base.span_s
    period = span * n / (n - 1) if n > 1 and span > 0 else max(span, 1.0)
    parts = []
    for j in range(copies):
        off = period * j / copies
        reqs = sorted((replace(r, arrival_s=(r.arrival_s + off) % period) for r in base.requests),
                      key=lambda r: r.arrival_s)
        if templates:
            reqs = with_templates(reqs, j, templates, template_blocks, base.block_size or 1,
                                  max_model_len)
        parts.append(Trace(f"s{j}", tuple(reqs), True, base.block_size, fmt=base.fmt))
    return merge_traces(parts) if copies > 1 else replace(parts[0], requests=tuple(
        replace(r, scenario="s0") for r in parts[0].requests))


@lru_cache(maxsize=2)
def merged_mooncake(path: str, max_model_len: int, block_tokens: int, limit: int | None,
                    copies: int, templates: int = 0, template_blocks: int = 0) -> Trace:
    return mooncake_copies(fitted_mooncake(path, max_model_len, block_tokens, limit), copies,
                           templates, template_blocks, max_model_len)


def build_requests(w: Workload, o: Options, sizes: Sizes) -> list[TraceRequest]:
    if w.kind == "lengths":
        base = fitted_lengths(str(Path(o.traces) / LENGTH_TRACES[w.scenario]), o.max_model_len)
        n = max(sizes.min_requests, round(w.rate * w.duration_s))
        order = list(range(len(base.requests)))
        random.Random(f"{w.seed}:{w.scenario}").shuffle(order)
        times = poisson_times(n, w.rate, seed=w.seed)
        return [replace(base.requests[order[i % len(order)]], arrival_s=t, scenario=w.scenario)
                for i, t in enumerate(times)]
    merged = merged_mooncake(str(Path(o.traces) / MOONCAKE), o.max_model_len, o.block_tokens,
                             sizes.mooncake_limit, w.copies, w.templates, w.template_blocks)
    times = trace_times(merged.requests, rate=w.rate)
    name = "mixed" if w.mixed else None
    return [replace(r, arrival_s=t, scenario=name or (r.scenario if w.copies > 1 else w.scenario))
            for r, t in zip(merged.requests, times)]


# ---------------------------------------------------------------------------------------------
# One simulation (runs in a worker process)


@dataclass(frozen=True)
class Task:
    exp: str
    point: tuple[tuple[str, Any], ...]
    workload: Workload
    cfg: SimConfig
    options: Options
    sizes: Sizes
    cost: float = 1.0  # expected requests (scheduling: largest first)


@lru_cache(maxsize=4)
def _profile(path: str, packed: bool = False) -> LatencyProfile:
    """The latency profile; `packed`: its prefill and decode models refitted from the stored
    samples in packed form (a what-if of a backend that packs variable-length batches instead
    of padding them, as GPU/NPU engines with variable-length attention do)."""
    prof = LatencyProfile.load(path)
    if not packed:
        return prof
    pre = [PrefillSample(tuple((int(a), int(b)) for a, b in x["chunks"]), float(x["seconds"]))
           for x in prof.samples["prefill"]]
    dec = [DecodeSample(tuple(int(c) for c in x["contexts"]), float(x["seconds"]))
           for x in prof.samples["decode"]]
    return replace(prof, prefill=fit_prefill(pre, padded=False),
                   decode=fit_decode(dec, padded=False))


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
    res = simulate(reqs, task.cfg, _profile(task.options.profile, task.options.packed))
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


# ---------------------------------------------------------------------------------------------
# Shared helpers


def length_stats_of(trace: Trace) -> LengthStats:
    st = LengthStats()
    for r in trace.requests:
        st.add(r)
    return st


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


def gain(x: float, ref: float) -> float | None:
    return x / ref - 1 if ref > 0 else None


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def best_goodput(points: Sequence[dict[str, Any]], key: str,
                 targets: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per attainment target: among the load points of one configuration whose `key`
    ("attainment": TTFT band + TPOT, or "ttft_attainment") reaches it, the one with the
    highest goodput (SLO-met completions/s); goodput 0 when none does."""
    good = "goodput_rps" if key == "attainment" else "ttft_goodput_rps"
    out = {}
    for target in targets:
        ok = [(p["metrics"]["overall"][good], p["offered_rps"], p["metrics"]["overall"][key])
              for p in points if p["metrics"]["overall"][key] >= target]
        g, rate, att = max(ok) if ok else (0.0, None, None)
        out[f"{target:g}"] = {"goodput_rps": g, "offered_rps": rate, "attainment": att}
    return out


KEPT = ("throughput_rps", "output_tokens_per_s", "goodput_rps", "ttft_goodput_rps",
        "attainment", "ttft_attainment", "terminated_share", "prefix_hit_rate", "ttft_p50_s",
        "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s")


def compact(r: dict[str, Any]) -> dict[str, Any]:
    """One run's result without the per-scenario breakdown (smaller JSON)."""
    return {"point": r["point"], "offered_rps": r["offered_rps"],
            "metrics": {k: r["metrics"]["overall"][k] for k in KEPT},
            "events": r["sim"]["events"], "wall_s": r["sim"]["wall_s"]}


def as_rows(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Runs as a table: {"columns": [...], "rows": [[...], ...]} (one line per run in the JSON)."""
    cols = ["load", "offered_rps", *KEPT, "events"]
    return {"columns": cols, "rows": [[r["point"]["load"], r["offered_rps"],
                                       *(r["metrics"]["overall"][k] for k in KEPT),
                                       r["sim"]["events"]] for r in runs]}


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with objects indented one space a level and lists of scalars on one line."""
    pad = " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = [pad + dumps(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(value, default=str)


def rounded(value: Any, digits: int = 5) -> Any:
    """Floats to `digits` significant digits, recursively (the JSON stays readable)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


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


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _f(x: Any, digits: int = 2, scale: float = 1.0) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def _plt() -> Any:
    import matplotlib  # only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Experiment:
    """What an experiment hands back: its JSON body, the printed table and a plot writer."""

    data: dict[str, Any]
    text: str
    plot: Callable[[Path], None]


# ---------------------------------------------------------------------------------------------
# (a) throughput vs P/D ratio


def exp_a(o: Options, sizes: Sizes, runner: Runner) -> Experiment:
    prof = _profile(o.profile, o.packed)
    spec = o.instance
    budget = sizes.a_budget
    scen: dict[str, Any] = {}
    tasks = []
    for name, rel in LENGTH_TRACES.items():
        stats = length_stats_of(fitted_lengths(str(Path(o.traces) / rel), o.max_model_len))
        plan = plan_groups({name: stats}, prof, spec, o.gateway.rtt_s, budget,
                           o.min_per_role)[name]
        sp = scenario_profile(name, prof, spec, o.gateway.rtt_s, stats.mean_prompt,
                              stats.mean_output)
        saturating = sizes.a_overload * min(plan.prefill_capacity, plan.decode_capacity)
        scen[name] = {"mean_prompt": stats.mean_prompt, "mean_output": stats.mean_output,
                      "plan": plan.to_dict(), "saturating_rps": saturating,
                      "profile": {"tp_by_batch": dict(sp.tp_by_batch or {}), "xi": sp.xi,
                                  "G": sp.G,
                                  "tpot_b_d": pm.tpot(sp)}}
        for n_p in range(1, budget):
            n_d = budget - n_p
            model_rps = planner.split(sp, n_p, n_d).bottleneck_capacity
            loads = [("saturated", saturating)] + [(f"{f:g}", f * model_rps)
                                                   for f in sizes.a_ladder]
            for label, rate in loads:
                w = Workload("lengths", name, rate, sizes.a_duration_s, seed=o.seed)
                tasks.append(Task("a", (("scenario", name), ("n_p", n_p), ("n_d", n_d),
                                        ("load", label)),
                                  w, sim_config(o, [(name, n_p, n_d)]), o, sizes,
                                  rate * sizes.a_duration_s))

    def again(t: Task, rate: float) -> Task:
        point = dict(t.point) | {"load": "refined"}
        return replace(t, point=tuple(point.items()), workload=replace(t.workload, rate=rate),
                       cost=rate * sizes.a_duration_s)

    sat_tasks = [t for t in tasks if dict(t.point)["load"] == "saturated"]
    res = runner.run(sat_tasks, "a: saturated") + refine(
        runner, [t for t in tasks if dict(t.point)["load"] != "saturated"],
        lambda t: (dict(t.point)["scenario"], dict(t.point)["n_p"]), again, o,
        sizes.refine_steps, "a: load ladder")
    rows, lines = [], []
    for name, info in scen.items():
        sp = scenario_profile(name, prof, spec, o.gateway.rtt_s, info["mean_prompt"],
                              info["mean_output"])
        splits = []
        for n_p in range(1, budget):
            pts = [r for r in res if r["point"]["scenario"] == name and r["point"]["n_p"] == n_p]
            sat = next(r for r in pts if r["point"]["load"] == "saturated")
            ladder = sorted((r for r in pts if r is not sat), key=lambda r: r["offered_rps"])
            model = planner.split(sp, n_p, budget - n_p)
            m = sat["metrics"]["overall"]
            splits.append({
                "n_p": n_p, "n_d": budget - n_p,
                "saturated_throughput_rps": m["throughput_rps"],
                "saturated_output_tokens_per_s": m["output_tokens_per_s"],
                "saturated_goodput_rps": m["goodput_rps"],
                "peak_throughput_rps": max(r["metrics"]["overall"]["throughput_rps"]
                                           for r in pts),
                "goodput": best_goodput(ladder, "attainment", o.targets),
                "ttft_goodput": best_goodput(ladder, "ttft_attainment", o.targets),
                "model_prefill_rps": model.prefill_capacity,
                "model_decode_rps": model.decode_capacity,
                "saturated": compact(sat), "ladder": as_rows(ladder)})
        info["splits"] = splits
        planned = next(s for s in splits if s["n_p"] == info["plan"]["n_p"])
        key = f"{o.attainment:g}"
        info["planner_vs_others"] = {
            "saturated_throughput": compare(splits, planned, ("saturated_throughput_rps",)),
            "peak_throughput": compare(splits, planned, ("peak_throughput_rps",)),
            "goodput": compare(splits, planned, ("goodput", key, "goodput_rps"))}
        for s in splits:
            rows.append([name, f"{s['n_p']}:{s['n_d']}" + (" *" if s is planned else ""),
                         _f(min(s["model_prefill_rps"], s["model_decode_rps"]), 1),
                         _f(s["saturated_throughput_rps"], 1),
                         _f(s["saturated_output_tokens_per_s"], 0),
                         _f(s["peak_throughput_rps"], 1),
                         _f(s["goodput"][key]["goodput_rps"], 1),
                         _f(s["ttft_goodput"][key]["goodput_rps"], 1)])
        lines.append(f"{name}: planner {planned['n_p']}:{planned['n_d']} "
                     f"({info['plan']['reason']})")
        for k, c in info["planner_vs_others"].items():
            lines.append(f"  {k}: planner {c['planner']:.2f} req/s, rank {c['planner_rank']}/"
                         f"{len(splits)} (best {c['best_split']} {c['best']:.2f}); vs the other "
                         f"splits' mean {fmt_pct(c['gain_over_mean'])}, median "
                         f"{fmt_pct(c['gain_over_median'])}, worst "
                         f"{fmt_pct(c['gain_over_worst'])}, best other "
                         f"{fmt_pct(c['gain_over_best_other'])}")
    text = table(rows, ["scenario", "n_p:n_d", "model req/s", "sat. req/s", "sat. tok/s",
                        "peak req/s", f"goodput@{o.attainment:.0%}", "TTFT-only goodput"])
    text += ("\n(* the planner's split; model = min(prefill, decode) capacity of the E2E model; "
             "sat. = under the saturating load; peak = best throughput over the load ladder; "
             "goodput = highest SLO-met rate on the ladder with attainment >= target)\n")
    text += "\n".join(lines)

    def plot(path: Path) -> None:
        plt = _plt()
        key = f"{o.attainment:g}"
        fig, axes = plt.subplots(1, len(scen), figsize=(6 * len(scen), 4), squeeze=False)
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
            ax.set_xlabel("prefill instances n_p (n_d = budget - n_p)")
            ax.set_ylabel("requests/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    data = {"budget": budget, "duration_s": sizes.a_duration_s, "overload": sizes.a_overload,
            "ladder_fractions_of_model_capacity": list(sizes.a_ladder), "scenarios": scen}
    return Experiment(data, text, plot)


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
# (b) TTFT-SLO success vs load: forwarding vs fifo vs round_robin


def mooncake_base(o: Options, sizes: Sizes) -> Trace:
    return fitted_mooncake(str(Path(o.traces) / MOONCAKE), o.max_model_len, o.block_tokens,
                           sizes.mooncake_limit)


def exp_b(o: Options, sizes: Sizes, runner: Runner) -> Experiment:
    prof = _profile(o.profile, o.packed)
    base = mooncake_base(o, sizes)
    stats = length_stats_of(base)
    spec = instance_spec(o, sizes.b_cache_blocks, o.block_tokens)
    sp = scenario_profile("mooncake", prof, spec, o.gateway.rtt_s, stats.mean_prompt,
                          stats.mean_output)
    n_p = sizes.b_prefill
    model_a = pm.prefill_capacity(sp, n_p)  # the E2E model's prefill capacity (no prefix hits)
    n_d = max(o.min_per_role, math.ceil(2 * model_a / pm.decode_capacity(sp, 1)))

    def task(rate: float, policy: str, point: tuple[tuple[str, Any], ...]) -> Task:
        return Task("b", point + (("policy", policy),),
                    Workload("mooncake", "mooncake", rate, seed=o.seed),
                    sim_config(o, [("mooncake", n_p, n_d)], policy, spec=spec, tpot=False),
                    o, sizes,
                    len(base.requests) * (1 + rate / model_a))

    # A, as the paper and docs/benchmarks.md section 3 define it: the highest offered rate at
    # which the local-queue baseline (fifo) still meets the TTFT SLO for >= 99% of requests
    calib = runner.run([task(f * model_a, "fifo", (("calibration", f),))
                        for f in sizes.b_calibration], "b: calibrating A with fifo")
    calib.sort(key=lambda r: r["offered_rps"])
    ok = [r["offered_rps"] for r in calib if r["summary"]["slo_success_rate"] >= 0.99]
    a_rps = max(ok) if ok else calib[0]["offered_rps"]
    tasks = [task(load * a_rps, policy, (("load", load),))
             for load in sizes.b_loads for policy in POLICIES]
    res = runner.run(tasks, "b")
    by = {(r["point"]["load"], r["point"]["policy"]): r for r in res}
    points, rows = [], []
    for load in sizes.b_loads:
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
        points.append(pt)
        rows.append([f"{load:g}A", _f(load * a_rps, 1)]
                    + [f"{100 * pt[p]['success']:.1f}% ({_f(pt[p]['ttft_p99_s'], 2)})"
                       for p in POLICIES]
                    + [f"{100 * pt['gap_vs_fifo']:+.1f}", f"{100 * pt['gap_vs_round_robin']:+.1f}"])
    summary = {"max_gap_vs_fifo": max(p["gap_vs_fifo"] for p in points),
               "min_gap_vs_fifo": min(p["gap_vs_fifo"] for p in points),
               "max_gap_vs_round_robin": max(p["gap_vs_round_robin"] for p in points),
               "min_gap_vs_round_robin": min(p["gap_vs_round_robin"] for p in points)}
    text = table(rows, ["load", "req/s", *(f"{p} (TTFT p99 s)" for p in POLICIES),
                        "fwd-fifo pts", "fwd-rr pts"])
    text += (f"\nA = {a_rps:.1f} req/s: highest calibration rate with fifo >= 99% TTFT-SLO "
             f"success" + ("" if ok else " (none reached 99%: the lowest rate)") + f" (the E2E "
             f"model's prefill capacity, no prefix hits: {model_a:.1f} req/s); {n_p}P:{n_d}D, "
             f"b_p {spec.b_p}, prefix cache {spec.prefix_cache_blocks} blocks of "
             f"{spec.hash_block_tokens} tokens; gap forwarding - fifo "
             f"{100 * summary['min_gap_vs_fifo']:+.1f} to {100 * summary['max_gap_vs_fifo']:+.1f}"
             f" points, - round_robin {100 * summary['min_gap_vs_round_robin']:+.1f} to "
             f"{100 * summary['max_gap_vs_round_robin']:+.1f} points")
    calibration = [{"fraction_of_model": r["point"]["calibration"], "offered_rps": r["offered_rps"],
                    "success": r["summary"]["slo_success_rate"],
                    "ttft_p99_s": r["summary"]["ttft_p99_s"],
                    "throughput_rps": r["metrics"]["overall"]["throughput_rps"]} for r in calib]

    def plot(path: Path) -> None:
        plt = _plt()
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        x = [p["load"] for p in points]
        for policy, mark in zip(POLICIES, "osd"):
            ax.plot(x, [100 * p[policy]["success"] for p in points], mark + "-", label=policy)
            ax2.plot(x, [p[policy]["ttft_p99_s"] or 0 for p in points], mark + "-", label=policy)
        ax.set_xlabel(f"offered load (x A = {a_rps:.1f} req/s)")
        ax.set_ylabel("TTFT-SLO success rate (%)")
        ax.set_title(f"Mooncake (1/{512 // o.block_tokens} lengths), {n_p}P:{n_d}D")
        ax2.set_xlabel(f"offered load (x A = {a_rps:.1f} req/s)")
        ax2.set_ylabel("TTFT p99 of computed requests (s)")
        for a in (ax, ax2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    data = {"A_rps": a_rps, "model_prefill_capacity_rps": model_a, "calibration": calibration,
            "n_p": n_p, "n_d": n_d, "requests": len(base.requests),
            "mean_prompt": stats.mean_prompt, "mean_output": stats.mean_output,
            "prefix_cache_blocks": spec.prefix_cache_blocks,
            "infinite_cache_prefix_hit_ratio": scenario_summary(base)["default"].get(
                "prefix_hit_ratio"),
            "points": points, "summary": summary}
    return Experiment(data, text, plot)


# ---------------------------------------------------------------------------------------------
# (c) per-scenario groups vs one mixed pool, limited prefix caches


def exp_c(o: Options, sizes: Sizes, runner: Runner) -> Experiment:
    prof = _profile(o.profile, o.packed)
    base = mooncake_base(o, sizes)
    copies = sizes.c_copies
    # do the trace's own prefix families make scenarios? (they do not: record the evidence)
    _, fam = tag_scenarios(base, "prefix", top_n=copies)
    fam_rows = {n: {"requests": int(v["requests"]), "share": v["share"],
                    "prefix_hit_ratio": v.get("prefix_hit_ratio")} for n, v in fam.items()}
    top = [v for n, v in fam_rows.items() if n != "other"]
    families_ok = bool(top) and min(float(v["share"] or 0) for v in top) >= 0.5 / copies
    merged = merged_mooncake(str(Path(o.traces) / MOONCAKE), o.max_model_len, o.block_tokens,
                             sizes.mooncake_limit, copies, sizes.c_templates,
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
    cap = copies * min(plan.prefill_capacity, plan.decode_capacity)
    names = [f"s{j}" for j in range(copies)]
    tasks = []
    for load in sizes.c_loads:
        for blocks in sizes.c_cache_blocks:
            spec = instance_spec(o, blocks, o.block_tokens)
            for layout in ("groups", "mixed"):
                groups_ = ([(n, plan.n_p, plan.n_d) for n in names] if layout == "groups"
                           else [("mixed", copies * plan.n_p, copies * plan.n_d)])
                w = Workload("mooncake", "mixed", load * cap, copies=copies,
                             mixed=layout == "mixed", templates=sizes.c_templates,
                             template_blocks=sizes.c_template_blocks, seed=o.seed)
                tasks.append(Task("c", (("load", load), ("cache_blocks", blocks),
                                        ("layout", layout)), w,
                                  sim_config(o, groups_, spec=spec), o, sizes,
                                  len(merged.requests) * (2 if layout == "mixed" else 1)))
    res = runner.run(tasks, "c")
    by = {(r["point"]["load"], r["point"]["cache_blocks"], r["point"]["layout"]): r
          for r in res}
    points, rows = [], []
    for load in sizes.c_loads:
        for blocks in sizes.c_cache_blocks:
            pt: dict[str, Any] = {"load": load, "offered_rps": load * cap,
                                  "cache_blocks": blocks}
            for layout in ("groups", "mixed"):
                r = by[(load, blocks, layout)]
                m = r["metrics"]["overall"]
                pt[layout] = {"prefix_hit_rate": m["prefix_hit_rate"],
                              "ttft_p50_s": m["ttft_p50_s"], "ttft_p90_s": m["ttft_p90_s"],
                              "throughput_rps": m["throughput_rps"],
                              "ttft_attainment": m["ttft_attainment"], "run": compact(r)}
            points.append(pt)
            g, mx = pt["groups"], pt["mixed"]
            rows.append([f"{load:g}", _f(load * cap, 1), blocks,
                         f"{100 * g['prefix_hit_rate']:.1f}% / {100 * mx['prefix_hit_rate']:.1f}%",
                         f"{_f(g['ttft_p50_s'], 3)} / {_f(mx['ttft_p50_s'], 3)}",
                         f"{_f(g['ttft_p90_s'], 3)} / {_f(mx['ttft_p90_s'], 3)}",
                         f"{_f(g['throughput_rps'], 1)} / {_f(mx['throughput_rps'], 1)}",
                         f"{100 * g['ttft_attainment']:.1f}% / "
                         f"{100 * mx['ttft_attainment']:.1f}%"])
    text = table(rows, ["load", "req/s", "cache blocks", "prefix hit (groups / mixed)",
                        "TTFT p50 s", "TTFT p90 s", "throughput req/s", "TTFT-SLO ok"])
    text += (f"\n{copies} scenarios x {plan.n_p}P:{plan.n_d}D (groups) vs one pool of "
             f"{copies * plan.n_p}P:{copies * plan.n_d}D (mixed); load x {cap:.1f} req/s (planned "
             f"capacity without prefix hits); cache blocks of {o.block_tokens} tokens per prefill "
             f"instance. Scenarios: {copies} rotated copies of the Mooncake trace, merged (own "
             f"hash ids each), each with {sizes.c_templates} system prompts of "
             f"{sizes.c_template_blocks} blocks; infinite-cache hit ratio per scenario "
             f"{statistics.fmean(v['prefix_hit_ratio'] or 0 for v in built.values()):.3f} "
             f"(plain trace {plain.get('prefix_hit_ratio') or 0:.3f}). "
             f"Trace prefix families as scenarios: top {len(top)} hold "
             f"{sum(float(v['share'] or 0) for v in top):.1%} of requests"
             + (" (large enough, but this tool always uses the construction)" if families_ok
                else " (far too small to be scenarios)"))

    def plot(path: Path) -> None:
        plt = _plt()
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for load, ls in zip(sizes.c_loads, ("-", "--", ":", "-.")):
            pts = [p for p in points if p["load"] == load]
            x = [p["cache_blocks"] for p in pts]
            for layout, mark in (("groups", "o"), ("mixed", "s")):
                lab = f"{layout}, load {load:g}"
                axes[0].plot(x, [100 * p[layout]["prefix_hit_rate"] for p in pts], mark + ls,
                             label=lab)
                axes[1].plot(x, [p[layout]["ttft_p90_s"] or 0 for p in pts], mark + ls,
                             label=lab)
                axes[2].plot(x, [p[layout]["throughput_rps"] for p in pts], mark + ls,
                             label=lab)
        for ax, yl in zip(axes, ("prefix hit rate (% of computed prompt tokens)",
                                 "TTFT p90 (s)", "throughput (req/s)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"prefix cache per prefill instance (blocks of {o.block_tokens} tokens)")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{copies} scenario groups of {plan.n_p}P:{plan.n_d}D vs one mixed pool")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    data = {"copies": copies, "plan": plan.to_dict(), "capacity_rps": cap,
            "scenario_construction": "rotated copies of the scaled Mooncake trace merged with "
                                     "merge_traces (hash ids shifted per copy: each scenario its "
                                     "own conversations); the trace-wide system-prompt block "
                                     "replaced by one of the scenario's own system prompts "
                                     "(templates, Zipf popularity, fixed per conversation)",
            "templates": sizes.c_templates, "template_blocks": sizes.c_template_blocks,
            "plain_trace": {"mean_input": plain["mean_input"],
                            "prefix_hit_ratio": plain.get("prefix_hit_ratio")},
            "prefix_families_check": {"families_large_enough": families_ok, "top": fam_rows},
            "scenarios": built, "points": points}
    return Experiment(data, text, plot)


# ---------------------------------------------------------------------------------------------
# (d) disaggregated vs aggregated at equal hardware


def exp_d(o: Options, sizes: Sizes, runner: Runner) -> Experiment:
    prof = _profile(o.profile, o.packed)
    budget = sizes.d_budget
    scen: dict[str, Any] = {}
    tasks = []
    for name, rel in LENGTH_TRACES.items():
        stats = length_stats_of(fitted_lengths(str(Path(o.traces) / rel), o.max_model_len))
        plan = plan_groups({name: stats}, prof, o.instance, o.gateway.rtt_s, budget,
                           o.min_per_role)[name]
        cap = min(plan.prefill_capacity, plan.decode_capacity)
        scen[name] = {"plan": plan.to_dict(), "capacity_rps": cap,
                      "mean_prompt": stats.mean_prompt, "mean_output": stats.mean_output}
        for mode in ("disaggregated", "aggregated"):
            for load in sizes.d_loads:
                w = Workload("lengths", name, load * cap, sizes.d_duration_s, seed=o.seed)
                tasks.append(Task("d", (("scenario", name), ("mode", mode), ("load", load)), w,
                                  sim_config(o, [(name, plan.n_p, plan.n_d)], mode=mode), o,
                                  sizes, load * cap * sizes.d_duration_s))

    def again(t: Task, rate: float) -> Task:
        point = dict(t.point)
        cap = scen[point["scenario"]]["capacity_rps"]
        return replace(t, point=tuple((point | {"load": rate / cap}).items()),
                       workload=replace(t.workload, rate=rate),
                       cost=rate * sizes.d_duration_s)

    res = refine(runner, tasks, lambda t: (dict(t.point)["scenario"], dict(t.point)["mode"]),
                 again, o, sizes.refine_steps, "d")
    key = f"{o.attainment:g}"
    rows = []
    for name, info in scen.items():
        for mode in ("disaggregated", "aggregated"):
            pts = sorted((r for r in res if r["point"]["scenario"] == name
                          and r["point"]["mode"] == mode), key=lambda r: r["point"]["load"])
            info[mode] = {
                "peak_throughput_rps": max(p["metrics"]["overall"]["throughput_rps"]
                                           for p in pts),
                "goodput": best_goodput(pts, "attainment", o.targets),
                "ttft_goodput": best_goodput(pts, "ttft_attainment", o.targets),
                "points": [{"load": p["point"]["load"], "offered_rps": p["offered_rps"],
                            **{k: p["metrics"]["overall"][k] for k in (
                                "throughput_rps", "goodput_rps", "attainment",
                                "ttft_attainment", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s",
                                "tpot_p90_s")}, "events": p["sim"]["events"]} for p in pts]}
        dis, agg = info["disaggregated"], info["aggregated"]

        def ratio(a: float, b: float) -> float | None:
            return a / b if b > 0 else None

        info["ratios"] = {
            "peak_throughput": ratio(dis["peak_throughput_rps"], agg["peak_throughput_rps"]),
            **{f"goodput_{t}": ratio(dis["goodput"][t]["goodput_rps"],
                                     agg["goodput"][t]["goodput_rps"]) for t in dis["goodput"]},
            **{f"ttft_goodput_{t}": ratio(dis["ttft_goodput"][t]["goodput_rps"],
                                          agg["ttft_goodput"][t]["goodput_rps"])
               for t in dis["ttft_goodput"]}}
        for mode in ("disaggregated", "aggregated"):
            m = info[mode]
            split = (f"{info['plan']['n_p']}P:{info['plan']['n_d']}D" if mode == "disaggregated"
                     else f"{budget} aggregated")
            rows.append([name, split, _f(m["peak_throughput_rps"], 1),
                         _f(m["goodput"][key]["goodput_rps"], 1),
                         _f(m["ttft_goodput"][key]["goodput_rps"], 1)])
        rt = info["ratios"]
        rows.append([name, "disagg / agg", _f(rt["peak_throughput"], 2) + "x",
                     _f(rt[f"goodput_{key}"], 2) + "x", _f(rt[f"ttft_goodput_{key}"], 2) + "x"])
    text = table(rows, ["scenario", "deployment", "peak req/s",
                        f"goodput@{o.attainment:.0%} (TTFT+TPOT)",
                        f"goodput@{o.attainment:.0%} (TTFT)"])
    text += (f"\n{budget} instances per scenario either way; SLO: TTFT bands "
             f"{[(b.max_prompt_tokens, b.deadline_s) for b in o.bands]}, TPOT <= "
             f"{o.tpot_slo_s} s; goodput = highest SLO-met rate on the load ladder whose "
             f"attainment >= {o.attainment:.0%}")

    def plot(path: Path) -> None:
        plt = _plt()
        fig, axes = plt.subplots(1, len(scen), figsize=(6 * len(scen), 4), squeeze=False)
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
            ax.set_xlabel("offered req/s")
            ax.set_ylabel("req/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    data = {"budget": budget, "duration_s": sizes.d_duration_s, "loads": list(sizes.d_loads),
            "scenarios": scen}
    return Experiment(data, text, plot)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    o = Options(profile=str(args.profile), traces=str(traces_dir(args.traces)),
                bands=parse_bands(args.ttft_bands), tpot_slo_s=args.tpot_slo_s,
                attainment=args.attainment,
                targets=tuple(sorted({args.attainment, 0.99, 0.95, 0.9}, reverse=True)),
                packed=args.packed, max_model_len=args.max_model_len,
                block_tokens=args.block_tokens, min_per_role=args.min_per_role,
                noise_cv=args.noise_cv, seed=args.seed, warmup=0.2,
                instance=InstanceSpec(b_p=4, max_num_seqs=16, max_num_batched_tokens=2048,
                                      kv_blocks=4096, block_size=16),
                gateway=GatewaySpec(rtt_s=0.001, retry_interval_s=0.02))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.jobs)
    command = " ".join(["python", "tools/sim_experiments.py", *(argv if argv is not None
                                                               else sys.argv[1:])])
    try:
        for name in args.only:
            print(f"== ({name}) {TITLES[name]}", flush=True)
            t0, ev0, cpu0 = time.perf_counter(), runner.events, runner.sim_s
            exp = RUNNERS[name](o, sizes, runner)
            wall = time.perf_counter() - t0
            report = {"experiment": name, "title": TITLES[name],
                      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                      "command": command, "git_commit": git_commit(), "machine": machine(),
                      "quick": args.quick, "jobs": args.jobs,
                      "wall_s": wall, "sim_events": runner.events - ev0,
                      "sim_cpu_s": runner.sim_s - cpu0,
                      "profile": str(Path(o.profile).resolve().relative_to(ROOT)
                                     if Path(o.profile).resolve().is_relative_to(ROOT)
                                     else o.profile),
                      "options": {"ttft_bands": [[b.max_prompt_tokens, b.deadline_s]
                                                 for b in o.bands],
                                  "tpot_slo_s": o.tpot_slo_s, "attainment": o.attainment,
                                  "attainment_targets": list(o.targets), "packed": o.packed,
                                  "max_model_len": o.max_model_len,
                                  "block_tokens": o.block_tokens,
                                  "min_per_role": o.min_per_role, "noise_cv": o.noise_cv,
                                  "seed": o.seed, "warmup_share": o.warmup,
                                  "instance": asdict(o.instance), "gateway": asdict(o.gateway)},
                      "sizes": asdict(sizes), "table": exp.text} | exp.data
            stem = f"sim_exp_{name}" + ("_packed" if args.packed else "")
            out = args.out_dir / f"{stem}.json"
            out.write_text(dumps(rounded(clean(report))) + "\n")
            print(exp.text)
            if not args.no_plot:
                exp.plot(args.out_dir / f"{stem}.png")
            print(f"({name}) {wall:.1f} s wall, {runner.events - ev0:,} events; wrote {out}\n",
                  flush=True)
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
