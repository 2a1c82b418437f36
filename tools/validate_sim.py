"""Simulator validation: the same trace and deployment run for real here and in `pd-serve sim`;
TTFT p50/p90, TPOT p50 and throughput compared per offered rate (each must be within
`--tolerance`, 15 % by default).

Real side: a static deployment of the demo model (torch backend, one thread per instance):
1 decode instance, 1 prefill instance peered with it, 1 gateway, each a `python -m pd_serve`
process (config in a temp dir; prefix caching off, because `pd-serve bench run` synthesises the
same prompt for the same request index in every run and the workload has no shared prefixes).
Workload: ShareGPT lengths (first N rows) times `--scale-factor` (the 8k-filtered lengths
to the demo model's 2,048 context), Poisson arrivals, temperature 0, ignore_eos (exact output
lengths), sent by `pd-serve bench run --save-requests`.

Steps (one process, about 10 minutes on the 2-core VM; `--quick`: about 3):
1. before every measurement (probes, capacity, each rate) wait while a `bench_orchestrator`
   process (or anything named in `--wait-for`, e.g. `pytest`) runs: poll every 30 s, at most
   15 min, then go ahead; the load average is recorded before and after each;
2. start the deployment; calibration probes on it, each a small workload sent with the bench
   client (pd_serve.bench.client), never the validation requests:
   * bare RTT: GET /health of the prefill instance;
   * first-token path: lone prompts of 16 and 64 tokens with one output token; TTFT minus the
     simulated TTFT at RTT 0 (the profile's prefill time) is the round trip as the simulator
     defines it (TTFT of a lone request = prefill + RTT): HTTP, JSON and SSE through gateway
     and prefill instance, in Python. Used as `--rtt-ms`;
   * per-step decode overhead: B = 1, 2, 4, 8, 16 requests of 64 prompt tokens and 128
     outputs sent at once; the mean inter-token gap while all B decode (TPOT is a mean of gaps)
     minus the profile's step time is what the runner profile does not see (scheduler,
     sampler, one SSE event per token sharing the decode process's GIL, OS jitter); fitted as
     a + b*B (relative error, non-negative) and added to the decode model;
   * profile check: lone prefills of 256, 512 and 1,024 tokens and a batch of 16 at context
     ~1,100 against the profile; off by more than the tolerance: `pd-serve sim profile` is
     rerun (threads 1) into docs/results/sim_profile_cpu_torch_validate.json;
   * co-location at the workload's operating point: a decode batch of 2 x (256 prompt, 600
     output) alone and while prefill-only requests of 16 and 512 tokens (in turn) run back to
     back. The decode step slowdown is f_d; under decode load TTFT(n) = rtt_loaded + f_p x
     prefill(n): the short prompt gives the additive delay (event loops and SSE relays busy
     with the decode stream), the long one the compute slowdown f_p. Both instances, the
     gateway and the client share the 2 cores; a profile measured in isolation sees none of it;
3. capacity: a closed loop (`--max-concurrency 20`) of the workload; the rates are `--loads` of it;
4. per rate: `pd-serve bench run` (load average and CPU per process recorded); optionally the
   highest rate once more (`--repeat`), which measures the real run-to-run spread;
5. per rate: `pd-serve sim run` with the same workload options and seed (same requests at the same
   times), `--groups 1:1`, the same instance shape and `--vllm-metrics`, twice: *raw* (the
   profile as is, `--rtt-ms` = bare RTT) and *calibrated* (decode overhead added; co-location as
   mean-field terms, because the simulator gives every instance its own cores: prefill steps
   x (1 + (f_p - 1) u_d), decode steps x (1 + (f_d - 1) u_p), RTT = rtt + (rtt_loaded - rtt)
   u_d, with u_p, u_d the fractions of time prefill and decode are busy in the simulated run,
   iterated to a fixed point). Nothing is fitted to the validation runs.

    python tools/validate_sim.py [--quick] [--out docs/results/sim_validation.json]
    python tools/validate_sim.py --reuse WORK/real.json   # analysis only, on saved real runs
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pd_serve.bench.client import (  # noqa: E402
    BenchRequest,
    ClientConfig,
    LoadResult,
    RequestRecord,
    run_load,
)
from pd_serve.bench.traces import TraceRequest  # noqa: E402
from pd_serve.sim.config import GatewaySpec, InstanceSpec, ScenarioSpec, SimConfig  # noqa: E402
from pd_serve.sim.latency import LatencyProfile  # noqa: E402
from pd_serve.sim.run import simulate  # noqa: E402

PY = sys.executable
MODEL, VOCAB, CONTEXT = "shakespeare-llama", 1024, 2048
TRACE = ROOT.parent / "shared" / "traces" / "sharegpt_lengths" / \
    "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
PROFILE = ROOT / "docs" / "results" / "sim_profile_cpu_torch.json"
REPROFILE = ROOT / "docs" / "results" / "sim_profile_cpu_torch_validate.json"
# The instance shape, the same for the deployment and the simulator.
SHAPE: dict[str, Any] = {
    "b_p": 4, "max_num_seqs": 16, "max_num_batched_tokens": 2048, "num_blocks": 2048,
    "block_size": 16, "threads": 1, "backend": "torch", "enable_prefix_caching": False}
COLOC_DECODE = (256, 600, 2)  # prompt, output, batch of the co-location probe's decode batch
COLOC_PREFILL = (16, 512)  # prompt tokens of its prefill loop (short: path; long: compute)
METRICS = (("ttft_p50_ms", "median_ttft_ms"), ("ttft_p90_ms", "p90_ttft_ms"),
           ("tpot_p50_ms", "median_tpot_ms"), ("req_per_s", "request_throughput"),
           ("out_tok_per_s", "output_throughput"))


# ----- the deployment ------------------------------------------------------------------------

class Proc:
    """One `python -m pd_serve` process with its log; stopped by SIGTERM (SIGINT may be ignored
    when this tool runs in the background), killed after 20 s."""

    def __init__(self, name: str, args: list[str], log: Path, port: int) -> None:
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        cmd = [PY, "-m", "pd_serve", *args, "--port", str(port), "--log-level", "warning"]
        with log.open("wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_healthy(self, timeout: float = 120.0) -> Proc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s")

    def cpu_s(self) -> float:
        """utime + stime of the process so far (its threads included)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """decode, prefill (peered with it) and gateway; the config is written to `tmp`."""

    def __init__(self, tmp: Path) -> None:
        cfg = {"model": {"path": str(ROOT / "models" / "shakespeare-llama"),
                         "backend": SHAPE["backend"], "threads": SHAPE["threads"]},
               "cache": {"block_size": SHAPE["block_size"], "num_blocks": SHAPE["num_blocks"],
                         "enable_prefix_caching": SHAPE["enable_prefix_caching"]},
               "scheduler": {"max_num_seqs": SHAPE["max_num_seqs"],
                             "max_num_batched_tokens": SHAPE["max_num_batched_tokens"]},
               "pd": {"b_p": SHAPE["b_p"]}}
        self.config_path = tmp / "pd.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.config = cfg
        common = ["--config", str(self.config_path)]
        self.procs: list[Proc] = []
        try:
            self.decode = self._start(Proc("decode", ["instance", "--role", "decode", *common],
                                           tmp / "decode.log", free_port()))
            self.prefill = self._start(Proc("prefill", [
                "instance", "--role", "prefill", "--decode-peers", self.decode.url, *common],
                tmp / "prefill.log", free_port()))
            self.gateway = self._start(Proc("gateway", [
                "gateway", "--prefill", self.prefill.url, *common], tmp / "gateway.log",
                free_port()))
        except BaseException:
            self.stop()
            raise
        self.url = self.gateway.url

    def _start(self, p: Proc) -> Proc:
        self.procs.append(p)
        return p.wait_healthy()

    def cpu(self) -> dict[str, float]:
        return {p.name: p.cpu_s() for p in self.procs}

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


