"""Analysis of tools/validate_sim.py: the simulator on the workloads of the real runs, compared
metric by metric with the mean of the real repeats of each rate and with each repeat.

Per rate (the real repeats share the workload: same requests, same arrival times):
1. the real runs' metrics, their mean, min and max (the real system's own spread);
2. three simulations of the same workload from the probes: *raw* (the runner profile as is,
   bare RTT), *host* (calibrated; both instances on one shared host, pd_serve.sim.host) and
   *mean field* (calibrated; the earlier approximation, for comparison); and, in sessions with
   step traces, three per real run from the steps of real runs (tools/validate_sim_inrun.py:
   *held_out*, the verdict, *other_rates* and *inrun*);
3. relative errors of each simulation against the mean and against every repeat (a per-run
   simulation against its own run; their mean against the mean).
Per-request matching (same request index on both sides): the median ratio sim / real of TTFT
and TPOT per run, which separates a shift of the whole run from a few requests crossing a
percentile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from validate_sim_calibrate import calibrate, hosted_sim, mean_field_sim
from validate_sim_checks import drift, probe_quantities, session_flags
from validate_sim_inrun import INRUN_SIMS, inrun_sims
from validate_sim_lib import PROFILE, ROOT, sim_run

from pd_serve.sim.latency import LatencyProfile

METRICS = (("ttft_p50_ms", "median_ttft_ms"), ("ttft_p90_ms", "p90_ttft_ms"),
           ("tpot_p50_ms", "median_tpot_ms"), ("req_per_s", "request_throughput"),
           ("out_tok_per_s", "output_throughput"))
SIMS = ("host", "mean_field", "raw")


def compare(real_m: dict[str, float], sim_m: dict[str, Any], tol: float) -> dict[str, Any]:
    """`real_m` by our metric names, `sim_m` by the bench's keys."""
    out = {}
    for name, key in METRICS:
        r, s = float(real_m[name]), float(sim_m[key])
        err = s / r - 1 if r else float("inf")
        out[name] = {"real": r, "sim": s, "rel_err": err, "pass": abs(err) <= tol}
    return out


def ours(bench_metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(bench_metrics[key]) for name, key in METRICS}


