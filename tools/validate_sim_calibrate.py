"""Calibration of tools/validate_sim.py: physical parameters from the probe measurements
(tools/validate_sim_probes.py) against the runner profile, and the calibrated simulation of
one rate. Nothing here is fitted to the validation runs.

`calibrate(probes, profile)`:
* round trip as the simulator defines it (TTFT of a lone request = prefill + RTT): the median
  of real TTFT minus simulated TTFT at RTT 0 over the first-token-path probes;
* prefill scale: real / model of the lone 256 / 512 / 1,024-token prefills (geometric mean),
  applied to the whole prefill model;
* per-step decode overhead: steady step time minus the profile's over every decode probe
  (B = 1 to 16 at context ~130, B = 16 at ~1,100), fitted a + b*B + c*B*ctx on relative
  error, non-negative (added to the decode model by `with_decode_overhead`);
* profile check (decides the re-profile): lone prefills against the profile, the batch of 16
  at context ~1,100 against the profile plus the a + b*B overhead of the short contexts only;
* co-location: under decode load TTFT(n) = rtt_loaded + f_p x prefill(n) from the short and
  the long prompt (each prefill lies inside the decode batch's steady window: fully overlapped,
  which is what the host model's f_p means); f_d = 1 + (s - 1) / duty, s the decode step
  slowdown under the prefill loop and duty the fraction of that window in which the loop's
  prefills computed (the host model slows decode only while prefill computes).

`hosted_sim` runs `pd-serve sim run` with both instances on one shared host
(`--host-size 2 --host-prefill-factor f_p --host-decode-factor f_d
--host-first-token-delay-ms (rtt_loaded - rtt)`, pd_serve.sim.host): a step stretches, and a
first token is delayed, only while the other instance computes. `mean_field_sim`, the earlier
approximation kept for comparison, scales every step by the mean slowdown instead: prefill
steps x k_p = 1 + (f_p - 1) u_d, decode steps x k_d = 1 + (f_d - 1) u_p, RTT = rtt +
(rtt_loaded - rtt) u_d, with u_p, u_d the busy fractions of the simulated run
(`busy_fractions`), iterated to a fixed point (at most 6 runs).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from validate_sim_lib import SHAPE, sim_run

from pd_serve.bench.traces import TraceRequest
from pd_serve.sim.config import GatewaySpec, InstanceSpec, ScenarioSpec, SimConfig
from pd_serve.sim.latency import LatencyProfile
from pd_serve.sim.run import simulate

med = np.median


# ----- simulating probe workloads and adjusting profiles -------------------------------------

def instance_spec() -> InstanceSpec:
    return InstanceSpec(SHAPE["b_p"], SHAPE["max_num_seqs"], SHAPE["max_num_batched_tokens"],
                        SHAPE["num_blocks"], SHAPE["block_size"])


def sim_probe(prof: LatencyProfile, shapes: list[tuple[int, int]], rtt_s: float,
              ) -> list[dict[str, Any]]:
    """The simulator's records of `shapes` all arriving at 0 on a 1:1 deployment."""
    cfg = SimConfig((ScenarioSpec("default", 1, 1),), instance=instance_spec(),
                    gateway=GatewaySpec(rtt_s))
    res = simulate([TraceRequest(0.0, n, o) for n, o in shapes], cfg, prof)
    return list(res.recorder.records())


def _sim_ttft(rec: dict[str, Any]) -> float:
    return float(rec["first_token_s"] - rec["arrival_s"])


def _lone_ttft_rtt0(prof: LatencyProfile, n: int) -> float:
    """Simulated TTFT of a lone prompt of `n` tokens at RTT 0 (the profile's prefill time)."""
    return _sim_ttft(sim_probe(prof, [(n, 1)], 0.0)[0])


def with_decode_overhead(prof: LatencyProfile, a: float, b: float, c: float = 0.0,
                         ) -> LatencyProfile:
    d = prof.decode
    return replace(prof, decode=replace(d, intercept_s=d.intercept_s + a,
                                        per_seq_s=d.per_seq_s + b,
                                        per_context_s=d.per_context_s + c))


