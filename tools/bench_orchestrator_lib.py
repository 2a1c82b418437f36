"""Shared parts of tools/bench_orchestrator.py: the scenarios' length mixes, a LocalDeployment
whose processes log to files (optionally one core each), the streaming client, closed-loop load,
window statistics, per-process CPU accounting from /proc, and the machine description.

Lifecycle of a `Deployment`: construct (config YAML in a temp dir; nothing runs), `start()`
(orchestrator, then instances and gateway; returns /status once the groups are formed),
`set_split()` / `wait_idle()` any number of times, `stop()` (safe after a process was killed).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pd_serve.config import load_serve_config  # noqa: E402
from pd_serve.instance.launch import LocalDeployment, free_port  # noqa: E402

MODEL, VOCAB, CONTEXT, FIRST_ID = "shakespeare-llama", 1024, 2048, 3
TRACES = ROOT.parent / "shared" / "traces"
MIXES = {"summarise": ("arxiv_summarization_lengths/"
                       "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv", False),
         "chat": ("sharegpt_lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv", True)}
CLK = os.sysconf("SC_CLK_TCK")
CORES = sorted(os.sched_getaffinity(0))  # before pin_plan narrows this process


# -- workload -------------------------------------------------------------------------------------

def load_mix(name: str, traces: Path, scale: float) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """The scenario's (input, output) rows scaled to the context, and a report."""
    rel, vllm_filter = MIXES[name]
    with (traces / rel).open() as f:
        raw = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
               for r in csv.DictReader(f)]
    kept = [(i, o) for i, o in raw
            if not vllm_filter or (4 <= i <= 1024 and o >= 4 and i + o <= 2048)]
    rows, cut = [], 0
    for i, o in kept:
        si, so = max(1, math.ceil(i * scale)), max(3, math.ceil(o * scale))
        so = min(so, CONTEXT - 1)
        if si + so > CONTEXT:
            si, cut = CONTEXT - so, cut + 1
        rows.append((si, so))
    ins, outs = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    report = {"source": rel, "rows": len(raw), "kept": len(kept),
              "filter": "vLLM sharegpt: 4 <= prompt <= 1024, output >= 4, total <= 2048"
              if vllm_filter else None, "scale": scale, "inputs_cut": cut,
              "input": _dist(ins), "output": _dist(outs)}
    return rows, report


def _dist(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)),
            "p90": float(np.percentile(x, 90)), "max": int(x.max())}


def prompt(i: int, n: int, salt: int) -> list[int]:
    """Request i's prompt: random token ids, unrelated across requests (no prefix hits)."""
    return [int(t) for t in np.random.default_rng([salt, i]).integers(FIRST_ID, VOCAB, n)]


# -- deployment -----------------------------------------------------------------------------------

def config(args: argparse.Namespace, scenario: str, n_p: int, n_d: int, spares: int,
           kv_blocks: int) -> dict[str, Any]:
    return {"model": {"path": str(ROOT / "models" / "shakespeare-llama"), "backend": args.backend,
                      "device": args.device, "threads": args.threads},
            "cache": {"block_size": 16, "num_blocks": kv_blocks},
            "scheduler": {"max_num_seqs": args.b_d, "max_num_batched_tokens": 8192},
            "pd": {"b_p": args.b_p, "handoff_timeout_s": 120.0, "attach_timeout_s": 60.0,
                   "forward_deadline_s": args.ttft_deadline_s},
            "gateway": {"default_scenario": scenario, "timeline_capacity": 4096,
                        "scenarios": [{"name": scenario, "policy": "forwarding",
                                       "ttft_slo": [{"deadline_s": args.ttft_deadline_s}]}]},
            "orchestrator": {"port": 0, "groups": [{"scenario": scenario, "prefill": n_p,
                                                    "decode": n_d}],
                             "spares": spares, "min_per_role": 1, "adjust": False}}


def pin_plan(names: list[str], want: bool) -> dict[str, int]:
    """Process name -> core: one core per instance, then the gateway, then the orchestrator; the
    bench client gets the rest. Empty when not asked or when there are too few cores."""
    cores = CORES
    inst = [n for n in names if n.startswith("instance-")]
    if not want:
        return {}
    if len(cores) < len(inst) + 3:
        print(f"warning: --pin needs {len(inst) + 3} cores, {len(cores)} available; not pinning",
              file=sys.stderr)
        return {}
    plan = {n: cores[k] for k, n in enumerate(inst)}
    plan.update(gateway=cores[len(inst)], orchestrator=cores[len(inst) + 1])
    _pin(set(cores[len(inst) + 2:]))
    return plan


def _pin(cores: set[int]) -> None:
    """This process onto `cores`; where the kernel refuses, it stays unpinned (the affinity
    each process really got is recorded after start)."""
    try:
        os.sched_setaffinity(0, cores)
    except OSError:
        pass


