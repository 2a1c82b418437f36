"""Command-line values of `pd-serve sim run` turned into simulator inputs. The workload and the
SLOs are built exactly as `pd-serve bench run` builds them (pd_serve.bench: any trace format,
length fitting, scenario tagging, arrival processes, `--goodput` / SLO files), so a simulated
run and a measured run of the same options see the same requests at the same times.
Group specs (`n_p:n_d` for every scenario or `name=n_p:n_d,...`) are the simulator's own.
Every bad value raises ValueError naming it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pd_serve.bench.arrivals import ArrivalSpec, schedule
from pd_serve.bench.options import arrival_spec
from pd_serve.bench.slo import SLO, SLOTable, load_slo_file, parse_goodput
from pd_serve.bench.traces import Trace, TraceRequest
from pd_serve.bench.workload import WorkloadSpec, fit, load_workload
from pd_serve.config import TTFTBand

DEFAULT_DEADLINE_S = 30.0  # the gateway's TTFT deadline when the SLO has no TTFT limit


def workload(o: dict[str, Any]) -> tuple[list[TraceRequest], Trace, ArrivalSpec]:
    """(requests with their arrival times, the fitted trace, the arrival process) from the
    bench workload options (keyed by parameter name, as pd_serve.bench.options names them)."""
    spec = WorkloadSpec(
        tuple(str(t) for t in o["trace"] or ()), o["trace_format"], o["num_prompts"],
        o["input_len"], o["output_len"], o["range_ratio"], o["scale_policy"], o["scale_factor"],
        o["block_tokens"], o["max_model_len"], o["max_output"], "tokens", 1024, 0,
        o["scenario"], o["tag_scenarios"], o["seed"])
    trace = fit(load_workload(spec), spec)
    arrivals = arrival_spec(o, trace)
    times = schedule(arrivals, trace.requests)
    timed = sorted(zip(times, range(len(times))))
    return [replace(trace.requests[i], arrival_s=t) for t, i in timed], trace, arrivals


def slo_table(goodput: list[str] | None, slo_file: Path | None) -> SLOTable:
    base = load_slo_file(slo_file) if slo_file is not None else SLOTable()
    return parse_goodput(goodput or [], base)


def gateway_slo(slo: SLO) -> tuple[tuple[TTFTBand, ...], float | None, float | None]:
    """(TTFT deadline bands, TPOT limit s, E2E limit s) of a scenario: the TTFT SLO is also the
    gateway's forwarding deadline, as a scenario's `ttft_slo` is in a pd-serve config."""
    if slo.ttft_slo:
        bands = slo.ttft_slo
    else:
        bands = (TTFTBand(None, slo.ttft_ms / 1000 if slo.ttft_ms else DEFAULT_DEADLINE_S),)
    return (bands, None if slo.tpot_ms is None else slo.tpot_ms / 1000,
            None if slo.e2el_ms is None else slo.e2el_ms / 1000)


def _split(text: str, what: str) -> tuple[int, int]:
    try:
        n_p, n_d = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--groups: {what} {text!r} is not n_p:n_d") from None
    if n_p < 0 or n_d < 0 or n_p + n_d == 0:
        raise ValueError(f"--groups: {what} {text!r} needs non-negative counts, not both 0")
    return n_p, n_d


def parse_groups(spec: str, scenarios: list[str]) -> dict[str, tuple[int, int]]:
    """`2:3` (every scenario) or `chat=2:3,code=1:1` (every scenario of the trace named)."""
    spec = spec.strip()
    if "=" not in spec:
        both = _split(spec, "group")
        return {s: both for s in scenarios}
    out: dict[str, tuple[int, int]] = {}
    for item in spec.split(","):
        name, _, counts = item.partition("=")
        out[name.strip()] = _split(counts.strip(), f"scenario {name.strip()!r}:")
    missing = sorted(set(scenarios) - set(out))
    if missing:
        raise ValueError(f"--groups: no group for scenario(s) {', '.join(missing)} of the trace")
    return out