# ----- probes (calibration workloads, sent with the bench client) -----------------------------

_rng = np.random.default_rng(12345)


def _prompt(n: int) -> list[int]:
    return [int(x) for x in _rng.integers(3, VOCAB, n)]


def _reqs(shapes: list[tuple[int, int]]) -> list[BenchRequest]:
    return [BenchRequest(i, _prompt(n), n, o) for i, (n, o) in enumerate(shapes)]


def _send_load(url: str, shapes: list[tuple[int, int]]) -> LoadResult:
    """`shapes` (prompt, output tokens) sent at once (all must succeed)."""
    cfg = ClientConfig(url, MODEL, temperature=0.0, request_id_prefix="probe-")
    res = asyncio.run(run_load(cfg, _reqs(shapes)))
    _check(res)
    return res


def _check(res: LoadResult) -> None:
    bad = [r.error for r in res.records if not r.success]
    if bad:
        raise RuntimeError(f"probe failed: {bad[0]}")


def _send(url: str, shapes: list[tuple[int, int]]) -> list[RequestRecord]:
    return _send_load(url, shapes).records


def _ttft(r: RequestRecord) -> float:
    assert r.ttft_s is not None
    return r.ttft_s


def steady_window(res: LoadResult) -> tuple[float, float]:
    """(start, end), unix seconds, of the part of a batch's run in which every request of it
    is decoding: from the last one's first decode chunk (its 2nd) to the first one's last."""
    t0 = res.started_unix
    return (t0 + max(r.chunk_s[1] for r in res.records),
            t0 + min(r.chunk_s[-1] for r in res.records))


