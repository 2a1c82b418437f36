"""Diagnosis of tools/validate_sim.py runs from the real runs' own timings (nothing here feeds
the simulator): each real run's batch compositions replayed through the calibrated decode
model, and its lone prefills against the calibrated prefill model, split by whether the other
instance computed at the time, which gives the co-location slowdowns at the runs' own
operating points to compare with the probes' f_p and f_d.

1. token times per request: first token at send + TTFT, then the inter-token latencies;
2. decode: for every inter-token gap, the batch at its midpoint (requests between their first
   and last token) and its padded context; the gap against the decode model plus the measured
   overhead; a gap overlaps prefill when some request's prefill (the profile's time ending half
   an RTT before its first token) covers its midpoint;
3. prefill: requests whose prefill did not queue (no other request between its send and its
   first token) and whose prompt is at least 256 tokens; (TTFT - RTT) against the profile's
   prefill time, split by whether decode ran during most of it.

    python tools/validate_sim_replay.py WORK [--out replay.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from validate_sim_calibrate import calibrate, calibrated_profile
from validate_sim_lib import PROFILE, ROOT

from pd_serve.sim.latency import LatencyProfile


def token_times(r: dict[str, Any]) -> list[float]:
    first = r["send_s"] + r["ttft_s"]
    return [first, *(first + np.cumsum(r["itl_s"]))]


def decode_replay(reqs: list[dict[str, Any]], prof: LatencyProfile,
                  busy_p: list[tuple[float, float]]) -> dict[str, Any]:
    """Real inter-token gaps against the decode model at their batch (see the docstring)."""
    times = {r["index"]: token_times(r) for r in reqs}
    spans = [(t[0], t[-1], r["prompt_tokens"], t) for r in reqs for t in [times[r["index"]]]]
    ratios: dict[bool, list[float]] = {True: [], False: []}
    for r in reqs:
        t = times[r["index"]]
        for a, b in zip(t, t[1:]):
            mid = (a + b) / 2
            ctx = [p + int(np.searchsorted(tt, mid)) for s, e, p, tt in spans if s <= mid <= e]
            if not ctx:
                continue
            model = prof.decode.time_of(ctx)
            overlapped = any(s <= mid <= e for s, e in busy_p)
            ratios[overlapped].append((b - a) / model)
    return {("with_prefill" if k else "alone"): _stats(v) for k, v in ratios.items()}


def prefill_replay(reqs: list[dict[str, Any]], prof: LatencyProfile, rtt: float,
                   ) -> dict[str, Any]:
    """Lone, unqueued prefills (prompt >= 256) against the model, with and without decode."""
    starts = {r["index"]: r["send_s"] for r in reqs}
    firsts = {r["index"]: r["send_s"] + r["ttft_s"] for r in reqs}
    decoding = [(firsts[r["index"]], r["send_s"] + r["e2el_s"]) for r in reqs
                if r["output_tokens"] > 1]
    ratios: dict[bool, list[float]] = {True: [], False: []}
    for r in reqs:
        i, n = r["index"], r["prompt_tokens"]
        a, b = starts[i], firsts[i]
        if n < 256 or any(j != i and starts[j] < b and firsts[j] > a for j in starts):
            continue  # short (path-dominated) or queued with another prefill
        model = prof.prefill.time_of([(0, n)])
        covered = sum(max(0.0, min(b, e) - max(a, s)) for s, e in decoding)
        ratios[covered > (b - a) / 2].append((r["ttft_s"] - rtt) / model)
    return {("with_decode" if k else "alone"): _stats(v) for k, v in ratios.items()}


def _stats(v: list[float]) -> dict[str, Any]:
    if not v:
        return {"n": 0}
    return {"n": len(v), "median": float(np.median(v)), "mean": float(np.mean(v)),
            "q25": float(np.quantile(v, 0.25)), "q75": float(np.quantile(v, 0.75))}


def replay_run(path: Path, base: LatencyProfile, cal: dict[str, Any]) -> dict[str, Any]:
    reqs = [r for r in json.loads(path.read_text())["requests"] if r["success"]]
    prof = calibrated_profile(base, cal)
    rtt = cal["rtt_ms"] / 1000
    ends = [r["send_s"] + r["ttft_s"] - rtt / 2 for r in reqs]
    busy_p = [(e - prof.prefill.time_of([(0, r["prompt_tokens"])]), e)
              for r, e in zip(reqs, ends)]
    return {"run": path.stem, "decode_gap_over_model": decode_replay(reqs, prof, busy_p),
            "prefill_over_model": prefill_replay(reqs, prof, rtt)}


def replay_all(work: Path, real: dict[str, Any]) -> dict[str, Any]:
    """Every real run's bench result in `work` replayed (empty without them)."""
    base = LatencyProfile.load(ROOT / real["reprofile"]["path"] if "reprofile" in real
                               else PROFILE)
    cal = calibrate(real["probes"], base)
    return {"probe_f_p": cal["colocation"]["f_p"], "probe_f_d": cal["colocation"]["f_d_host"],
            "runs": [replay_run(work / f"real_{r['label']}.json", base, cal)
                     for r in real["runs"] if (work / f"real_{r['label']}.json").exists()]}


def print_replay(out: dict[str, Any]) -> None:
    for run in out["runs"]:
        d, p = run["decode_gap_over_model"], run["prefill_over_model"]
        print(f"{run['run']:>18}: decode gap/model alone {d['alone'].get('median', 0):.3f} "
              f"(n {d['alone']['n']}), with prefill {d['with_prefill'].get('median', 0):.3f} "
              f"(n {d['with_prefill']['n']}); prefill/model alone "
              f"{p['alone'].get('median', 0):.3f} (n {p['alone']['n']}), with decode "
              f"{p['with_decode'].get('median', 0):.3f} (n {p['with_decode']['n']})")
    print(f"probes: f_p {out['probe_f_p']:.3f}, f_d {out['probe_f_d']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="the work dir of a validate_sim.py run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = replay_all(args.work, json.loads((args.work / "real.json").read_text()))
    print_replay(out)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