class Deployment:
    """A LocalDeployment whose children log to files in `tmp`, optionally one core each."""

    def __init__(self, tmp: Path, args: argparse.Namespace, scenario: str, n_p: int, n_d: int,
                 spares: int, kv_blocks: int) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        path = tmp / "pd.yaml"
        path.write_text(yaml.safe_dump(config(args, scenario, n_p, n_d, spares, kv_blocks)))
        self.tmp, self.scenario = tmp, scenario
        self.dep = LocalDeployment(path, load_serve_config(path), free_port(), args.backend)
        self.orch = self.dep.orchestrator_url
        self.cores = pin_plan([c.name for c in self.dep.children], args.pin)
        self.affinity: dict[str, list[int]] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

    def _spawn(self, k: int) -> None:
        child = self.dep.children[k]
        core = self.cores.get(child.name)
        with (self.tmp / f"{child.name}.log").open("ab") as log:
            child.proc = subprocess.Popen(
                child.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                preexec_fn=None if core is None else lambda: _pin({core}))

    def start(self, timeout: float) -> dict[str, Any]:
        """Orchestrator first, then the rest; returns /status once the groups are formed and a
        gateway is registered."""
        self._spawn(0)
        deadline = time.monotonic() + timeout
        while self.dep.status() is None:
            self.dep._check_alive(self.dep.children[0])
            if time.monotonic() > deadline:
                raise RuntimeError("the orchestrator did not answer")
            time.sleep(0.2)
        for k in range(1, len(self.dep.children)):
            self._spawn(k)
        self.dep.wait_healthy(timeout)
        self.affinity = {n: sorted(os.sched_getaffinity(p)) for n, p in self.pids().items()}
        status = self.dep.wait_groups(timeout)
        while not status["gateways"]:
            time.sleep(0.2)
            status = self.status()
        return status

    def status(self) -> dict[str, Any]:
        s = self.dep.status()
        if s is None:
            raise RuntimeError("the orchestrator's /status did not answer")
        return s

    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self.dep.children if c.proc is not None}

    def set_split(self, n_p: int, n_d: int, timeout: float = 300.0) -> None:
        r = httpx.post(f"{self.orch}/scenarios/{self.scenario}/ratio",
                       json={"n_p": n_p, "n_d": n_d}, timeout=30.0)
        r.raise_for_status()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            sc = s["scenarios"][self.scenario]
            settled = all(i["state"] in ("ready", "stateless") for i in s["instances"])
            if (len(sc["prefill"]), len(sc["decode"])) == (n_p, n_d) and settled:
                return
            time.sleep(0.3)
        raise RuntimeError(f"split {n_p}:{n_d} not serving after {timeout:.0f} s")

    def wait_idle(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urls = [i["url"] for i in self.status()["instances"] if i["role"]]
                busy = [u for u in urls if not httpx.get(f"{u}/stats", timeout=5).json()["idle"]]
                streams = httpx.get(f"{self.dep.url}/stats", timeout=5).json()["open_streams"]
                if not busy and not any(streams.values()):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        print("warning: deployment not idle after the drain timeout", file=sys.stderr)

    def snapshot(self) -> dict[str, Any]:
        """The gateway's and every instance's /stats, for diagnosis."""
        out: dict[str, Any] = {"at": time.perf_counter()}
        try:
            gw = httpx.get(f"{self.dep.url}/stats", timeout=5).json()
            out["gateway"] = {k: gw.get(k) for k in ("open_streams", "prefill_rejections")}
            for i in self.status()["instances"]:
                st = httpx.get(f"{i['url']}/stats", timeout=5).json()
                st.pop("model_path", None)  # a machine-specific path
                out[i["id"]] = st
        except (httpx.HTTPError, ValueError, RuntimeError) as exc:
            out["error"] = repr(exc)
        return out

    def stop(self) -> None:
        self.dep.stop()


# -- client ---------------------------------------------------------------------------------------

@dataclass
class Rec:
    """One request seen by the client; times are perf_counter seconds."""

    sent: float
    first: float | None = None
    second: float | None = None  # the second content chunk: the first token from decode
    end: float | None = None
    out_tokens: int = 0
    ok: bool = False
    error: str | None = None
    request_id: str | None = None
    window_chunks: int = 0  # content chunks (one token each) received inside the window

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.first is None or self.end is None or self.out_tokens < 2:
            return None
        return (self.end - self.first) / (self.out_tokens - 1)


async def send(client: httpx.AsyncClient, url: str, scenario: str, ids: list[int],
               max_tokens: int, rec: Rec, window: tuple[float, float] = (0.0, 0.0)) -> None:
    """Streams one completion into `rec` (created, with its send time, by the caller, so a
    cancelled request still shows what it received); chunks count within `window`."""
    body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 headers={"X-PD-Scenario": scenario}) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {_message(await r.aread())}"
            else:
                await _read(r, rec, window)
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end = time.perf_counter()
    rec.ok = rec.error is None and rec.first is not None and rec.out_tokens == max_tokens
    if not rec.ok and rec.error is None:
        rec.error = f"stream ended after {rec.out_tokens} of {max_tokens} tokens"