def steady_steps(res: LoadResult) -> dict[str, Any]:
    """The decode batch's inter-chunk gaps (one chunk per token) inside its steady window:
    mean step time (TPOT is a mean of gaps, so the occasional slow step counts), median, and
    the mean context at mid-window."""
    a, b = steady_window(res)
    t0 = res.started_unix
    gaps = [y - x for r in res.records for x, y in zip(r.chunk_s, r.chunk_s[1:])
            if t0 + x >= a and t0 + y <= b]
    mid = (a + b) / 2
    ctx = [r.prompt_tokens + sum(1 for c in r.chunk_s if t0 + c <= mid) for r in res.records]
    one_per_token = all(len(r.chunk_s) == r.output_tokens for r in res.records)
    if not gaps:
        raise RuntimeError("probe: no steady decode window (raise the output length)")
    return {"batch": len(res.records), "step_s": float(np.mean(gaps)),
            "median_step_s": float(np.median(gaps)), "gaps": len(gaps),
            "context": float(np.mean(ctx)), "max_context": int(max(ctx)),
            "one_chunk_per_token": one_per_token}


async def _decode_under_prefill(url: str, batch: list[tuple[int, int]], prompts: list[int],
                                ) -> tuple[LoadResult, list[LoadResult]]:
    """The decode batch while prefill-only requests of `prompts` tokens (in turn) run back to
    back."""
    cfg = ClientConfig(url, MODEL, temperature=0.0, request_id_prefix="probe-")
    prefills: list[LoadResult] = []
    task = asyncio.create_task(run_load(cfg, _reqs(batch)))
    while not task.done():
        n = prompts[len(prefills) % len(prompts)]
        prefills.append(await run_load(cfg, _reqs([(n, 1)])))
    return await task, prefills


def measure_rtt(url: str, n: int = 60) -> float:
    with httpx.Client() as c:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            c.get(f"{url}/health")
            times.append(time.perf_counter() - t0)
    return float(np.median(times[10:]))


def run_probes(dep: Deployment, quick: bool) -> dict[str, Any]:
    """Raw probe measurements (profile-independent; the fits are made in `calibrate`)."""
    url, reps = dep.url, (2 if quick else 6)
    _send(url, [(64, 16)] * 4)  # warm-up: first requests pay connection and allocator costs
    out: dict[str, Any] = {"rtt_bare_s": measure_rtt(dep.prefill.url)}
    path: dict[str, list[float]] = {"16": [], "64": []}
    for _ in range(reps):
        for n in (16, 64):
            path[str(n)].append(_ttft(_send(url, [(n, 1)])[0]))
    out["first_token_path"] = path
    out["prefill_lone_s"] = {str(n): [_ttft(_send(url, [(n, 1)])[0])
                                      for _ in range(2 if quick else 3)]
                             for n in (256, 512, 1024)}
    out["decode_ctx64"] = [steady_steps(_send_load(url, [(64, 128)] * b))
                           for b in (1, 2, 4, 8, 16)]
    out["decode_b16_ctx1024"] = steady_steps(_send_load(url, [(1024, 200)] * 16))
    # co-location at the validation workload's operating point: a small decode batch (short,
    # Python-heavy steps, many SSE events) and mid-length prompts (where TTFT p50 lies)
    alone: list[dict[str, Any]] = []
    loaded: list[dict[str, Any]] = []
    pre: dict[str, list[float]] = {str(n): [] for n in COLOC_PREFILL}
    batch = [(COLOC_DECODE[0], COLOC_DECODE[1])] * COLOC_DECODE[2]
    for _ in range(1 if quick else 2):
        alone.append(steady_steps(_send_load(url, batch)))
        d, ps = asyncio.run(_decode_under_prefill(url, batch, list(COLOC_PREFILL)))
        _check(d)
        loaded.append(steady_steps(d))
        a, b = steady_window(d)
        for p in ps:
            _check(p)
            r = p.records[0]
            if a <= p.started_unix + r.send_s and p.started_unix + _ttft(r) + r.send_s <= b:
                pre[str(r.input_len)].append(_ttft(r))
    out["colocation"] = {"decode_batch": f"{COLOC_DECODE[2]} x ({COLOC_DECODE[0]} prompt, "
                                         f"{COLOC_DECODE[1]} output)",
                         "prefill_loop": f"prompts of {COLOC_PREFILL} tokens in turn, 1 "
                                         "output token, back to back",
                         "decode_alone": alone, "decode_with_prefill": loaded,
                         "prefill_with_decode_ttft_s": pre}
    return out