def calibrated_profile(base: LatencyProfile, cal: dict[str, Any]) -> LatencyProfile:
    """`base` with the measured decode overhead added and the prefill model scaled to the
    deployment's lone prefills (`prefill_scale`; 1 for calibrations made before it)."""
    dov = cal["decode_overhead"]
    prof = with_decode_overhead(base, dov["intercept_ms"] / 1000, dov["per_seq_ms"] / 1000,
                                dov.get("per_context_us", 0.0) / 1e6)
    k = cal.get("prefill_scale", 1.0)
    return scaled(prof, k, 1.0)


def scaled(prof: LatencyProfile, k_p: float, k_d: float) -> LatencyProfile:
    p, d = prof.prefill, prof.decode
    return replace(prof, prefill=replace(
        p, intercept_s=p.intercept_s * k_p, per_seq_s=p.per_seq_s * k_p,
        per_token_s=p.per_token_s * k_p, per_attn_s=p.per_attn_s * k_p), decode=replace(
        d, intercept_s=d.intercept_s * k_d, per_seq_s=d.per_seq_s * k_d,
        per_context_s=d.per_context_s * k_d))


# ----- calibration from the probes ------------------------------------------------------------

def calibrate(probes: dict[str, Any], prof: LatencyProfile) -> dict[str, Any]:
    """Physical parameters from the probes against `prof` (see the module docstring)."""
    rtt, over = first_token_path(probes, prof)
    k = prefill_scale(probes, prof, rtt)
    rtt, over = first_token_path(probes, scaled(prof, k, 1.0))  # once more, prefill scaled
    k = prefill_scale(probes, prof, rtt)
    short = decode_overhead(probes["decode_ctx64"], prof, context=False)
    check = profile_check(probes, prof, with_decode_overhead(prof, *short["coef"]), rtt)
    # f_p relative to the scaled prefill model the simulation uses
    colocation, rtt_loaded = colocation_factors(probes["colocation"], scaled(prof, k, 1.0), rtt)
    full = decode_overhead([*probes["decode_ctx64"], probes["decode_b16_ctx1024"]], prof,
                           context=True)
    return {
        "rtt_bare_ms": 1000 * probes["rtt_bare_s"], "rtt_ms": 1000 * rtt,
        "rtt_loaded_ms": 1000 * max(rtt, rtt_loaded),
        "first_token_path_overheads_ms": [round(1000 * v, 2) for v in over],
        "decode_overhead": {"intercept_ms": 1000 * full["coef"][0],
                            "per_seq_ms": 1000 * full["coef"][1],
                            "per_context_us": 1e6 * full["coef"][2], "per_probe": full["rows"]},
        "decode_overhead_short_context": {"intercept_ms": 1000 * short["coef"][0],
                                          "per_seq_ms": 1000 * short["coef"][1]},
        "prefill_scale": k, "profile_check": check, "colocation": colocation}


def first_token_path(probes: dict[str, Any], prof: LatencyProfile) -> tuple[float, list[float]]:
    """(RTT as the simulator defines it, each probe's overhead): real TTFT of the short lone
    prompts minus the simulated TTFT at RTT 0 (the profile's prefill time); median."""
    over = [t - _lone_ttft_rtt0(prof, int(n))
            for n, ts in probes["first_token_path"].items() for t in ts]
    return float(max(0.0, med(over))), over


def prefill_scale(probes: dict[str, Any], prof: LatencyProfile, rtt: float) -> float:
    """Real / model of the lone prefills (TTFT less `rtt`), geometric mean: the profile keeps
    the fastest of its repeats, measured in isolation; the deployment pays typical steps."""
    ratios = [(float(med(ts)) - rtt) / prof.prefill.time_of([(0, int(n))])
              for n, ts in probes["prefill_lone_s"].items()]
    return float(np.exp(np.mean(np.log(ratios))))