async def _read(r: httpx.Response, rec: Rec, window: tuple[float, float]) -> None:
    async for line in r.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        msg = json.loads(line[6:])
        if "error" in msg:
            e = msg["error"]
            rec.error = f"stream error {e.get('code')}: {e.get('message')}"
            return
        rec.request_id = rec.request_id or msg.get("id")
        if msg.get("choices"):
            now = time.perf_counter()
            if rec.first is not None and rec.second is None:
                rec.second = now
            rec.first = rec.first or now
            rec.window_chunks += window[0] <= now < window[1]
        if msg.get("usage"):
            rec.out_tokens = int(msg["usage"]["completion_tokens"])


def _message(body: bytes) -> str:
    try:
        e = json.loads(body)["error"]
        return f"{e.get('code')}: {e.get('message')}"
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


def stream_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=900.0), limits=httpx.Limits(
        max_connections=None, max_keepalive_connections=None))


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process, the bench itself and the whole machine."""
    out: dict[str, float] = {"bench": sum(os.times()[:2])}
    for name, pid in pids.items():
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(f[11]) + int(f[12])) / CLK
        except (OSError, IndexError, ValueError):
            out[name] = math.nan
    try:
        t = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        out["_machine"] = (sum(t) - t[3] - t[4]) / CLK  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        out["_machine"] = math.nan
    return out


async def closed_loop(url: str, scenario: str, rows: list[tuple[int, int]], concurrency: int,
                      warmup_s: float, measure_s: float, salt: int,
                      pids: dict[str, int]) -> tuple[list[Rec], float, dict[str, float]]:
    """`concurrency` workers (their starts spread over the first half of the warm-up), each
    sending the next request of `rows` as soon as its last one ended; stops (cancelling what is
    in flight) after warm-up plus measurement. Returns the records, the measurement window's
    start, and the cores each process used in it."""
    recs: list[Rec] = []
    nxt = iter(range(10**9))
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + measure_s)
    async with stream_client() as client:
        async def worker(k: int) -> None:
            await asyncio.sleep(k * warmup_s / 2 / concurrency)
            while True:
                i = next(nxt)
                n_in, n_out = rows[i % len(rows)]
                rec = Rec(time.perf_counter())
                recs.append(rec)
                await send(client, url, scenario, prompt(i, n_in, salt), n_out, rec, window)

        tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
        await asyncio.sleep(window[0] - time.perf_counter())
        c0 = cpu_snapshot(pids)
        await asyncio.sleep(window[1] - time.perf_counter())
        c1 = cpu_snapshot(pids)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    cores = {k: (c1[k] - c0[k]) / measure_s for k in c0}
    cores["_other"] = cores.pop("_machine") - sum(cores.values())
    return recs, window[0], cores


def window_stats(recs: list[Rec], t0: float, span: float) -> dict[str, Any]:
    done = [r for r in recs if r.end is not None and t0 <= r.end < t0 + span]
    ok = [r for r in done if r.ok]
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    tpot = [t for t in (r.tpot for r in ok) if t is not None]

    def pct(x: list[float], p: int) -> float | None:
        return float(np.percentile(x, p)) if x else None

    return {"completed": len(ok), "failed": len(done) - len(ok),
            "errors": dict(Counter(r.error for r in done if not r.ok)),
            "req_per_s": len(ok) / span, "out_tok_per_s": sum(r.out_tokens for r in ok) / span,
            "streamed_tok_per_s": sum(r.window_chunks for r in recs) / span,
            "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90),
            "tpot_p50_s": pct(tpot, 50), "tpot_p90_s": pct(tpot, 90)}


def secs(x: float | None) -> str:
    return "    -" if x is None else f"{x:5.2f}s"


def machine(args: argparse.Namespace) -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:
        torch_version = "?"
    model_cfg = json.loads((ROOT / "models" / "shakespeare-llama" / "config.json").read_text())
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain",
                                                                          "--untracked-files=no")),
            "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "torch": torch_version, "backend": args.backend, "device": args.device,
            "instance_threads": args.threads, "loadavg_start": os.getloadavg(),
            "model": {"name": MODEL, "path": "models/shakespeare-llama",
                      **{k: model_cfg.get(k) for k in ("num_hidden_layers", "hidden_size",
                                                       "num_key_value_heads",
                                                       "max_position_embeddings",
                                                       "vocab_size")}}}