# ----- simulating probe workloads and calibrating ----------------------------------------------

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


def with_decode_overhead(prof: LatencyProfile, a: float, b: float) -> LatencyProfile:
    d = prof.decode
    return replace(prof, decode=replace(d, intercept_s=d.intercept_s + a,
                                        per_seq_s=d.per_seq_s + b))


def scaled(prof: LatencyProfile, k_p: float, k_d: float) -> LatencyProfile:
    p, d = prof.prefill, prof.decode
    return replace(prof, prefill=replace(
        p, intercept_s=p.intercept_s * k_p, per_seq_s=p.per_seq_s * k_p,
        per_token_s=p.per_token_s * k_p, per_attn_s=p.per_attn_s * k_p), decode=replace(
        d, intercept_s=d.intercept_s * k_d, per_seq_s=d.per_seq_s * k_d,
        per_context_s=d.per_context_s * k_d))


def calibrate(probes: dict[str, Any], prof: LatencyProfile) -> dict[str, Any]:
    """Physical parameters from the probes against `prof` (see the module docstring)."""
    med = np.median
    # first-token path: real TTFT - simulated TTFT at RTT 0 (= the profile's prefill time)
    over = [t - _sim_ttft(sim_probe(prof, [(int(n), 1)], 0.0)[0])
            for n, ts in probes["first_token_path"].items() for t in ts]
    rtt = float(max(0.0, med(over)))
    # decode per-step overhead: steady-state step time minus the profile's, fitted a + b*B
    # on relative error (as the profile's own fits), non-negative
    per_b = []
    for st in probes["decode_ctx64"]:
        b, ctx = st["batch"], round(st["context"])
        model = prof.decode.time_of([ctx] * b)
        per_b.append({"batch": b, "context": ctx, "real_ms": 1000 * st["step_s"],
                      "model_ms": 1000 * model, "diff_ms": 1000 * (st["step_s"] - model)})
    x = np.array([[1.0, p["batch"]] for p in per_b])
    y = np.array([p["diff_ms"] / 1000 for p in per_b])
    w = 1.0 / np.array([p["real_ms"] / 1000 for p in per_b])
    a, b_ = (float(c) for c in np.linalg.lstsq(x * w[:, None], y * w, rcond=None)[0])
    if a < 0 or b_ < 0:  # keep the overhead non-negative: refit the other term alone
        col = 1 if a < 0 else 0
        xs = x[:, col] * w
        v = max(0.0, float(xs @ (y * w) / (xs @ xs)))
        a, b_ = (0.0, v) if a < 0 else (v, 0.0)
    calibrated = with_decode_overhead(prof, a, b_)
    # profile check: lone prefills against the model, a batch of 16 at context ~1,100
    lone = {n: float(med(ts)) - rtt for n, ts in probes["prefill_lone_s"].items()}
    p_err = {n: prof.prefill.time_of([(0, int(n))]) / t - 1 for n, t in lone.items()}
    big = probes["decode_b16_ctx1024"]
    d_model = calibrated.decode.time_of([round(big["context"])] * big["batch"])
    col = probes["colocation"]
    f_d = float(med([s["step_s"] for s in col["decode_with_prefill"]])
                / med([s["step_s"] for s in col["decode_alone"]]))
    # under decode load TTFT(n) = rtt_loaded + f_p * prefill(n): the short prompt gives the
    # path (additive: busy event loops and relays), the long one the compute slowdown
    pre = col["prefill_with_decode_ttft_s"]
    (n_s, t_s), (n_l, t_l) = ((int(n), float(med(ts))) for n, ts in sorted(
        pre.items(), key=lambda kv: int(kv[0])))
    m_s, m_l = (_sim_ttft(sim_probe(prof, [(n, 1)], 0.0)[0]) for n in (n_s, n_l))
    f_p = (t_l - t_s) / (m_l - m_s)
    rtt_loaded = t_s - f_p * m_s
    return {
        "rtt_bare_ms": 1000 * probes["rtt_bare_s"], "rtt_ms": 1000 * rtt,
        "rtt_loaded_ms": 1000 * max(rtt, rtt_loaded),
        "first_token_path_overheads_ms": [round(1000 * v, 2) for v in over],
        "decode_overhead": {"intercept_ms": 1000 * a, "per_seq_ms": 1000 * b_,
                            "per_batch": per_b},
        "profile_check": {"prefill_lone_real_ms": {n: 1000 * t for n, t in lone.items()},
                          "prefill_lone_model_rel_err": p_err,
                          "prefill_rel_err": max(p_err.values(), key=abs),
                          "decode_b16_real_ms": 1000 * big["step_s"],
                          "decode_b16_context": big["context"],
                          "decode_b16_model_ms": 1000 * d_model,
                          "decode_rel_err": d_model / big["step_s"] - 1},
        "colocation": {"f_p": max(1.0, f_p), "f_d": max(1.0, f_d), "f_p_measured": f_p,
                       "f_d_measured": f_d, "rtt_loaded_measured_ms": 1000 * rtt_loaded,
                       "prefill_loaded_ttft_ms": {n_s: 1000 * t_s, n_l: 1000 * t_l},
                       "prefill_samples": {n: len(ts) for n, ts in pre.items()}}}