def decode_overhead(steps: list[dict[str, Any]], prof: LatencyProfile, context: bool,
                    ) -> dict[str, Any]:
    """What the deployment's steady decode steps take beyond the profile's: fitted
    a + b*B (+ c*B*ctx with `context`, the padded context term) on relative error, every term
    non-negative; coefficients in s and the rows."""
    rows = []
    for st in steps:
        b, ctx = st["batch"], round(st["context"])
        model = prof.decode.time_of([ctx] * b)
        rows.append({"batch": b, "context": ctx, "real_ms": 1000 * st["step_s"],
                     "model_ms": 1000 * model, "diff_ms": 1000 * (st["step_s"] - model)})
    x = np.array([[1.0, r["batch"], r["batch"] * r["context"]][:3 if context else 2]
                  for r in rows])
    y = np.array([r["diff_ms"] / 1000 for r in rows])
    w = 1.0 / np.array([r["real_ms"] / 1000 for r in rows])
    coef = _nonneg_lstsq(x * w[:, None], y * w)
    fitted = x @ coef
    for r, f in zip(rows, fitted):
        r["fit_rel_err"] = (r["model_ms"] / 1000 + f) / (r["real_ms"] / 1000) - 1
    return {"coef": [float(c) for c in coef], "rows": rows}


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (the most negative term dropped, refitted)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        if sol.min() >= 0:
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def profile_check(probes: dict[str, Any], prof: LatencyProfile, calibrated: LatencyProfile,
                  rtt: float) -> dict[str, Any]:
    """Lone prefills (their TTFT less `rtt`) against `prof`'s prefill model; the batch of 16 at
    context ~1,100 against `calibrated`'s decode model (relative errors: model / real - 1)."""
    lone = {n: float(med(ts)) - rtt for n, ts in probes["prefill_lone_s"].items()}
    p_err = {n: prof.prefill.time_of([(0, int(n))]) / t - 1 for n, t in lone.items()}
    big = probes["decode_b16_ctx1024"]
    d_model = calibrated.decode.time_of([round(big["context"])] * big["batch"])
    return {"prefill_lone_real_ms": {n: 1000 * t for n, t in lone.items()},
            "prefill_lone_model_rel_err": p_err,
            "prefill_rel_err": max(p_err.values(), key=abs),
            "decode_b16_real_ms": 1000 * big["step_s"],
            "decode_b16_context": big["context"],
            "decode_b16_model_ms": 1000 * d_model,
            "decode_rel_err": d_model / big["step_s"] - 1}


def colocation_factors(col: dict[str, Any], prof: LatencyProfile, rtt: float,
                       ) -> tuple[dict[str, Any], float]:
    """(f_p, f_d and what they came from, rtt_loaded in s) from the co-location probe."""
    f_d = float(med([s["step_s"] for s in col["decode_with_prefill"]])
                / med([s["step_s"] for s in col["decode_alone"]]))
    # under decode load TTFT(n) = rtt_loaded + f_p * prefill(n): the short prompt gives the
    # path (additive: busy event loops and relays), the long one the compute slowdown
    pre = col["prefill_with_decode_ttft_s"]
    (n_s, t_s), (n_l, t_l) = ((int(n), float(med(ts))) for n, ts in sorted(
        pre.items(), key=lambda kv: int(kv[0])))
    m_s, m_l = (_lone_ttft_rtt0(prof, n) for n in (n_s, n_l))
    f_p = (t_l - t_s) / (m_l - m_s)
    rtt_loaded = t_s - f_p * m_s
    duty = prefill_duty(col.get("prefill_loops", []), prof, max(1.0, f_p), rtt)
    f_d_host = 1 + (f_d - 1) / duty if duty else f_d
    return {"f_p": max(1.0, f_p), "f_d": max(1.0, f_d), "f_p_measured": f_p,
            "f_d_measured": f_d, "prefill_duty": duty, "f_d_host_measured": f_d_host,
            "f_d_host": max(1.0, f_d_host), "rtt_loaded_measured_ms": 1000 * rtt_loaded,
            "prefill_loaded_ttft_ms": {n_s: 1000 * t_s, n_l: 1000 * t_l},
            "prefill_samples": {n: len(ts) for n, ts in pre.items()}}, rtt_loaded


def prefill_duty(loops: list[dict[str, Any]], prof: LatencyProfile, f_p: float, rtt: float,
                 ) -> float | None:
    """Fraction of the decode batch's steady windows in which the prefill loop computed: each
    prefill ends half an RTT before its first token reaches the client and took f_p x the
    profile's time (None for probes recorded before the loops were)."""
    busy = total = 0.0
    lone = {n: _lone_ttft_rtt0(prof, n) for n in {int(p["prompt"]) for lp in loops
                                                  for p in lp["prefills"]}}
    for loop in loops:
        window = loop["window_s"]
        total += window
        for p in loop["prefills"]:
            end = p["sent_s"] + p["ttft_s"] - rtt / 2
            start = end - f_p * lone[int(p["prompt"])]
            busy += max(0.0, min(end, window) - max(start, 0.0))
    return busy / total if total > 0 else None


# ----- the calibrated simulations of one rate -------------------------------------------------

