"""Summary, JSON, table and plot of the P/D-Device evaluation (tools/bench_device.py)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench_device_lib import WorkItem, percentile

from pd_device.planner import Plan
from pd_device.profiles import Profiles

MODES = ("cloud_only", "device_only", "pd_device")
CLAIM_TTFT_REDUCTION = 0.6  # paper: TTFT at least 60% lower than device-only


def _agreement(a: list[int], b: list[int]) -> tuple[float, bool]:
    n = max(len(a), len(b), 1)
    return sum(x == y for x, y in zip(a, b)) / n, a == b


def mode_summary(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """TTFT and displayed-gap statistics of one mode (gaps pooled over its requests)."""
    mine = [r for r in rows if r["mode"] == mode]
    ttft = [r["ttft_s"] for r in mine if r["ttft_s"] is not None]
    gaps = [g for r in mine for g in r["gaps_s"]]
    out = {"requests": len(mine), "ttft_p50_s": percentile(ttft, 50),
           "ttft_p90_s": percentile(ttft, 90), "tpot_max_s": max(gaps, default=None),
           "tpot_p99_s": percentile(gaps, 99), "tpot_p50_s": percentile(gaps, 50),
           "report_modes": dict(Counter(r["report_mode"] for r in mine))}
    if mode == "pd_device":
        out["cloud_tokens_used_mean"] = sum(r["cloud_tokens_used"] for r in mine) / max(1,
                                                                                        len(mine))
        out["handover_index"] = [r["handover_index"] for r in mine]
        pairs = [(r.get("predicted_catchup_s"), r.get("catchup_s")) for r in mine
                 if r["report_mode"] == "pd_device"]
        out["catchup_predicted_s"] = [p for p, _ in pairs]
        out["catchup_actual_s"] = [a for _, a in pairs]
        out["handover_gap_s"] = [r["gaps_s"][r["handover_index"] - 1] for r in mine
                                 if r["report_mode"] == "pd_device" and r["handover_index"]]
    return out


def agreements(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Token agreement of each mode's output with cloud-only's, per request position."""
    out: dict[str, Any] = {}
    for mode in ("device_only", "pd_device"):
        vals = []
        for r in (x for x in rows if x["mode"] == mode):
            ref = next(x for x in rows if x["request"] == r["request"]
                       and x["mode"] == "cloud_only")
            vals.append(_agreement(r["token_ids"], ref["token_ids"]))
        out[mode] = {"positionwise_mean": sum(v for v, _ in vals) / max(1, len(vals)),
                     "identical_requests": sum(e for _, e in vals), "requests": len(vals)}
    return out


def summarise(rows: list[dict[str, Any]], occupancy: dict[str, Any],
              quality: dict[str, Any]) -> dict[str, Any]:
    modes = {m: mode_summary(rows, m) for m in MODES}
    dev, pd = modes["device_only"], modes["pd_device"]
    claim = {}
    for q in ("p50", "p90"):
        d, p = dev[f"ttft_{q}_s"], pd[f"ttft_{q}_s"]
        red = 1.0 - p / d if d and p is not None else None
        claim[f"ttft_reduction_{q}"] = red
        claim[f"ttft_60pct_lower_{q}"] = red is not None and red >= CLAIM_TTFT_REDUCTION
    co, po = occupancy["cloud_only"], occupancy["pd_device"]
    occ = {"busy_s_per_request": {"cloud_only": co["busy_s_per_request"],
                                  "pd_device": po["busy_s_per_request"]},
           "busy_gain": (co["busy_s_per_request"] / po["busy_s_per_request"]
                         if po["busy_s_per_request"] else None),
           "requests_per_s": {"cloud_only": co["requests_per_s"],
                              "pd_device": po["requests_per_s"]},
           "throughput_gain": (po["requests_per_s"] / co["requests_per_s"]
                               if po["requests_per_s"] and co["requests_per_s"] else None)}
    return {"modes": modes, "claim": claim, "cloud": occ, "agreement": agreements(rows),
            "quality_vs_rho": quality["summary"]}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:8.1f}"


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'mode':<12}{'TTFT p50':>10}{'TTFT p90':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
          f"{'TPOT max':>10}  (ms)")
    for m, s in summary["modes"].items():
        print(f"{m:<12}{_ms(s['ttft_p50_s']):>10}{_ms(s['ttft_p90_s']):>10}"
              f"{_ms(s['tpot_p50_s']):>10}{_ms(s['tpot_p99_s']):>10}{_ms(s['tpot_max_s']):>10}")
    pd = summary["modes"]["pd_device"]
    print(f"P/D-Device slot ran as: {pd['report_modes']}")
    print("catch-up predicted / actual / hand-over gap (ms): " + ", ".join(
        f"{_ms(p).strip()}/{_ms(a).strip()}" for p, a in
        zip(pd["catchup_predicted_s"], pd["catchup_actual_s"])) +
        f"; hand-over gaps {[round(g * 1e3) for g in pd['handover_gap_s']]}")
    c = summary["claim"]
    for q in ("p50", "p90"):
        red = c[f"ttft_reduction_{q}"]
        print(f"TTFT {q} vs device-only: "
              f"{'-' if red is None else f'{red * 100:.0f}% lower'} "
              f"(claim >= 60%: {'met' if c[f'ttft_60pct_lower_{q}'] else 'not met'})")
    o = summary["cloud"]
    print(f"cloud busy s/request: {o['busy_s_per_request']} gain {o['busy_gain']}; "
          f"requests/s: {o['requests_per_s']} gain {o['throughput_gain']}")
    print(f"agreement with cloud-only: {summary['agreement']}")
    print(f"{'rho':>5}{'agree':>8}{'free':>8}{'prefix':>8}{'ppl x':>8}")
    for rho, q in summary["quality_vs_rho"].items():
        print(f"{rho:>5}{q['agreement']:8.3f}{q['free_agreement']:8.3f}"
              f"{q['free_prefix']:8.3f}{q.get('ppl_ratio', 1.0):8.3f}")


