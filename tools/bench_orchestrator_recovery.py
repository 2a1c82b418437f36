"""Part B of tools/bench_orchestrator.py: recovery after kill -9 of a decode or prefill instance
under light open-loop load (one fresh LocalDeployment per trial), and its plot."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_orchestrator_lib import Deployment, Rec, prompt, secs, send, stream_client

# -- part B: recovery -----------------------------------------------------------------------------

class Watcher:
    """Polls the orchestrator's /status and every spare's /stats every 0.1 s (perf_counter
    times): the recovery event and when each spare started loading and became ready."""

    def __init__(self, dep: Deployment, spares: dict[str, str]) -> None:
        self.dep, self.spares = dep, spares
        self.loading: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.event: dict[str, Any] | None = None

    async def run(self, client: httpx.AsyncClient, victim: str, until: float) -> None:
        while time.perf_counter() < until:
            for iid, url in self.spares.items():
                try:
                    state = (await client.get(f"{url}/stats", timeout=2.0)).json()["state"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                now = time.perf_counter()
                if state != "stateless":
                    self.loading.setdefault(iid, now)
                if state == "ready":
                    self.ready.setdefault(iid, now)
            try:
                s = (await client.get(f"{self.dep.orch}/status", timeout=2.0)).json()
                ev = [e for e in s["recoveries"] if e["failed"] == victim]
                self.event = ev[-1] if ev else None
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if self.event and self.event.get("recovery_s") is not None:
                return
            await asyncio.sleep(0.1)


async def open_loop(url: str, scenario: str, args: argparse.Namespace, stop: asyncio.Event,
                    recs: list[Rec]) -> None:
    """Fixed-length requests at `--rate` until `stop`; waits for the last ones to end."""
    async with stream_client() as client:
        tasks: list[asyncio.Task[None]] = []
        t0, i = time.perf_counter(), 0

        async def one(k: int) -> None:
            rec = Rec(time.perf_counter())
            recs.append(rec)
            await send(client, url, scenario, prompt(k, args.rec_prompt, 99), args.rec_output,
                       rec)

        while not stop.is_set():
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))
        await asyncio.gather(*tasks)


async def _trial_io(dep: Deployment, args: argparse.Namespace, victim: dict[str, Any],
                    spares: dict[str, str]) -> tuple[list[Rec], Watcher, float, float]:
    recs: list[Rec] = []
    stop = asyncio.Event()
    load = asyncio.create_task(open_loop(dep.dep.url, dep.scenario, args, stop, recs))
    await asyncio.sleep(args.steady_s)
    pid = dep.pids()[victim["id"]]
    t_kill, unix_kill = time.perf_counter(), time.time()
    os.kill(pid, signal.SIGKILL)
    watcher = Watcher(dep, spares)
    async with httpx.AsyncClient() as client:
        await watcher.run(client, victim["id"], t_kill + args.recovery_timeout_s)
    await asyncio.sleep(args.after_s)
    stop.set()
    await load
    return recs, watcher, t_kill, unix_kill


def recovery_trial(role: str, k: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    dep = Deployment(tmp / f"recovery-{role}-{k}", args, "chat", 1, 1, args.spares,
                     args.rec_kv_blocks)
    try:
        status = dep.start(args.start_timeout_s)
        vid = status["scenarios"]["chat"][role][0]
        urls = {i["id"]: i["url"] for i in status["instances"]}
        spares = {i: urls[i] for i in status["spares"]}
        recs, w, t_kill, unix_kill = asyncio.run(_trial_io(dep, args, {"id": vid}, spares))
        timelines = {t["request_id"]: t for t in httpx.get(
            f"{dep.dep.url}/debug/requests", params={"n": 4096}, timeout=30).json()["requests"]}
    finally:
        dep.stop()
    ev = w.event or {}
    rep = ev.get("replacement")
    det = ev["detected_at"] - unix_kill if ev.get("detected_at") else None
    res = {"role": role, "trial": k, "victim": vid, "replacement": rep, "pinning": dep.cores,
           "reason": ev.get("reason"), "detection_s": det, "recovery_s": ev.get("recovery_s"),
           "kill_to_meta_s": None if det is None or ev.get("recovery_s") is None
           else det + ev["recovery_s"],
           "load_start_s": w.loading[rep] - t_kill if rep in w.loading else None,
           "ready_s": w.ready[rep] - t_kill if rep in w.ready else None,
           **client_view(recs, t_kill, urls[vid], role, timelines)}
    res["model_load_s"] = (res["ready_s"] - res["load_start_s"]
                           if res["ready_s"] is not None and res["load_start_s"] is not None
                           else None)
    print(f"  kill {role} {vid}: {res['reason']!r}; detected {secs(det)}, {rep} loading at "
          f"{secs(res['load_start_s'])}, ready {secs(res['ready_s'])}, "
          f"in meta {secs(res['kill_to_meta_s'])}"
          f"; new request: first decode token {secs(res['first_decode_token_after_kill_s'])}, "
          f"done {secs(res['first_ok_after_kill_s'])}; in-flight on victim "
          f"{res['inflight_on_victim']} (failed {res['inflight_on_victim_failed']}), others "
          f"{res['inflight_others_ok']}/{res['inflight_others']} ok; sent after kill failed "
          f"{res['after_kill_failed']}", flush=True)
    return res


def client_view(recs: list[Rec], t_kill: float, victim_url: str, role: str,
                timelines: dict[str, Any]) -> dict[str, Any]:
    """What the client saw around the kill; `on victim` from the gateway's request timelines
    (prefill: accepted by it and not handed off before the kill; decode: handed off to it)."""
    def on_victim(r: Rec) -> bool | None:
        tl = timelines.get(r.request_id or "")
        if tl is None:
            return None
        if role == "decode":
            return (tl.get("handoff") or {}).get("decode_url", "").rstrip("/") == victim_url
        acc = [o for o in tl["offers"] if o["answer"] == "accepted"]
        handed = tl.get("handoff")
        return bool(acc) and acc[-1]["instance"].rstrip("/") == victim_url and (
            handed is None or r.sent + handed["t"] > t_kill)

    inflight = [r for r in recs if r.sent < t_kill and r.end is not None and r.end > t_kill]
    mine = [r for r in inflight if on_victim(r) is not False]
    others = [r for r in inflight if on_victim(r) is False]
    after = [r for r in recs if r.sent >= t_kill]
    ok_after = [r for r in after if r.ok]
    ends = sorted(r.end for r in recs if r.ok and r.end is not None)
    gaps = [b - a for a, b in zip(ends, ends[1:]) if b > t_kill]
    return {"sent": len(recs), "ok": sum(r.ok for r in recs), "inflight_at_kill": len(inflight),
            "inflight_on_victim": len(mine),
            "inflight_on_victim_failed": sum(not r.ok for r in mine),
            "inflight_others": len(others), "inflight_others_ok": sum(r.ok for r in others),
            "inflight_errors": dict(Counter(r.error for r in inflight if not r.ok)),
            "after_kill_sent": len(after), "after_kill_failed": sum(not r.ok for r in after),
            "after_kill_errors": dict(Counter(r.error for r in after if not r.ok)),
            "first_token_after_kill_s": _earliest([r.first for r in ok_after], t_kill),
            "first_decode_token_after_kill_s": _earliest([r.second for r in ok_after], t_kill),
            "first_ok_after_kill_s": _earliest([r.end for r in ok_after], t_kill),
            "max_gap_s": max(gaps, default=None),
            "requests": [{"sent_s": r.sent - t_kill, "ttft_s": _rel(r.first, r.sent),
                          "end_s": _rel(r.end, t_kill), "ok": r.ok, "error": r.error}
                         for r in recs]}


def _earliest(times: list[float | None], t_kill: float) -> float | None:
    """Seconds from the kill to the earliest of `times` (None when there is none)."""
    return min((t - t_kill for t in times if t is not None), default=None)


def _rel(t: float | None, ref: float) -> float | None:
    return None if t is None else t - ref


def recovery_summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for role in sorted({t["role"] for t in trials}):
        ts = [t for t in trials if t["role"] == role]

        def agg(key: str, ts: list[dict[str, Any]] = ts) -> dict[str, float | None]:
            v = [t[key] for t in ts if t[key] is not None]
            return {"median": float(np.median(v)) if v else None, "max": max(v, default=None),
                    "n": len(v)}

        out[role] = {k: agg(k) for k in ("detection_s", "model_load_s", "recovery_s",
                                          "kill_to_meta_s", "first_token_after_kill_s",
                                          "first_decode_token_after_kill_s",
                                          "first_ok_after_kill_s", "max_gap_s")}
        out[role].update(
            trials=len(ts), reasons=sorted({str(t["reason"]) for t in ts}),
            inflight_on_victim=sum(t["inflight_on_victim"] for t in ts),
            inflight_on_victim_failed=sum(t["inflight_on_victim_failed"] for t in ts),
            inflight_others=sum(t["inflight_others"] for t in ts),
            inflight_others_ok=sum(t["inflight_others_ok"] for t in ts),
            after_kill_failed=sum(t["after_kill_failed"] for t in ts),
            errors=dict(sum((Counter(t["inflight_errors"]) + Counter(t["after_kill_errors"])
                             for t in ts), Counter())))
    return out


def plot_recovery(trials: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = sorted({t["role"] for t in trials})
    fig, axes = plt.subplots(1, len(roles), figsize=(6 * len(roles), 3.8), squeeze=False)
    for ax, role in zip(axes[0], roles):
        t = next(t for t in trials if t["role"] == role)
        for ok, color, label in ((True, "tab:green", "completed"), (False, "tab:red", "failed")):
            rs = [r for r in t["requests"] if r["ok"] is ok and r["end_s"] is not None]
            ax.scatter([r["sent_s"] for r in rs], [r["end_s"] - r["sent_s"] for r in rs], s=9,
                       color=color, label=label)
        for key, style, label in (("detection_s", "k:", "detected"),
                                  ("load_start_s", "b:", "spare assigned"),
                                  ("ready_s", "b--", "replacement ready"),
                                  ("kill_to_meta_s", "g--", "in meta (recovered)")):
            if t[key] is not None:
                ax.axvline(t[key], color=style[0], linestyle=style[1:], label=label)
        ax.axvline(0, color="r", label=f"kill -9 {role}")
        ax.set_xlabel("request sent (s after the kill)")
        ax.set_ylabel("request latency, send to end (s)")
        ax.set_title(f"{role} killed (trial 0): {t['victim']} -> {t['replacement']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