def hosted_sim(base: LatencyProfile, cal: dict[str, Any], args: list[str], work: Path,
               tag: str) -> dict[str, Any]:
    """The simulation with both instances on one shared host (pd_serve.sim.host)."""
    prof = calibrated_profile(base, cal)
    col = cal["colocation"]
    f_p, f_d = col["f_p"], col.get("f_d_host", col["f_d"])
    prof = replace(prof, provenance={**prof.provenance, "calibration": {
        "decode_overhead": cal["decode_overhead"], "host": [f_p, f_d],
        "prefill_scale": cal.get("prefill_scale", 1.0)}})
    path = work / f"profile_host_{tag}.json"
    prof.save(path)
    delay = cal["rtt_loaded_ms"] - cal["rtt_ms"]  # first-token path under decode load
    out = sim_run(path, args, cal["rtt_ms"], work / f"simhost_{tag}.json",
                  work / f"simhost_{tag}.jsonl", [
                      "--host-size", "2", "--host-prefill-factor", f"{f_p:.4f}",
                      "--host-decode-factor", f"{f_d:.4f}",
                      "--host-first-token-delay-ms", f"{delay:.3f}"])
    out.update(f_p=f_p, f_d=f_d, rtt_ms=cal["rtt_ms"], first_token_delay_ms=delay)
    return out


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -np.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def busy_fractions(recs: list[dict[str, Any]], prof: LatencyProfile, k_p: float,
                   rtt_s: float) -> tuple[float, float]:
    """(prefill, decode) busy fractions of a simulated 1:1 run from its records: decode from
    each request's first token to its end; prefill the `k_p`-scaled prefill time before each
    first token (lone-batch time; batches are rare at these loads)."""
    fin = [r for r in recs if r["first_token_s"] is not None]
    t0 = min(r["arrival_s"] for r in recs)
    t1 = max(r["end_s"] for r in recs if r["end_s"] is not None)
    dec = [(r["first_token_s"], r["end_s"]) for r in fin
           if r["output_tokens"] >= 2 and r["end_s"] is not None]
    pre = [(r["first_token_s"] - rtt_s / 2 - k_p * prof.prefill.time_of([(0, r["prompt_tokens"])]),
            r["first_token_s"] - rtt_s / 2) for r in fin]
    span = max(t1 - t0, 1e-9)
    return _union(pre) / span, _union(dec) / span


def mean_field_sim(base: LatencyProfile, cal: dict[str, Any], args: list[str], work: Path,
                   tag: str) -> dict[str, Any]:
    """The mean-field simulation of one rate: co-location factors iterated to a fixed point."""
    rtt0, rtt1 = cal["rtt_ms"], cal["rtt_loaded_ms"]
    rtt_ms = rtt0
    prof0 = calibrated_profile(base, cal)
    f_p, f_d = cal["colocation"]["f_p"], cal["colocation"]["f_d"]
    k_p = k_d = 1.0
    history = []
    out: dict[str, Any] = {}
    for it in range(6):
        path = work / f"profile_{tag}.json"
        prof = scaled(prof0, k_p, k_d)
        prof = replace(prof, provenance={**prof.provenance, "calibration": {
            "decode_overhead": cal["decode_overhead"],
            "prefill_scale": cal.get("prefill_scale", 1.0),
            "k_p": k_p, "k_d": k_d, "rtt_ms": rtt_ms}})
        prof.save(path)
        out = sim_run(path, args, rtt_ms, work / f"sim_{tag}.json", work / f"sim_{tag}.jsonl")
        u_p, u_d = busy_fractions(out["records"], base, k_p, rtt_ms / 1000)
        history.append({"iteration": it, "k_p": k_p, "k_d": k_d, "rtt_ms": rtt_ms, "u_p": u_p,
                        "u_d": u_d})
        new_p, new_d = 1 + (f_p - 1) * u_d, 1 + (f_d - 1) * u_p
        new_rtt = rtt0 + (rtt1 - rtt0) * u_d
        if abs(new_p - k_p) < 0.005 and abs(new_d - k_d) < 0.005 and \
                abs(new_rtt - rtt_ms) < 0.05:
            break
        k_p, k_d, rtt_ms = new_p, new_d, new_rtt
    out["fixed_point"] = history
    out["k_p"], out["k_d"], out["rtt_ms"] = k_p, k_d, rtt_ms
    return out