def plot(result: dict[str, Any], path: Path) -> str:
    """Four panels: TTFT and gap CDFs per mode, quality vs rho, cloud busy time; returns the
    path or why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    rows, summ = result["requests"], result["summary"]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    for m in MODES:
        ttft = sorted(r["ttft_s"] for r in rows if r["mode"] == m and r["ttft_s"] is not None)
        gaps = sorted(g for r in rows if r["mode"] == m for g in r["gaps_s"])
        for a, v in ((ax[0][0], ttft), (ax[0][1], gaps)):
            if v:
                a.step([x * 1e3 for x in v], [(i + 1) / len(v) for i in range(len(v))], label=m)
    ax[0][0].set(xlabel="TTFT (ms)", ylabel="CDF", title="TTFT")
    ax[0][1].set(xlabel="gap between shown tokens (ms)", ylabel="CDF", title="TPOT seen",
                 xscale="log")
    q = {k: v for k, v in summ["quality_vs_rho"].items()}
    rhos = sorted(q, key=float)
    for key in ("agreement", "free_prefix"):
        ax[1][0].plot([float(r) for r in rhos], [q[r][key] for r in rhos], "o-", label=key)
    ax[1][0].set(xlabel="rho (share of prompt kept)", ylabel="vs cloud-only output",
                 title="quality vs rho", ylim=(0, 1.05))
    busy = summ["cloud"]["busy_s_per_request"]
    ax[1][1].bar(list(busy), [v * 1e3 for v in busy.values()])
    ax[1][1].set(ylabel="cloud busy ms / request", title="cloud occupancy")
    for a in (ax[0][0], ax[0][1], ax[1][0]):
        a.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def finish(args: argparse.Namespace, items: list[WorkItem], notes: list[str], prof: Profiles,
           plans: list[Plan], free_modes: list[str], rows: list[dict[str, Any]],
           occupancy: dict[str, Any],
           quality: dict[str, Any], elapsed_s: float,
           profile_raw: dict[str, Any] | None = None,
           extra: dict[str, Any] | None = None) -> None:
    """Writes the JSON to --out (with `extra`'s keys), prints the table and draws the plot."""
    summary = summarise(rows, occupancy, quality)
    result: dict[str, Any] = {
        "provenance": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                                   "python": platform.python_version()},
                       "command": "python tools/bench_device.py " + " ".join(sys.argv[1:]),
                       "elapsed_s": elapsed_s},
        "args": {k: _portable(v) for k, v in vars(args).items()},
        "workload": {"notes": notes, "items": [
            {"trace": it.trace, "source": it.source, "input_len": it.input_len,
             "output_len": it.output_len} for it in items]},
        "profiles": prof.to_dict(), "profile_raw": profile_raw,
        "plans": [{"settings": vars(p.settings), "reason": p.reason, "feasible": p.feasible,
                   "unrestricted_planner_mode": m,
                   "predicted_ttft_s": p.ttft_s, "predicted_max_gap_s": p.max_gap_s,
                   "predicted_catchup_s": p.handover_s,
                   "occupancy_s": p.occupancy_s if p.occupancy_s != float("inf") else None}
                  for p, m in zip(plans, free_modes)],
        "summary": summary, "occupancy": occupancy, "quality": quality, "requests": rows,
        "definitions": {
            "ttft": "generate() call -> first displayed token, on the device",
            "tpot": "gaps between successive displayed tokens, pooled over requests",
            "cloud_busy": "send -> `end` event of an assist request doing the mode's cloud "
                          "work, one at a time; cloud-only = N = G - 1, rho = 1",
            "requests_per_s": "workload requests per second of cloud time under closed-loop "
                              "load (device-only-planned requests need no cloud work)",
            "quality": quality["definition"]}, **(extra or {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.plot = args.plot or args.out.with_suffix(".png")
    result["plot"] = plot(result, args.plot)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_table(summary)
    print(f"wrote {args.out} ({result['plot']})")


def _portable(value: object) -> object:
    """Paths as the repository-relative text the command line would use (no machine paths in
    committed results); lists element by element."""
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return value.replace(str(Path(__file__).resolve().parents[1]) + "/", "")
    return value
