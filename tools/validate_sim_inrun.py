"""Simulations of tools/validate_sim.py whose step times come from the deployment's own step
traces (`server.step_trace_dir`, pd_serve.engine.step_trace) instead of the runner profile and
the probes: the machine's speed as it was during the runs, which a shared VM changes by more
than the tolerance within minutes (docs/benchmarks.md section 7).

Three fits per real run (pd_serve.sim.steps, each step timed by its period: the step plus the
engine thread's work up to the next one, the two instances sharing the cores included):
* *other_rates*: the steps of the runs at the other rates only (never a run of this workload);
* *held_out*: the steps of every other run of the session (other rates and the other repeat of
  this rate), never the run the simulation is compared with;
* *inrun*: the run's own steps. This checks what the simulator adds to the step times:
  batching, queueing, admission, hand-off and the composition into TTFT and TPOT percentiles.
All three simulate the run's workload with the first-token path of the probes (the mean of
the probes before and after the runs) and its extra delay while the other instance computes
(`--host-size 2`, factors 1: the periods already include the co-location slowdown).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from validate_sim_lib import sim_run

from pd_serve.sim.latency import LatencyProfile
from pd_serve.sim.steps import fit_samples, read_step_trace, trace_files, trace_samples

INRUN_SIMS = ("other_rates", "held_out", "inrun")


def rtt_terms(cal: dict[str, Any], after: dict[str, Any] | None) -> tuple[float, float]:
    """(first-token path RTT, extra delay under load), ms: the probes before and after."""
    cals = [cal] + ([after] if after else [])
    rtt = float(np.mean([c["rtt_ms"] for c in cals]))
    delay = float(np.mean([c["rtt_loaded_ms"] - c["rtt_ms"] for c in cals]))
    return rtt, max(0.0, delay)


def windows(runs: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    return {r["label"]: (r["t_start"], r["t_end"]) for r in runs if "t_start" in r}


Samples = tuple[list[Any], list[Any]]  # (prefill, decode) latency samples


def run_samples(traces: list[list[Any]], wins: dict[str, tuple[float, float]],
                ) -> dict[str, Samples]:
    """Each run's step samples (its own window), read out of the traces once."""
    return {label: trace_samples(traces, a, b) for label, (a, b) in wins.items()}


def fit_runs(samples: dict[str, Samples], base: LatencyProfile, runs: list[str],
             ) -> LatencyProfile:
    """Step models fitted on the steps of `runs` together."""
    pre = [s for r in runs for s in samples[r][0]]
    dec = [s for r in runs for s in samples[r][1]]
    return fit_samples(pre, dec, base, {"source": "step traces of runs", "runs": runs})


def fit_sets(runs: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, list[str]]:
    """Per simulation kind, the labels of the runs whose steps its models are fitted on."""
    others = sorted(r["label"] for r in runs if r["label"] != run["label"])
    same_rate = {r["label"] for r in runs if r["load"] == run["load"]}
    return {"other_rates": [r for r in others if r not in same_rate], "held_out": others,
            "inrun": [run["label"]]}


def inrun_sims(real: dict[str, Any], base: LatencyProfile, cal: dict[str, Any],
               after: dict[str, Any] | None, work: Path,
               ) -> dict[str, dict[str, dict[str, Any]]] | None:
    """Per simulation kind, one simulation per real run, by the run's label; None when the
    session has no step traces (sessions before they existed)."""
    runs = real["runs"]
    if not real.get("step_trace_dir") or any("t_start" not in r for r in runs):
        return None
    traces = [read_step_trace(f)[1] for f in trace_files([Path(real["step_trace_dir"])])]
    samples = run_samples(traces, windows(runs))
    rtt, delay = rtt_terms(cal, after)
    extra = ["--host-size", "2", "--host-prefill-factor", "1", "--host-decode-factor", "1",
             "--host-first-token-delay-ms", f"{delay:.3f}"]
    out: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in INRUN_SIMS}
    for run in runs:
        label = run["label"]
        for kind, fitted_on in fit_sets(runs, run).items():
            prof = fit_runs(samples, base, fitted_on)
            path = work / f"profile_{kind}_{label}.json"
            prof.save(path)
            sim = sim_run(path, run["workload_args"], rtt, work / f"sim{kind}_{label}.json",
                          work / f"sim{kind}_{label}.jsonl", extra)
            sim.update(rtt_ms=rtt, first_token_delay_ms=delay,
                       steps=prof.provenance.get("steps"),
                       fit_errors=prof.provenance.get("fit_errors"),
                       prefill=asdict(prof.prefill), decode=asdict(prof.decode))
            out[kind][label] = sim
    return out
