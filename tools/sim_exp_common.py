"""Shared setup of tools/sim_experiments.py: sizes, options, latency profile and workloads.

`Sizes` (full run vs `QUICK`) and `Options` (the command line's SLO and model settings) are
what every experiment reads; `Workload` is the small picklable description of a run's
requests, built into requests inside the worker (`build_requests`) from the length traces
(arXiv, ShareGPT) or the Mooncake conversation trace (rotated copies as scenarios, optional
per-scenario system prompts). Importing this module puts the repository root on sys.path, so
pd_serve imports work without PYTHONPATH.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pd_serve.bench.arrivals import poisson_times, trace_times  # noqa: E402
from pd_serve.bench.scaling import scale_trace  # noqa: E402
from pd_serve.bench.tagging import merge_traces  # noqa: E402
from pd_serve.bench.trace_formats import load_trace  # noqa: E402
from pd_serve.bench.traces import Trace, TraceRequest, spread_buckets  # noqa: E402
from pd_serve.config import TTFTBand  # noqa: E402
from pd_serve.orchestrator.planner import Plan  # noqa: E402
from pd_serve.sim.config import GatewaySpec, InstanceSpec  # noqa: E402
from pd_serve.sim.latency import (  # noqa: E402
    DecodeSample,
    LatencyProfile,
    PrefillSample,
    fit_decode,
    fit_prefill,
)
from pd_serve.sim.plan import LengthStats, plan_groups  # noqa: E402

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


@lru_cache(maxsize=4)
def load_profile(path: str, packed: bool = False) -> LatencyProfile:
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


def mooncake_base(o: Options, sizes: Sizes) -> Trace:
    return fitted_mooncake(str(Path(o.traces) / MOONCAKE), o.max_model_len, o.block_tokens,
                           sizes.mooncake_limit)


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
# Length scenarios and their plans ((a) and (d))


def length_stats_of(trace: Trace) -> LengthStats:
    st = LengthStats()
    for r in trace.requests:
        st.add(r)
    return st


def length_plans(o: Options, prof: LatencyProfile,
                 budget: int) -> Iterator[tuple[str, LengthStats, Plan]]:
    """Per length scenario (arXiv, ShareGPT): its length statistics and the planner's split of
    `budget` instances."""
    for name, rel in LENGTH_TRACES.items():
        stats = length_stats_of(fitted_lengths(str(Path(o.traces) / rel), o.max_model_len))
        plan = plan_groups({name: stats}, prof, o.instance, o.gateway.rtt_s, budget,
                           o.min_per_role)[name]
        yield name, stats, plan
