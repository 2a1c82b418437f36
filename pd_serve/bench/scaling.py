"""Scaling a trace's lengths to a served model's context, and prompt synthesis for requests
without prefix information.

`scale_trace(trace, max_model_len, policy=...)` -> (scaled Trace, ScaleReport). Policies:
* "blocks" (default for traces with hash-id blocks, i.e. Mooncake): every length times
  `block_tokens / block_size`, rounded up (a 512-token block becomes `block_tokens` tokens, so
  the prompt still has one block per hash id and prefix sharing survives; the scaled trace's
  `block_size` is `block_tokens`). `block_tokens` defaults to the largest power of two dividing
  `block_size` at which the trace's p`quantile` of input + output fits the context (1 if none);
* "quantile" (default otherwise): factor = min(1, max_model_len / p`quantile`(input + output))
  (numpy linear percentile; default p99), so that share of requests fits without capping and
  lengths are never scaled up;
* "factor": the given `factor` (> 0; may scale up);
* "cap": factor 1, only capping.
Scaled lengths are ceil(length x factor) and at least 1 token (a 0-token output becomes 1, as
`max_tokens` must be positive). Then each request is capped: output to `max_output` (if given),
input cut so input + output <= max_model_len (not below 1 token; hash ids cut to match), then
output cut if still over. Order, arrivals, scenario and source never change. "quantile" and
"factor" refuse traces with hash-id blocks (they would break the block structure: use "blocks").
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np

from pd_serve.bench.traces import (
    FIRST_TOKEN_ID,
    LengthStats,
    ScaleReport,
    Trace,
    TraceRequest,
    prompt_tokens,
    scale,
)

POLICIES = ("auto", "blocks", "quantile", "factor", "cap")


def _quantile_total(trace: Trace, quantile: float) -> float:
    totals = [r.input_len + r.output_len for r in trace.requests]
    return float(np.percentile(totals, quantile)) if totals else 0.0


def auto_block_tokens(trace: Trace, max_model_len: int, quantile: float = 99.0) -> int:
    """Largest power of two dividing `trace.block_size` at which the trace's p`quantile` of
    input + output, scaled by block_tokens / block_size, fits `max_model_len` (else 1)."""
    if not trace.block_size:
        raise ValueError(f"trace {trace.name!r} has no hash-id blocks")
    q = _quantile_total(trace, quantile)
    b = trace.block_size & -trace.block_size  # largest power of two dividing block_size
    while b > 1 and q * b / trace.block_size > max_model_len:
        b //= 2
    return b


def _fit(r: TraceRequest, factor: float, max_model_len: int, max_output: int | None,
         block: int | None) -> tuple[TraceRequest, bool, bool]:
    """(scaled and capped request, input cut, output cut)."""
    n_in = max(1, math.ceil(r.input_len * factor - 1e-9))
    n_out = max(1, math.ceil(r.output_len * factor - 1e-9))
    cut_out = max_output is not None and n_out > max_output
    if max_output is not None:
        n_out = min(n_out, max_output)
    cut_in = n_in + n_out > max_model_len
    if cut_in:
        n_in = max(1, max_model_len - n_out)
    if n_in + n_out > max_model_len:
        n_out, cut_out = max_model_len - n_in, True
    ids = r.hash_ids[:-(-n_in // block)] if block else r.hash_ids
    return replace(r, input_len=n_in, output_len=n_out, hash_ids=ids), cut_in, cut_out


def _choose_factor(trace: Trace, max_model_len: int, policy: str, factor: float | None,
                   quantile: float) -> float:
    if policy == "cap":
        return 1.0
    if trace.block_size:
        raise ValueError(f"policy {policy!r} would break the hash-id blocks of trace "
                         f"{trace.name!r}; use policy='blocks' (or 'cap')")
    if policy == "factor":
        if factor is None or not factor > 0 or not math.isfinite(factor):
            raise ValueError(f"policy 'factor' needs a finite factor > 0, got {factor!r}")
        return factor
    q = _quantile_total(trace, quantile)
    return min(1.0, max_model_len / q) if q > 0 else 1.0


def scale_trace(trace: Trace, max_model_len: int, policy: str = "auto",
                factor: float | None = None, block_tokens: int | None = None,
                quantile: float = 99.0,
                max_output: int | None = None) -> tuple[Trace, ScaleReport]:
    """`trace` with lengths fitted to `max_model_len` by `policy` (see the module docstring; a
    given `factor` implies "factor", a given `block_tokens` implies "blocks")."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    if max_output is not None and not 1 <= max_output < max_model_len:
        raise ValueError(f"max_output must be in [1, {max_model_len}), got {max_output}")
    if not 0 < quantile <= 100:
        raise ValueError(f"quantile must be in (0, 100], got {quantile}")
    if policy not in POLICIES:
        raise ValueError(f"unknown scaling policy {policy!r}; policies: {', '.join(POLICIES)}")
    if policy == "auto":
        policy = ("factor" if factor is not None else "blocks"
                  if trace.block_size or block_tokens else "quantile")
    if (factor is not None and policy != "factor") or (block_tokens and policy != "blocks"):
        raise ValueError(f"policy {policy!r} takes neither factor nor block_tokens (factor goes "
                         f"with 'factor', block_tokens with 'blocks')")
    if policy == "blocks":
        scaled, report = _scale_blocks(trace, max_model_len, block_tokens, quantile, max_output)
    else:
        f = _choose_factor(trace, max_model_len, policy, factor, quantile)
        fitted = [_fit(r, f, max_model_len, max_output, trace.block_size) for r in trace.requests]
        scaled = replace(trace, requests=tuple(r for r, _, _ in fitted))
        n_in, n_out = sum(c for _, c, _ in fitted), sum(c for _, _, c in fitted)
        report = ScaleReport(f, 0, n_in, n_out, policy, max_model_len,
                             sum(a or b for _, a, b in fitted))
    report = replace(report, input_before=_stats(trace, "in"), input_after=_stats(scaled, "in"),
                     output_before=_stats(trace, "out"), output_after=_stats(scaled, "out"))
    note = (f"scaled ({report.policy}) x{report.factor:g} to {max_model_len} tokens: "
            f"{report.capped} request(s) capped")
    return replace(scaled, notes=(*scaled.notes, note)), report


