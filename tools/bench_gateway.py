"""TTFT-SLO success rate and TTFT percentiles vs offered load for the gateway's policies
(forwarding = P/D-Serve, fifo = baseline (a), round_robin = baseline (b)), replaying a slice of
the Mooncake conversation trace scaled to the demo model, all policies in one run.

One local deployment (torch backend by default, 1 thread per instance): 1 decode instance,
2 prefill instances with `--b-p` slots, one gateway with three scenarios over the same two
prefill instances that differ only in policy (one TTFT SLO, `--slo-s`, for all).

Workload: the first `--requests` rows of the trace; each ~3 s timestamp bucket is spread evenly
over its gap to the next timestamp; lengths scaled by `--block-tokens / 512` (512-token
blocks become `--block-tokens`), output capped at `--max-tokens`, input cut to fit the
2048-token context; prompts synthesised per hash id (prefix sharing kept). Each (policy, load)
point gets its own salt, so there is no prefix-cache carry-over between points. A point replays
the slice open-loop, its arrival times compressed so the mean rate is the offered load.

Load A: `--load-a`, or calibrated: the highest rate of `--ladder` (ascending, stopping at the
first miss) at which fifo still has >= `--calib-success` success. Then every multiple of A in
`--multipliers` runs all policies, the policy order rotating per level so drift hits all.

Success of one request: HTTP 200, client-side TTFT (first SSE chunk with non-empty choices,
from just before the POST) <= SLO, and the stream completed. 503 `ttft_deadline_exceeded`
(never admitted, or its budget ran out in a prefill queue) and a late first token are failures.
TTFT percentiles (numpy linear) are over the requests that got a first token.

    python tools/bench_gateway.py [--requests 60] [--slo-s 2] [--load-a R] \
        [--out bench.json] [--plot bench.png]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pd_serve.bench.traces import (  # noqa: E402
    TraceRequest,
    load_mooncake,
    prompt_tokens,
    scale,
    spread_buckets,
)
from tests.e2e.pd_cluster import Proc, write_pd_config  # noqa: E402

MODEL, VOCAB, CONTEXT = "shakespeare-llama", 1024, 2048
POLICIES = ("forwarding", "fifo", "round_robin")
TRACE = ROOT.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"


class Deployment:
    """decode, prefill-0, prefill-1 and the gateway as `python -m pd_serve` processes."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        base = self._config(tmp / "base.yaml", args, {})
        self.procs: list[Proc] = []
        try:
            self.decode = self._start("decode", ["instance", "--role", "decode", "--config",
                                                 str(base)], tmp)
            self.prefill = [self._start(f"prefill-{i}", [
                "instance", "--role", "prefill", "--decode-peers", self.decode.url,
                "--config", str(base)], tmp) for i in range(2)]
            names = ",".join(f"prefill-{i}={p.url}" for i, p in enumerate(self.prefill))
            scenarios = [{"name": p, "policy": p, "ttft_slo": [{"deadline_s": args.slo_s}]}
                         for p in args.policies]
            gw = self._config(tmp / "gateway.yaml", args, {
                "default_scenario": args.policies[0], "scenarios": scenarios,
                "max_stats_samples": 100000})
            self.gw = self._start("gateway", ["gateway", "--prefill", names, "--config",
                                              str(gw)], tmp)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _config(path: Path, args: argparse.Namespace, gateway: dict[str, Any]) -> Path:
        write_pd_config(path, args.backend, args.threads, b_p=args.b_p, prefill_queue_max=256)
        data = yaml.safe_load(path.read_text())
        data["cache"]["num_blocks"] = 1024
        data["scheduler"]["max_num_seqs"] = 16
        if gateway:
            data["gateway"] = gateway
        path.write_text(yaml.safe_dump(data))
        return path

    def _start(self, name: str, argv: list[str], tmp: Path) -> Proc:
        p = Proc(name, argv, tmp / f"{name}.log")
        self.procs.append(p)
        return p.wait_healthy()

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until every instance is idle with nothing queued and the gateway has no stream."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                inst = [p.stats() for p in (*self.prefill, self.decode)]
                gw = self.gw.stats()
                if (all(s.get("idle") and not s.get("queued") for s in inst)
                        and not any(gw["open_streams"].values())):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        print("warning: deployment not idle after the drain timeout", file=sys.stderr)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


