"""The benchmark's requests: one or more traces (or vLLM-style random lengths) turned into
prompts with lengths fitted to the served model, scheduled by an arrival process.

Lifecycle:
1. `load_workload(spec)` reads every trace with `trace_formats.load_trace` (any format;
   several traces are merged, each one a scenario named after it), keeps the first
   `num_prompts` and optionally tags scenarios (`tagging.tag_scenarios`); without a trace,
   `random_trace` draws lengths uniform in [L(1-r), L(1+r)] as vLLM's `random` dataset;
2. `fit` scales the lengths to the context with `scaling.scale_trace` (policy `auto`: Mooncake
   hash-id blocks shrink to `block_tokens`, others by the p99 factor; `cap`: only capping) when
   the context is known, and caps output at `max_output`;
3. `build_requests` synthesises every prompt with `scaling.request_prompt` (the hash-id blocks,
   so equal prefixes stay equal and prefix caching is exercised as in the trace; else random
   ids after an optional per-scenario system prompt); `salt` changes every token while keeping
   the sharing; in `text` mode each id becomes one common English word; and gives each request
   its send time from `arrivals.schedule`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pd_serve.bench.arrivals import ArrivalSpec, schedule
from pd_serve.bench.client import BenchRequest
from pd_serve.bench.scaling import request_prompt, scale_trace
from pd_serve.bench.tagging import merge_traces, tag_scenarios
from pd_serve.bench.trace_formats import load_trace
from pd_serve.bench.traces import FIRST_TOKEN_ID, Trace, TraceRequest

PROMPT_MODES = ("tokens", "text")
BIG_CONTEXT = 1 << 30  # "no context limit" when the server does not report one
WORDS = ("the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on",
         "are", "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one",
         "had", "by", "word", "but", "not", "what", "all", "were", "we", "when", "your", "can",
         "said", "there", "use", "an", "each", "which", "she", "do", "how", "their", "if",
         "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some",
         "her", "would", "make", "like", "him")


@dataclass(frozen=True)
class WorkloadSpec:
    """Which requests: trace files or random lengths, how many, and how they are fitted."""

    traces: tuple[str, ...] = ()
    trace_format: str | None = None  # None: detected per file
    num_prompts: int | None = None  # None: the whole trace (random: required)
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    scale_policy: str = "auto"  # scaling.POLICIES
    scale_factor: float | None = None
    block_tokens: int | None = None
    max_model_len: int | None = None
    max_output: int | None = None
    prompt_mode: str = "tokens"
    vocab_size: int = 1024
    system_prompt_len: int = 0
    scenario: str | None = None  # overrides every request's scenario
    tag_scenarios: str | None = None  # tagging.MODES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got "
                             f"{self.prompt_mode!r}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not self.traces and self.num_prompts is None:
            raise ValueError("without --trace, --num-prompts is required")
        if self.input_len < 1 or self.output_len < 1 or not 0 <= self.range_ratio < 1:
            raise ValueError("input_len and output_len must be >= 1 and 0 <= range_ratio < 1")
        if self.vocab_size <= FIRST_TOKEN_ID:
            raise ValueError(f"vocab_size must exceed {FIRST_TOKEN_ID}, got {self.vocab_size}")


def random_trace(spec: WorkloadSpec) -> Trace:
    """vLLM `random` lengths: uniform integers in [L(1-r), L(1+r)], seeded; untimed."""
    n = spec.num_prompts or 0
    rng = np.random.default_rng(spec.seed)

    def lengths(mean: int) -> list[int]:
        lo, hi = max(1, int(mean * (1 - spec.range_ratio))), int(mean * (1 + spec.range_ratio))
        return [int(x) for x in rng.integers(lo, max(lo, hi) + 1, size=n)]

    reqs = tuple(TraceRequest(0.0, i, o, source=f"random:{k}") for k, (i, o) in
                 enumerate(zip(lengths(spec.input_len), lengths(spec.output_len))))
    return Trace("random", reqs, timed=False, fmt="random")


def load_workload(spec: WorkloadSpec) -> Trace:
    """The workload's trace before fitting (see the module docstring)."""
    if not spec.traces:
        return random_trace(spec)
    loaded = [load_trace(p, spec.trace_format, limit=spec.num_prompts) for p in spec.traces]
    if len(loaded) == 1:
        trace = loaded[0]
    else:
        trace = merge_traces(loaded)
        trace = replace(trace, requests=trace.requests[:spec.num_prompts])
    if not trace.requests:
        raise ValueError(f"{', '.join(spec.traces)}: no requests")
    if spec.tag_scenarios:
        trace, _ = tag_scenarios(trace, spec.tag_scenarios)
    return trace


def fit(trace: Trace, spec: WorkloadSpec) -> Trace:
    """Lengths fitted to the context (see the module docstring); order and scenarios kept."""
    if spec.max_model_len is None and spec.block_tokens is None and spec.scale_factor is None:
        cap = spec.max_output or BIG_CONTEXT
        return replace(trace, requests=tuple(
            replace(r, output_len=min(max(1, r.output_len), cap)) for r in trace.requests))
    policy = "factor" if spec.scale_factor is not None and spec.scale_policy == "auto" \
        else spec.scale_policy
    scaled, _ = scale_trace(trace, spec.max_model_len or BIG_CONTEXT, policy,
                            spec.scale_factor, spec.block_tokens, max_output=spec.max_output)
    return scaled


def prompt_of(trace: Trace, index: int, spec: WorkloadSpec, salt: int = 0) -> list[int] | str:
    """Prompt of `trace.requests[index]`: token ids, or words in text mode."""
    ids = request_prompt(trace, index, spec.vocab_size, spec.system_prompt_len, salt)
    if spec.prompt_mode == "text":
        return " ".join(WORDS[i % len(WORDS)] for i in ids)
    return ids


def build_requests(spec: WorkloadSpec, arrivals: ArrivalSpec, salt: int = 0,
                   loaded: Trace | None = None) -> list[BenchRequest]:
    """The run's requests with prompts and send times; `loaded`: an already loaded and fitted
    trace (a sweep fits once and builds per rate)."""
    trace = loaded if loaded is not None else fit(load_workload(spec), spec)
    times = schedule(arrivals, trace.requests)
    return [BenchRequest(i, prompt_of(trace, i, spec, salt), r.input_len, r.output_len,
                         spec.scenario or r.scenario, t)
            for i, (r, t) in enumerate(zip(trace.requests, times))]
