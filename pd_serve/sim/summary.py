"""Aggregates of per-request records (as columns): outcomes, TTFT/TPOT/E2E percentiles,
throughput and SLO success, overall and per scenario. Definitions match the gateway's
(pd_serve.gateway.timeline): TTFT = first token - arrival; TPOT = (end - first token) /
(output tokens - 1) for finished requests with at least 2 tokens; E2E = end - arrival for
finished ones; SLO success = finished, first token within its TTFT deadline and (when given)
TPOT and E2E within their limits, over all requests (a one-token request has no TPOT)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pd_serve.sim.records import OUTCOMES

PERCENTILES = (50, 90, 99)


def _pct(name: str, values: np.ndarray) -> dict[str, float | None]:
    return {f"{name}_p{p}_s": (float(np.percentile(values, p)) if len(values) else None)
            for p in PERCENTILES} | {f"{name}_mean_s": (float(values.mean()) if len(values)
                                                         else None)}


def summarize(cols: Mapping[str, np.ndarray], tpot_slo_s: float | None = None,
              e2e_slo_s: float | None = None) -> dict[str, Any]:
    """The aggregates of the requests in `cols` (see the module docstring)."""
    n = len(cols["arrival_s"])
    out: dict[str, Any] = {"requests": n}
    outcome = cols["outcome"]
    for code, name in enumerate(OUTCOMES):
        out[name] = int(np.count_nonzero(outcome == code))
    out["open"] = int(np.count_nonzero(outcome < 0))
    if n == 0:
        return out
    arrival, first, end = cols["arrival_s"], cols["first_token_s"], cols["end_s"]
    tokens = cols["output_tokens"]
    fin = outcome == 0
    has_first = ~np.isnan(first)
    multi = fin & (tokens >= 2)
    tpot = (end[multi] - first[multi]) / (tokens[multi] - 1)
    out |= _pct("ttft", first[has_first] - arrival[has_first])
    out |= _pct("tpot", tpot)
    out |= _pct("e2e", end[fin] - arrival[fin])
    ended = end[outcome >= 0]
    span = float(ended.max() - arrival.min()) if len(ended) else 0.0
    out["span_s"] = span
    out["throughput_rps"] = float(fin.sum() / span) if span > 0 else None
    out["output_tokens_per_s"] = float(tokens[fin].sum() / span) if span > 0 else None
    ok = fin & (cols["ttft_slo_met"] == 1)
    if tpot_slo_s is not None:
        tpot_ok = np.ones(n, dtype=bool)
        tpot_ok[multi] = tpot <= tpot_slo_s
        ok &= tpot_ok
    if e2e_slo_s is not None:
        ok &= (end - arrival) <= e2e_slo_s
    out["slo_success_rate"] = float(ok.sum() / n)
    out["ttft_slo_met_rate"] = float(np.count_nonzero(cols["ttft_slo_met"] == 1) / n)
    prompt = cols["prompt_tokens"].astype(np.int64)
    out["prefix_hit_rate"] = (float(cols["cached_tokens"].sum() / prompt.sum())
                              if prompt.sum() else 0.0)
    out["rejections_per_request"] = float(cols["rejections"].mean())
    return out


def summarize_by_scenario(cols: Mapping[str, np.ndarray], names: Sequence[str],
                          limits: Sequence[tuple[float | None, float | None]]) -> dict[str, Any]:
    """{"overall": ..., "scenarios": {name: ...}}; `limits`: each scenario's (TPOT, E2E)
    limits; overall SLO success counts each request against its own scenario's."""
    per: dict[str, Any] = {}
    ok_total = 0.0
    for i, name in enumerate(names):
        mask = cols["scenario"] == i
        sub = {k: v[mask] for k, v in cols.items()}
        per[name] = summarize(sub, *limits[i])
        ok_total += per[name].get("slo_success_rate", 0.0) * per[name]["requests"]
    overall = summarize(cols)
    if overall["requests"]:
        overall["slo_success_rate"] = ok_total / overall["requests"]
    return {"overall": overall, "scenarios": per}


def clean(value: Any) -> Any:
    """NaN and inf as None, recursively (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value