async def _one(client: httpx.AsyncClient, url: str, policy: str, prompt: list[int],
               max_tokens: int, slo_s: float) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    rec: dict[str, Any] = {"status": None, "code": None, "ttft_s": None, "completed": False}
    st = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 headers={"X-PD-Scenario": policy}) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                try:
                    rec["code"] = json.loads(await r.aread())["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    pass
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        rec["code"] = msg["error"].get("code")
                        break
                    for ch in msg.get("choices") or []:
                        if rec["ttft_s"] is None:
                            rec["ttft_s"] = time.perf_counter() - st
                        if ch.get("finish_reason"):
                            rec["completed"] = True
    except httpx.HTTPError as exc:
        rec["code"] = type(exc).__name__
    rec["ok"] = bool(rec["completed"] and rec["ttft_s"] is not None and rec["ttft_s"] <= slo_s)
    return rec


async def _replay(url: str, policy: str, reqs: list[TraceRequest], offsets: list[float],
                  args: argparse.Namespace, salt: int) -> list[dict[str, Any]]:
    prompts = [prompt_tokens(r, args.block_tokens, VOCAB, salt) for r in reqs]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.slo_s + 120.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()

        async def at(i: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
            return await _one(client, url, policy, prompts[i], reqs[i].output_len, args.slo_s)

        return list(await asyncio.gather(*(at(i) for i in range(len(reqs)))))


def offsets_for(reqs: list[TraceRequest], rate: float) -> list[float]:
    """Send times (s from the point's start) with the trace's shape and mean rate `rate`."""
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    native = (len(reqs) - 1) / span if span > 0 else rate
    return [(r.arrival_s - reqs[0].arrival_s) * native / rate for r in reqs]


def summarise(recs: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = np.array([r["ttft_s"] for r in recs if r["ttft_s"] is not None])
    pct = {f"ttft_p{p}_s": (float(np.percentile(ttfts, p)) if len(ttfts) else None)
           for p in (50, 90, 99)}
    return {"requests": len(recs), "success_rate": sum(r["ok"] for r in recs) / len(recs),
            "completed": sum(r["completed"] for r in recs),
            "terminated": sum(r["code"] == "ttft_deadline_exceeded" for r in recs),
            "late_first_token": sum(r["ttft_s"] is not None and not r["ok"] and r["completed"]
                                    for r in recs),
            "other_errors": sum(r["code"] not in (None, "ttft_deadline_exceeded")
                                for r in recs),
            "with_first_token": int(len(ttfts)), **pct}


class Runner:
    def __init__(self, dep: Deployment, reqs: list[TraceRequest], args: argparse.Namespace):
        self.dep, self.reqs, self.args = dep, reqs, args
        self.salt = 0

    def point(self, policy: str, rate: float) -> dict[str, Any]:
        self.dep.wait_idle()
        time.sleep(self.args.cooldown_s)
        self.salt += 1
        start = time.perf_counter()
        recs = asyncio.run(_replay(self.dep.gw.url, policy, self.reqs,
                                   offsets_for(self.reqs, rate), self.args, self.salt))
        res = {"policy": policy, "offered_rps": rate, "wall_s": time.perf_counter() - start,
               **summarise(recs)}
        print(f"  {policy:<12} {rate:6.2f} req/s  success {res['success_rate']:6.1%}  "
              f"p50 {_ms(res['ttft_p50_s'])}  p99 {_ms(res['ttft_p99_s'])}  "
              f"term {res['terminated']}", flush=True)
        return res

    def calibrate(self) -> tuple[float, list[dict[str, Any]]]:
        """Highest ladder rate where fifo (baseline a) meets the success threshold."""
        best, seen = None, []
        for rate in self.args.ladder:
            res = self.point("fifo", rate)
            seen.append(res)
            if res["success_rate"] < self.args.calib_success:
                break
            best = rate
        if best is None:
            print("warning: fifo misses the SLO even at the lowest ladder rate", file=sys.stderr)
            best = self.args.ladder[0]
        elif best == self.args.ladder[-1]:
            print("warning: fifo met the SLO at the top of the ladder; A is a lower bound",
                  file=sys.stderr)
        return best, seen


def _ms(x: float | None) -> str:
    return "     -" if x is None else f"{x * 1000:6.0f}ms"


def table(points: list[dict[str, Any]], load_a: float) -> str:
    lines = [f"{'load':>6} {'req/s':>6} {'policy':<12} {'success':>8} {'p50':>8} {'p90':>8} "
             f"{'p99':>8} {'done':>5} {'term':>5} {'late':>5}"]
    for p in sorted(points, key=lambda p: (p["offered_rps"], p["policy"])):
        lines.append(f"{p['offered_rps'] / load_a:5.2f}A {p['offered_rps']:6.2f} "
                     f"{p['policy']:<12} {p['success_rate']:8.1%} {_ms(p['ttft_p50_s']):>8} "
                     f"{_ms(p['ttft_p90_s']):>8} {_ms(p['ttft_p99_s']):>8} "
                     f"{p['completed']:5d} {p['terminated']:5d} {p['late_first_token']:5d}")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], load_a: float, args: argparse.Namespace) -> None:
    import matplotlib  # only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in args.policies:
        ps = sorted((p for p in points if p["policy"] == policy), key=lambda p: p["offered_rps"])
        ax.plot([p["offered_rps"] / load_a for p in ps], [100 * p["success_rate"] for p in ps],
                marker="o", label=policy)
    ax.set_xlabel(f"offered load (multiples of A = {load_a:g} req/s)")
    ax.set_ylabel(f"TTFT-SLO success (%), SLO {args.slo_s:g} s")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Mooncake conversation, first {args.requests} requests, demo model")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--requests", type=int, default=60, help="first N trace rows per point")
    ap.add_argument("--block-tokens", type=int, default=32, help="tokens per 512-token block")
    ap.add_argument("--max-tokens", type=int, default=16, help="output cap per request")
    ap.add_argument("--bucket-s", type=float, default=3.0)
    ap.add_argument("--slo-s", type=float, default=2.0, help="TTFT SLO (gateway deadline)")
    ap.add_argument("--b-p", type=int, default=2)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    ap.add_argument("--load-a", type=float, default=None, help="fix A (req/s): no calibration")
    ap.add_argument("--ladder", type=_floats, default=_floats("2,3,4,6,8,12,16,24"))
    ap.add_argument("--calib-success", type=float, default=0.99)
    ap.add_argument("--multipliers", type=_floats, default=_floats("1,1.25,1.5,2,3,4,5"))
    ap.add_argument("--cooldown-s", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    return ap.parse_args(argv)


def _portable(path: Path) -> str:
    """`path` as recorded in results: relative to the checkout's parent (where shared/ lives)
    when inside it, else its name, so no machine-specific prefix is written."""
    base = Path(__file__).resolve().parents[2]
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return path.name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    raw = load_mooncake(args.trace, limit=args.requests)
    reqs, report = scale(spread_buckets(raw, args.bucket_s), args.block_tokens, CONTEXT,
                         args.max_tokens)
    ins = [r.input_len for r in reqs]
    print(f"{len(reqs)} requests, lengths x{report.factor:g} ({report.block_tokens}-token "
          f"blocks), input mean {np.mean(ins):.0f} max {max(ins)}, "
          f"{report.capped_input} input(s) cut to the context", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        dep = Deployment(Path(tmp), args)
        try:
            run = Runner(dep, reqs, args)
            for policy in args.policies:  # warm-up, not recorded
                asyncio.run(_replay(dep.gw.url, policy, reqs[:2], [0.0, 0.0], args, -1))
            calib: list[dict[str, Any]] = []
            if args.load_a is None:
                print("calibrating A with fifo:", flush=True)
                load_a, calib = run.calibrate()
            else:
                load_a = args.load_a
            print(f"A = {load_a:g} req/s", flush=True)
            points = []
            for k, m in enumerate(args.multipliers):
                order = args.policies[k % len(args.policies):] + args.policies[
                    :k % len(args.policies)]
                for policy in order:
                    points.append(run.point(policy, m * load_a))
            gw_stats = dep.gw.stats()
        finally:
            dep.stop()
    print(table(points, load_a))
    result = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": time.time() - t_start,
        "machine": {"platform": platform.platform(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {**{k: (_portable(v) if isinstance(v, Path) else v)
                        for k, v in vars(args).items()},
                     "scale_factor": report.factor, "inputs_cut": report.capped_input,
                     "outputs_capped": report.capped_output,
                     "arrivals": f"each {args.bucket_s:g} s bucket spread evenly; "
                                 "compressed to the offered mean rate"},
        "load_a_rps": load_a,
        "load_a_from": "--load-a" if args.load_a is not None else
        f"highest --ladder rate with fifo success >= {args.calib_success}",
        "calibration": calib, "points": points, "gateway_stats": gw_stats}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(points, load_a, args)
    print(f"done in {result['duration_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
