"""Shared parts of tools/validate_sim.py: the instance shape and workload both sides use, the
static 1P:1D deployment, the `pd-serve bench run` / `sim run` / `sim profile` subprocesses, and
the wait for other benchmark or test runs (whose load would distort a measurement).

Lifecycle of a `Deployment(tmp)`: construction writes the config (`pd_config()`) to
`tmp/pd.yaml`, starts decode, then prefill (peered with it), then the gateway, each a
`python -m pd_serve` process logging to `tmp/{name}.log`, and returns once each /health answers
(a failed start stops what had started); `cpu()` any number of times; `stop()` (SIGTERM in
reverse order, kill after 20 s; safe to call twice).
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pd_serve.instance.launch import free_port  # noqa: E402

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


# ----- the deployment ------------------------------------------------------------------------

def pd_config() -> dict[str, Any]:
    """The deployment's config (the demo model in `SHAPE`)."""
    return {"model": {"path": str(ROOT / "models" / "shakespeare-llama"),
                      "backend": SHAPE["backend"], "threads": SHAPE["threads"]},
            "cache": {"block_size": SHAPE["block_size"], "num_blocks": SHAPE["num_blocks"],
                      "enable_prefix_caching": SHAPE["enable_prefix_caching"]},
            "scheduler": {"max_num_seqs": SHAPE["max_num_seqs"],
                          "max_num_batched_tokens": SHAPE["max_num_batched_tokens"]},
            "pd": {"b_p": SHAPE["b_p"]}}


class Proc:
    """One `python -m pd_serve` process with its log; stopped by SIGTERM (SIGINT may be ignored
    when this tool runs in the background), killed after 20 s. (tests/e2e/pd_cluster.py has a
    similar class; tools do not import tests.)"""

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


class Deployment:
    """decode, prefill (peered with it) and gateway; the config is written to `tmp`."""

    def __init__(self, tmp: Path) -> None:
        self.config = pd_config()
        # every engine writes its steps here (pd_serve.engine.step_trace)
        self.step_trace_dir = tmp / "steps"
        self.config["server"] = {"step_trace_dir": str(self.step_trace_dir)}
        self.config_path = tmp / "pd.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
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


# ----- bench and sim subprocesses ------------------------------------------------------------

def workload_args(rate: float | None, n: int, seed: int, scale_factor: float) -> list[str]:
    """The options `pd-serve bench run` and `pd-serve sim run` share (rate None: all at
    once)."""
    arrivals = [] if rate is None else ["--arrival", "poisson", "--request-rate", f"{rate:.4f}"]
    return ["--trace", str(TRACE), "--num-prompts", str(n), "--max-model-len", str(CONTEXT),
            "--scale-factor", str(scale_factor), *arrivals, "--seed", str(seed)]


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cmdline(cmd: list[str]) -> str:
    """`cmd` as a shell line, paths relative to the checkout, the interpreter as `python`."""
    return " ".join(shlex.quote(c.replace(str(ROOT) + "/", "")) for c in cmd).replace(PY, "python")


def bench(dep: Deployment, args: list[str], result: Path, label: str) -> dict[str, Any]:
    """`pd-serve bench run` as a subprocess; its metrics, load average and CPU per process."""
    cmd = [PY, "-m", "pd_serve", "bench", "run", "--base-url", dep.url, *args,
           "--temperature", "0", "--ignore-eos", "--result", str(result), "--save-requests",
           "--no-progress", "--label", label]
    load0, cpu0 = load_avg(), dep.cpu()
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
    return {"command": cmdline(cmd), "result": str(result), "wall_s": round(wall, 1),
            "load_avg_before": load0, "load_avg_after": load_avg(), "cores_used": cores,
            "metrics": data["metrics"], "errors": data.get("errors", {})}


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


def sim_run(profile: Path, args: list[str], rtt_ms: float, result: Path, records: Path,
            extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """`pd-serve sim run` of the 1:1 deployment in `SHAPE` (plus `extra` options); its
    vLLM-style metrics and records."""
    cmd = [PY, "-m", "pd_serve", "sim", "run", "--profile", str(profile), *args,
           "--groups", "1:1", "--b-p", str(SHAPE["b_p"]),
           "--max-num-seqs", str(SHAPE["max_num_seqs"]),
           "--max-num-batched-tokens", str(SHAPE["max_num_batched_tokens"]),
           "--kv-blocks", str(SHAPE["num_blocks"]), "--block-size", str(SHAPE["block_size"]),
           "--rtt-ms", f"{rtt_ms:.3f}", "--vllm-metrics", "--result", str(result),
           "--records", str(records), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sim run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(result.read_text())
    recs = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    return {"command": cmdline(cmd), "metrics": data["vllm_metrics"]["overall"],
            "records": recs}


def reprofile() -> dict[str, Any]:
    """`pd-serve sim profile` (torch, 1 thread) into `REPROFILE`."""
    cmd = [PY, "-m", "pd_serve", "sim", "profile", "--backend", "torch", "--threads", "1",
           "--out", str(REPROFILE.relative_to(ROOT))]
    load0 = load_avg()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    # the profile itself goes into real.json too: the file is overwritten by the next session's
    # re-profile, and `--reuse` must analyse with this session's
    return {"command": cmdline(cmd), "load_avg_before": load0, "load_avg_after": load_avg(),
            "path": str(REPROFILE.relative_to(ROOT)), "profile": json.loads(REPROFILE.read_text())}


# ----- other runs on the machine -------------------------------------------------------------

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
        print(f"waiting for {names} (load {load_avg()})", flush=True)
        time.sleep(poll_s)


def others(names: list[str]) -> list[str]:
    """The names of `names` that some other process's command line contains. Excluded: this
    process and its ancestors (`flock ... validate_sim.py --wait-for pytest` carries the names
    in its own command line) and `flock` wrappers (one waiting for the quiet lock this run
    holds runs nothing yet; one that got it has a child that carries the same names)."""
    keys = [n.encode() for n in names]
    found: set[str] = set()
    mine = _ancestors()
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and p.name not in mine:
            cmd = _cmdline_of(p)
            if cmd.split(b"\0", 1)[0].rsplit(b"/", 1)[-1] == b"flock":
                continue
            found.update(n for n, k in zip(names, keys) if k in cmd)
    return sorted(found)


def _ancestors() -> set[str]:
    """This process's pid and those of its ancestors."""
    out, pid = set(), os.getpid()
    while pid > 1 and str(pid) not in out:
        out.add(str(pid))
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _cmdline_of(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""