# ----- real and simulated runs of the validation workload --------------------------------------

def workload_args(rate: float | None, n: int, seed: int, scale_factor: float) -> list[str]:
    """The options `pd-serve bench run` and `pd-serve sim run` share (rate None: all at
    once)."""
    arrivals = [] if rate is None else ["--arrival", "poisson", "--request-rate", f"{rate:.4f}"]
    return ["--trace", str(TRACE), "--num-prompts", str(n), "--max-model-len", str(CONTEXT),
            "--scale-factor", str(scale_factor), *arrivals, "--seed", str(seed)]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bench(dep: Deployment, args: list[str], result: Path, label: str) -> dict[str, Any]:
    """`pd-serve bench run` as a subprocess; its metrics, load average and CPU per process."""
    cmd = [PY, "-m", "pd_serve", "bench", "run", "--base-url", dep.url, *args,
           "--temperature", "0", "--ignore-eos", "--result", str(result), "--save-requests",
           "--no-progress", "--label", label]
    load0, cpu0 = _load(), dep.cpu()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = dep.cpu()
    cores = {k: round((cpu1[k] - cpu0[k]) / wall, 3) for k in cpu0}
    cores["client"] = round((ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall, 3)
    data = json.loads(result.read_text())
    return {"command": _cmdline(cmd), "result": str(result), "wall_s": round(wall, 1),
            "load_avg_before": load0, "load_avg_after": _load(), "cores_used": cores,
            "metrics": data["metrics"], "errors": data.get("errors", {})}


def sim_run(profile: Path, args: list[str], rtt_ms: float, result: Path, records: Path,
            ) -> dict[str, Any]:
    cmd = [PY, "-m", "pd_serve", "sim", "run", "--profile", str(profile), *args,
           "--groups", "1:1", "--b-p", str(SHAPE["b_p"]),
           "--max-num-seqs", str(SHAPE["max_num_seqs"]),
           "--max-num-batched-tokens", str(SHAPE["max_num_batched_tokens"]),
           "--kv-blocks", str(SHAPE["num_blocks"]), "--block-size", str(SHAPE["block_size"]),
           "--rtt-ms", f"{rtt_ms:.3f}", "--vllm-metrics", "--result", str(result),
           "--records", str(records)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sim run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(result.read_text())
    recs = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    return {"command": _cmdline(cmd), "metrics": data["vllm_metrics"]["overall"],
            "records": recs}


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


def calibrated_sim(base: LatencyProfile, cal: dict[str, Any], args: list[str], work: Path,
                   tag: str) -> dict[str, Any]:
    """The calibrated simulation of one rate: co-location factors iterated to a fixed point."""
    rtt0, rtt1 = cal["rtt_ms"], cal["rtt_loaded_ms"]
    rtt_ms = rtt0
    dov = cal["decode_overhead"]
    prof0 = with_decode_overhead(base, dov["intercept_ms"] / 1000, dov["per_seq_ms"] / 1000)
    f_p, f_d = cal["colocation"]["f_p"], cal["colocation"]["f_d"]
    k_p = k_d = 1.0
    history = []
    out: dict[str, Any] = {}
    for it in range(6):
        path = work / f"profile_{tag}.json"
        prof = scaled(prof0, k_p, k_d)
        prof = replace(prof, provenance={**prof.provenance, "calibration": {
            "decode_overhead_ms": [dov["intercept_ms"], dov["per_seq_ms"]],
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


# ----- orchestration ---------------------------------------------------------------------------

def wait_for_other_bench(max_s: float, names: list[str], poll_s: float = 30.0,
                         ) -> dict[str, Any]:
    """Waits while a process whose command line contains one of `names` runs (another
    engineer's benchmark or test run), at most `max_s`."""
    t0 = time.monotonic()
    seen = False
    while True:
        running = others(names)
        if not running:
            return {"waited_for": names, "waited_s": round(time.monotonic() - t0),
                    "was_running": seen, "still_running": False}
        seen = True
        if time.monotonic() - t0 >= max_s:
            print(f"{names} still running after {max_s:.0f} s; going ahead", flush=True)
            return {"waited_for": names, "waited_s": round(time.monotonic() - t0),
                    "was_running": True, "still_running": True}
        print(f"waiting for {names} (load {_load()})", flush=True)
        time.sleep(poll_s)


def others(names: list[str]) -> list[str]:
    """The names of `names` that some other process's command line contains."""
    keys = [n.encode() for n in names]
    found: set[str] = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and p.name != str(os.getpid()):
            cmd = _cmdline_of(p)
            found.update(n for n, k in zip(names, keys) if k in cmd)
    return sorted(found)


def _cmdline_of(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def _cmdline(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c.replace(str(ROOT) + "/", "")) for c in cmd).replace(PY, "python")


def measure(args: argparse.Namespace, work: Path, base: LatencyProfile) -> dict[str, Any]:
    """Every real measurement; saved to WORK/real.json."""
    waits: dict[str, Any] = {}
    real: dict[str, Any] = {"waits": waits}

    def quiet(label: str) -> None:
        """Before every measurement: no other benchmark or test run may be running."""
        waits[label] = wait_for_other_bench(args.max_wait_s, args.wait_for)
        waits[label]["load_avg"] = _load()

    quiet("start")
    real["load_avg_start"] = _load()
    dep = Deployment(work)
    try:
        real["deployment"] = {"config": dep.config, "processes": [
            " ".join(p.proc.args[2:]) if isinstance(p.proc.args, list) else str(p.proc.args)
            for p in dep.procs]}
        quiet("probes")
        t0 = time.monotonic()
        real["probes"] = run_probes(dep, args.quick)
        real["probes_wall_s"] = round(time.monotonic() - t0, 1)
        real["probes_load_avg_after"] = _load()
        real["probes_disturbed_by"] = others(args.wait_for)
        print(f"probes done in {real['probes_wall_s']} s", flush=True)
        cal = calibrate(real["probes"], base)
        if args.reprofile == "always" or (args.reprofile == "auto" and max(
                abs(cal["profile_check"]["prefill_rel_err"]),
                abs(cal["profile_check"]["decode_rel_err"])) > args.tolerance):
            real["reprofile"] = reprofile()
        if args.capacity:
            real["capacity"] = {"req_per_s": args.capacity, "source": "--capacity"}
        else:
            n = 30 if args.quick else 60
            quiet("capacity")
            cap = bench(dep, [*workload_args(None, n, args.seed, args.scale_factor),
                              "--max-concurrency", "20"], work / "capacity.json", "capacity")
            real["capacity"] = {"req_per_s": cap["metrics"]["request_throughput"],
                                "source": "closed loop, --max-concurrency 20", **cap}
        capacity = real["capacity"]["req_per_s"]
        print(f"capacity {capacity:.3f} req/s", flush=True)
        runs = []
        loads = list(args.loads) + ([max(args.loads)] if args.repeat else [])
        for i, load in enumerate(loads):
            rate = load * capacity
            n = max(args.min_requests, round(rate * args.window_s))
            wl = workload_args(rate, n, args.seed, args.scale_factor)
            label = f"load{load:g}" + ("-repeat" if i >= len(args.loads) else "")
            for attempt in range(2):  # a run another test run started during is redone once
                quiet(label if not attempt else f"{label}-redo")
                res = bench(dep, wl, work / f"real_{label}.json", label)
                res["disturbed_by"] = others(args.wait_for)
                if not res["disturbed_by"]:
                    break
                print(f"{label}: {res['disturbed_by']} started during the run", flush=True)
            runs.append({"label": label, "load": load, "rate": rate, "requests": n,
                         "workload_args": wl, **res,
                         "per_request": compact(json.loads(Path(res["result"]).read_text()))})
            m = res["metrics"]
            print(f"{label}: {rate:.3f} req/s x {n}: TTFT p50 {m['median_ttft_ms']:.0f} ms, "
                  f"p90 {m['p90_ttft_ms']:.0f} ms, TPOT p50 {m['median_tpot_ms']:.1f} ms, "
                  f"{m['request_throughput']:.3f} req/s, failed {m['failed']}, load "
                  f"{res['load_avg_after']}", flush=True)
        real["runs"] = runs
    finally:
        dep.stop()
    real["load_avg_end"] = _load()
    return real


def compact(result: dict[str, Any]) -> dict[str, list[Any]]:
    """A bench result's per-request records as columns (ms, rounded)."""
    reqs = sorted(result.get("requests", []), key=lambda r: r["index"])

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1000 * v, 2)
    return {"index": [r["index"] for r in reqs],
            "scheduled_s": [round(r["scheduled_s"], 4) for r in reqs],
            "prompt_tokens": [r["prompt_tokens"] for r in reqs],
            "output_tokens": [r["output_tokens"] for r in reqs],
            "ttft_ms": [ms(r["ttft_s"]) for r in reqs], "tpot_ms": [ms(r["tpot_s"]) for r in reqs],
            "e2el_ms": [ms(r["e2el_s"]) for r in reqs], "error": [r["error"] for r in reqs]}


def reprofile() -> dict[str, Any]:
    cmd = [PY, "-m", "pd_serve", "sim", "profile", "--backend", "torch", "--threads", "1",
           "--out", str(REPROFILE.relative_to(ROOT))]
    load0 = _load()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return {"command": _cmdline(cmd), "load_avg_before": load0, "load_avg_after": _load(),
            "path": str(REPROFILE.relative_to(ROOT))}


def compare(real_m: dict[str, Any], sim_m: dict[str, Any], tol: float) -> dict[str, Any]:
    out = {}
    for name, key in METRICS:
        r, s = float(real_m[key]), float(sim_m[key])
        err = s / r - 1 if r else float("inf")
        out[name] = {"real": r, "sim": s, "rel_err": err, "pass": abs(err) <= tol}
    return out


def analyse(real: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    profile_path = ROOT / real["reprofile"]["path"] if "reprofile" in real else PROFILE
    base = LatencyProfile.load(profile_path)
    cal = calibrate(real["probes"], base)
    rows = []
    by_label = {r["label"]: r for r in real["runs"]}
    for run in real["runs"]:
        wl, tag = run["workload_args"], run["label"]
        raw = sim_run(profile_path, wl, cal["rtt_bare_ms"], work / f"simraw_{tag}.json",
                      work / f"simraw_{tag}.jsonl")
        calib = calibrated_sim(base, cal, wl, work, tag)
        row = {"label": tag, "load": run["load"], "rate": run["rate"],
               "requests": run["requests"], "real": {
                   "load_avg_before": run["load_avg_before"],
                   "load_avg_after": run["load_avg_after"], "cores_used": run["cores_used"],
                   "failed": run["metrics"]["failed"], "command": run["command"]},
               "sim_command": calib["command"], "k_p": calib["k_p"], "k_d": calib["k_d"],
               "rtt_ms": calib["rtt_ms"],
               "fixed_point": calib["fixed_point"],
               "raw": compare(run["metrics"], raw["metrics"], args.tolerance),
               "calibrated": compare(run["metrics"], calib["metrics"], args.tolerance)}
        if tag.endswith("-repeat"):
            first = by_label[tag.removesuffix("-repeat")]
            row["real_vs_first_run"] = compare(first["metrics"], run["metrics"], args.tolerance)
        rows.append(row)
    return {"profile": str(profile_path.relative_to(ROOT)), "calibration": cal, "rows": rows}


def print_table(rows: list[dict[str, Any]], tol: float) -> None:
    head = f"{'run':>16} {'metric':>13} {'real':>9} {'sim raw':>9} {'err':>7} " \
           f"{'sim cal':>9} {'err':>7}  pass"
    print(head)
    print("-" * len(head))
    for row in rows:
        for name, _ in METRICS:
            r, c = row["raw"][name], row["calibrated"][name]
            print(f"{row['label'] + ' ' + format(row['rate'], '.2f'):>16} {name:>13} "
                  f"{r['real']:9.2f} {r['sim']:9.2f} {100 * r['rel_err']:+6.1f}% "
                  f"{c['sim']:9.2f} {100 * c['rel_err']:+6.1f}%  "
                  f"{'yes' if c['pass'] else 'NO'}")
    ok = sum(c["pass"] for row in rows for c in row["calibrated"].values())
    total = sum(len(row["calibrated"]) for row in rows)
    print(f"calibrated: {ok} of {total} within {100 * tol:.0f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "sim_validation.json")
    ap.add_argument("--work", type=Path, help="where raw results go (default: a temp dir)")
    ap.add_argument("--reuse", type=Path, help="WORK/real.json of an earlier run: analysis only")
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.3, 0.6, 0.85], help="fractions of the measured capacity")
    ap.add_argument("--capacity", type=float, help="req/s (skips the closed-loop measurement)")
    ap.add_argument("--window-s", type=float, default=110.0,
                    help="requests per rate = max(--min-requests, rate x this)")
    ap.add_argument("--min-requests", type=int, default=60)
    ap.add_argument("--scale-factor", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--repeat", action=argparse.BooleanOptionalAction, default=True,
                    help="run the highest load twice (real run-to-run spread)")
    ap.add_argument("--reprofile", choices=("auto", "always", "never"), default="auto")
    ap.add_argument("--max-wait-s", type=float, default=900.0)
    ap.add_argument("--wait-for", type=lambda v: v.split(","), default=["bench_orchestrator"],
                    help="wait while a process with one of these in its command line runs")
    ap.add_argument("--quick", action="store_true", help="smoke run (about 3 minutes)")
    args = ap.parse_args()
    # SIGTERM (and SIGINT, which a background job may ignore) stop the deployment cleanly
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if args.quick:
        args.loads, args.window_s, args.min_requests, args.repeat = [0.3, 0.85], 25.0, 15, False
    work = args.work or Path(tempfile.mkdtemp(prefix="validate_sim_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    started = datetime.datetime.now(datetime.UTC)
    if args.reuse:
        real = json.loads(args.reuse.read_text())
    else:
        real = measure(args, work, LatencyProfile.load(PROFILE))
        (work / "real.json").write_text(json.dumps(real, indent=1))
    result = analyse(real, args, work)
    print_table(result["rows"], args.tolerance)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    out = {"schema": "pd-serve/sim-validation/v1",
           "date": started.isoformat(timespec="seconds"), "commit": commit,
           "command": _cmdline([PY, *sys.argv]),
           "machine": {"cpu": platform.processor() or _cpu_name(), "cores": os.cpu_count(),
                       "python": platform.python_version(), "platform": platform.platform()},
           "tolerance": args.tolerance, "shape": SHAPE,
           "workload": {"trace": str(TRACE.relative_to(ROOT.parent)),
                        "scale_factor": args.scale_factor, "max_model_len": CONTEXT,
                        "arrival": "poisson", "seed": args.seed, "temperature": 0,
                        "ignore_eos": True},
           "real": {k: v for k, v in real.items() if k not in ("runs",)}, **result}
    out["real"]["runs"] = [{k: v for k, v in r.items() if k != "result"} for r in real["runs"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    main()