def _scale_blocks(trace: Trace, max_model_len: int, block_tokens: int | None, quantile: float,
                  max_output: int | None) -> tuple[Trace, ScaleReport]:
    if not trace.block_size:
        raise ValueError(f"policy 'blocks' needs a trace with hash-id blocks; {trace.name!r} "
                         f"has none (use 'quantile', 'factor' or 'cap')")
    b = block_tokens or auto_block_tokens(trace, max_model_len, quantile)
    cap = max_model_len - 1 if max_output is None else max_output
    reqs, report = scale(trace.requests, b, max_model_len, cap, block=trace.block_size)
    return replace(trace, requests=tuple(reqs), block_size=b), report


def _stats(trace: Trace, which: str) -> LengthStats:
    return LengthStats.of([r.input_len if which == "in" else r.output_len
                           for r in trace.requests])


def synth_prompt(req: TraceRequest, index: int, vocab_size: int, system_prompt_len: int = 0,
                 salt: int = 0) -> list[int]:
    """Prompt for a request without hash ids: the first `system_prompt_len` tokens are one fixed
    system prompt per scenario (so a prefix cache can hit within a scenario), the rest random
    tokens seeded by the request's `index` in its trace and `salt`; `input_len` tokens."""
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_TOKEN_ID}, got {vocab_size}")
    if system_prompt_len < 0:
        raise ValueError(f"system_prompt_len must be >= 0, got {system_prompt_len}")
    vocab = range(FIRST_TOKEN_ID, vocab_size)
    n_sys = min(system_prompt_len, req.input_len)
    system = random.Random(f"system-prompt:{salt}:{req.scenario}").choices(vocab, k=n_sys)
    body = random.Random(f"request:{salt}:{index}").choices(vocab, k=req.input_len - n_sys)
    return system + body


def request_prompt(trace: Trace, index: int, vocab_size: int, system_prompt_len: int = 0,
                   salt: int = 0) -> list[int]:
    """Prompt of `trace.requests[index]`: its hash-id blocks of `trace.block_size` tokens when
    it has hash ids (Mooncake, also after "blocks" scaling), else `synth_prompt`."""
    req = trace.requests[index]
    if req.hash_ids and trace.block_size:
        return prompt_tokens(req, trace.block_size, vocab_size, salt)
    return synth_prompt(req, index, vocab_size, system_prompt_len, salt)