def by_load(runs: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """The real runs grouped by rate, in the order they ran; every repeat of a rate must have
    the same workload."""
    out: dict[float, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run["load"], []).append(run)
    for load, group in out.items():
        if any(r["workload_args"] != group[0]["workload_args"] for r in group):
            raise ValueError(f"load {load}: the repeats ran different workloads")
    return out


def match(real_pr: dict[str, list[Any]], sim_recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-request matching by index (Poisson arrivals keep the trace order, and the prompt
    lengths must agree): median and quartiles of sim / real for TTFT and TPOT."""
    sim_by = {int(r["index"]): r for r in sim_recs}
    ratios: dict[str, list[float]] = {"ttft": [], "tpot": []}
    mismatched = 0
    for i, idx in enumerate(real_pr["index"]):
        s = sim_by.get(idx)
        if s is not None and s["prompt_tokens"] != real_pr["prompt_tokens"][i]:
            mismatched += 1
            continue
        if s is None or s.get("first_token_s") is None or real_pr["ttft_ms"][i] is None:
            continue
        ratios["ttft"].append(1000 * (s["first_token_s"] - s["arrival_s"]) / real_pr["ttft_ms"][i])
        tp = real_pr["tpot_ms"][i]
        if tp and s.get("end_s") is not None and s["output_tokens"] > 1:
            sim_tpot = (s["end_s"] - s["first_token_s"]) / (s["output_tokens"] - 1)
            ratios["tpot"].append(1000 * sim_tpot / tp)
    out: dict[str, Any] = {k: {"n": len(v), "median": float(np.median(v)) if v else None,
                               "q25": float(np.quantile(v, 0.25)) if v else None,
                               "q75": float(np.quantile(v, 0.75)) if v else None}
                           for k, v in ratios.items()}
    out["prompt_mismatches"] = mismatched
    return out


def _sims(base: LatencyProfile, profile_path: Path, cal: dict[str, Any], wl: list[str],
          work: Path, tag: str) -> dict[str, dict[str, Any]]:
    return {"raw": sim_run(profile_path, wl, cal["rtt_bare_ms"], work / f"simraw_{tag}.json",
                           work / f"simraw_{tag}.jsonl"),
            "host": hosted_sim(base, cal, wl, work, tag),
            "mean_field": mean_field_sim(base, cal, wl, work, tag)}


def sim_mean(sims: list[dict[str, Any]]) -> dict[str, float]:
    """The mean over per-run simulations, by the bench's keys."""
    return {key: float(np.mean([float(s["metrics"][key]) for s in sims])) for _, key in METRICS}


def analyse_per_run(group: list[dict[str, Any]], reals: list[dict[str, float]],
                    mean: dict[str, float], sims: list[dict[str, Any]], tol: float,
                    ) -> dict[str, Any]:
    """Simulations made per real run (tools/validate_sim_inrun.py): their mean against the
    mean of the repeats, each against its own run."""
    return {"commands": [s["command"] for s in sims],
            "vs_mean": compare(mean, sim_mean(sims), tol),
            "vs_runs": [compare(m, s["metrics"], tol) for m, s in zip(reals, sims)],
            "per_request": [match(r["per_request"], s["records"]) for r, s in zip(group, sims)],
            "fits": [{k: s[k] for k in ("steps", "fit_errors", "prefill", "decode", "rtt_ms",
                                        "first_token_delay_ms")} for s in sims]}


def analyse_load(load: float, group: list[dict[str, Any]], sims: dict[str, Any],
                 tol: float) -> dict[str, Any]:
    """One rate: the real repeats, their mean and spread, each simulation against the mean and
    against every repeat."""
    reals = [ours(r["metrics"]) for r in group]
    mean = {n: float(np.mean([m[n] for m in reals])) for n, _ in METRICS}
    row: dict[str, Any] = {
        "load": load, "rate": group[0]["rate"], "requests": group[0]["requests"],
        "real_runs": [{"label": r["label"], "metrics": m, "failed": r["metrics"]["failed"],
                       "load_avg_before": r["load_avg_before"],
                       "load_avg_after": r["load_avg_after"], "cores_used": r["cores_used"],
                       "disturbed_by": r.get("disturbed_by", []), "command": r["command"]}
                      for r, m in zip(group, reals)],
        "real_mean": mean,
        "real_min": {n: min(m[n] for m in reals) for n, _ in METRICS},
        "real_max": {n: max(m[n] for m in reals) for n, _ in METRICS}}
    for name in INRUN_SIMS:
        if sims.get(name):
            row[name] = analyse_per_run(group, reals, mean, sims[name], tol)
    for name in SIMS:
        sim = sims[name]
        row[name] = {"command": sim["command"], "vs_mean": compare(mean, sim["metrics"], tol),
                     "vs_runs": [compare(m, sim["metrics"], tol) for m in reals],
                     "per_request": [match(r["per_request"], sim["records"]) for r in group]}
    row["host"].update({k: sims["host"][k] for k in ("f_p", "f_d", "rtt_ms",
                                                      "first_token_delay_ms")})
    mf = sims["mean_field"]
    row["mean_field"].update(k_p=mf["k_p"], k_d=mf["k_d"], rtt_ms=mf["rtt_ms"],
                             fixed_point=mf["fixed_point"])
    range_reading(row)
    return row


def range_reading(row: dict[str, Any]) -> None:
    """A second reading of one rate's row, in place: is each simulated value inside the range
    the real repeats span (`in_real_range` beside `pass`)?"""
    for name in (*INRUN_SIMS, *SIMS):
        for metric, c in row.get(name, {}).get("vs_mean", {}).items():
            c["in_real_range"] = row["real_min"][metric] <= c["sim"] <= row["real_max"][metric]


def analyse(real: dict[str, Any], tol: float, work: Path) -> dict[str, Any]:
    """Every rate of `real` (the measured runs) against the three simulations."""
    profile_path = ROOT / real["reprofile"]["path"] if "reprofile" in real else PROFILE
    profile_name = str(profile_path.relative_to(ROOT))
    if "profile" in real.get("reprofile", {}):  # the session's own re-profile, as measured
        profile_path = work / "reprofile.json"
        profile_path.write_text(json.dumps(real["reprofile"]["profile"]))
    base = LatencyProfile.load(profile_path)
    cal = calibrate(real["probes"], base)
    after_cal = calibrate(real["probes_after"], base) if "probes_after" in real else None
    per_run = inrun_sims(real, base, cal, after_cal, work) or {}
    rows = []
    for load, group in sorted(by_load(real["runs"]).items()):
        tag = f"load{load:g}"
        sims: dict[str, Any] = _sims(base, profile_path, cal, group[0]["workload_args"], work,
                                     tag)
        sims.update({kind: [by_label[r["label"]] for r in group]
                     for kind, by_label in per_run.items()})
        rows.append(analyse_load(load, group, sims, tol))
    flags = session_flags(real["probes"], "probes before")
    out: dict[str, Any] = {"profile": profile_name, "calibration": cal,
                           "rows": rows, "verdict": verdict(rows), "flags": flags}
    if after_cal is not None:  # the probes repeated after the runs: did the machine drift?
        after = after_cal
        out["calibration_after"] = after
        out["drift"] = drift(probe_quantities(real["probes"], cal),
                             probe_quantities(real["probes_after"], after), tol)
        flags += session_flags(real["probes_after"], "probes after")
        flags += [f"drift: {k} {100 * out['drift']['rel_change'][k]:+.0f} % between the probes "
                  "before and after the runs" for k in out["drift"]["flagged"]]
    return out


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Passes per simulation: against the mean of the repeats, against every repeat, and
    (a second reading) against the mean or inside the range the repeats themselves span."""
    out: dict[str, Any] = {}
    for name in (*INRUN_SIMS, *SIMS):
        if any(name not in row for row in rows):
            continue
        vs_mean = [c["pass"] for row in rows for c in row[name]["vs_mean"].values()]
        vs_runs = [c["pass"] for row in rows for run in row[name]["vs_runs"]
                   for c in run.values()]
        either = [c["pass"] or c.get("in_real_range", False) for row in rows
                  for c in row[name]["vs_mean"].values()]
        out[name] = {"vs_mean": [sum(vs_mean), len(vs_mean)],
                     "vs_runs": [sum(vs_runs), len(vs_runs)],
                     "vs_mean_or_in_range": [sum(either), len(either)]}
    return out


def print_table(rows: list[dict[str, Any]], tol: float) -> None:
    """Per rate and metric: the real mean and spread, then each simulation's error against the
    mean (the first one's also against every repeat)."""
    names = [n for n in (*INRUN_SIMS, *SIMS) if all(n in row for row in rows)]
    head = (f"{'load':>5} {'metric':>13} {'real mean':>9} {'min..max':>17} "
            f"{'per run (' + names[0] + ')':>22} " + " ".join(f"{n:>10}" for n in names))
    print(head)
    print("-" * len(head))
    for row in rows:
        for name, _ in METRICS:
            first = row[names[0]]["vs_mean"][name]
            runs = " ".join(f"{100 * r[name]['rel_err']:+.1f}" for r in row[names[0]]["vs_runs"])
            errs = " ".join(f"{100 * row[n]['vs_mean'][name]['rel_err']:+9.1f}%" for n in names)
            print(f"{row['load']:5.2f} {name:>13} {first['real']:9.2f} "
                  f"{row['real_min'][name]:8.2f}..{row['real_max'][name]:<7.2f} {runs:>22} "
                  f"{errs}")
    for name, v in verdict(rows).items():
        print(f"{name}: {v['vs_mean'][0]} of {v['vs_mean'][1]} within {100 * tol:.0f} % of the "
              f"mean of the repeats, {v['vs_runs'][0]} of {v['vs_runs'][1]} of every repeat, "
              f"{v['vs_mean_or_in_range'][0]} within {100 * tol:.0f} % of the mean or inside "
              "the repeats' range")


def scrub(obj: Any, pairs: list[tuple[str, str]]) -> Any:
    """`obj` with every string's (prefix, replacement) `pairs` replaced, in order."""
    if isinstance(obj, dict):
        return {k: scrub(v, pairs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, pairs) for v in obj]
    if isinstance(obj, str):
        for old, new in pairs:
            obj = obj.replace(old, new)
        return obj
    return obj


def load_real(path: Path) -> dict[str, Any]:
    real: dict[str, Any] = json.loads(path.read_text())
    return real
