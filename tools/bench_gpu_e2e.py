"""1 prefill + 1 decode GPU vs 2 aggregated GPUs behind the same gateway, replaying a real trace.

Both deployments run the same model, engine and gateway (forwarding with rejections); only the
instances differ: `pd` is a prefill instance on cuda:0 handing KV over NCCL to a decode instance
on cuda:1 (`pdlw`: the same with the layer-wise hand-off), `agg` is two `aggregated`-role
instances (prefill and decode in one engine), one per GPU. For every request rate,
`pd-serve bench run` replays the same trace requests with Poisson arrivals and reports goodput
at the TTFT and TPOT SLOs, TTFT/TPOT percentiles and throughput.

Usage (on a machine with two GPUs; the model dir from tools/make_random_model.py):
  python tools/bench_gpu_e2e.py --model-dir /tmp/llama3-8b --trace TRACE --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pd_serve.instance.launch import free_port  # noqa: E402

KEYS = ("request_goodput", "slo_attainment", "request_throughput", "output_throughput",
        "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms",
        "p99_tpot_ms", "p99_itl_ms", "completed", "failed")


def write_config(path: Path, args: argparse.Namespace, mode: str) -> Path:
    """One ServeConfig for every process of `mode`; `--device` picks the GPU per process."""
    cfg = {"model": {"path": str(args.model_dir), "backend": "torch", "dtype": "bfloat16",
                     "device": "cuda:0"},
           "cache": {"block_size": args.block_size, "num_blocks": args.num_blocks},
           "scheduler": {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                         "max_num_batched_tokens": args.max_model_len},
           "server": {"max_tokens_default": 256},
           "pd": {"transport": "tcp" if mode == "agg" else "nccl",
                  "handoff_layerwise": mode == "pdlw",
                  "b_p": args.max_num_seqs if mode == "agg" else args.b_p,
                  "device_checksum": args.checksum, "forward_deadline_s": 60.0,
                  "handoff_timeout_s": 120.0, "fetch_timeout_s": 60.0,
                  "attach_timeout_s": 60.0}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def spawn(name: str, argv: list[str], port: int, log_dir: Path) -> subprocess.Popen[bytes]:
    log = (log_dir / f"{name}.log").open("wb")
    cmd = [sys.executable, "-m", "pd_serve", *argv, "--port", str(port), "--log-level",
           "warning"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def start(mode: str, config: Path, log_dir: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """Starts `mode`'s instances and gateway; returns the gateway URL and the processes."""
    procs: list[subprocess.Popen[bytes]] = []

    def launch(name: str, argv: list[str]) -> str:
        port = free_port()
        procs.append(spawn(name, [*argv, "--config", str(config)], port, log_dir))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, procs[-1])
        return url

    if mode in ("pd", "pdlw"):
        decode = launch(f"{mode}-decode", ["instance", "--role", "decode", "--device", "cuda:1"])
        prefill = launch(f"{mode}-prefill", ["instance", "--role", "prefill", "--device", "cuda:0",
                                        "--decode-peers", decode])
        instances = prefill
    else:
        instances = ",".join(launch(f"agg-{i}", ["instance", "--role", "aggregated",
                                                 "--device", f"cuda:{i}"]) for i in (0, 1))
    return launch(f"{mode}-gateway", ["gateway", "--prefill", instances]), procs


def bench(gateway: str, args: argparse.Namespace, rate: float, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pd_serve", "bench", "run", "--base-url", gateway,
           "--trace", str(args.trace), "--num-prompts", str(args.num_prompts),
           "--arrival", "poisson", "--request-rate", str(rate), "--seed", "0",
           "--max-model-len", str(args.max_model_len), "--max-output", str(args.max_output),
           "--vocab-size", "32000", "--goodput",
           f"ttft:{args.ttft_slo_ms},tpot:{args.tpot_slo_ms}", "--result", str(out),
           "--no-progress", "--timeout", "600"]
    subprocess.run(cmd, cwd=REPO, check=True)
    metrics = json.loads(out.read_text())["metrics"]
    return {k: metrics.get(k) for k in KEYS}


def run_mode(mode: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    config = write_config(work / f"{mode}.yaml", args, mode)
    gateway, procs = start(mode, config, work)
    rows = []
    try:
        bench(gateway, argparse.Namespace(**{**vars(args), "num_prompts": 4}), 1.0,
              work / f"{mode}-warmup.json")  # graphs, allocator and connections warm
        for rate in args.rates:
            row = bench(gateway, args, rate, work / f"{mode}-{rate}.json")
            rows.append({"mode": mode, "rate": rate, **row})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_all(procs)
    return rows


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM in reverse start order (gateway first), then kill what is left after 30 s."""
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu_e2e"))
    ap.add_argument("--modes", default="pd,pdlw,agg")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=50.0)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--b-p", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=20000)
    ap.add_argument("--checksum", default="none", choices=("i32sum", "none"))
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for mode in args.modes.split(","):
        rows += run_mode(mode, args, args.work)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"benchmark": "gpu_e2e_pd_vs_aggregated",
                                    "date": time.strftime("%Y-%m-%d"), "settings": settings,
                                    "gpus": _gpus(), "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['mode']:4} rate {r['rate']:5.2f}: goodput {r['request_goodput']} req/s, "
              f"TTFT p50/p99 {r['median_ttft_ms']}/{r['p99_ttft_ms']} ms, "
              f"TPOT p50/p99 {r['median_tpot_ms']}/{r['p99_tpot_ms']} ms")


def _gpus() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


if __name__ == "__main__":
    main()
