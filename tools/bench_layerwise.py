"""Layer-wise hand-off vs staged hand-off: the gap between the first and second token.

One prefill + one decode instance + the gateway on loopback (torch, demo model, one thread
each), started once with `pd.handoff_layerwise: false` (stage after the prefill, then decode
reads) and once with `true` (decode reads each layer while the prefill computes). For each
prompt length, `pd-serve bench run` sends the same requests one at a time; the hand-off sits
between the first token (streamed by prefill) and the second (the first decode step after the
KV landed), so the first inter-token gap is what the layer-wise mode can shorten. TTFT and the
later gaps are reported too (they should not move).

    python tools/bench_layerwise.py --out docs/results/layerwise_cpu_torch.json   # ~6 min here
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(REPO))

from bench_gpu_e2e import spawn, stop_all, wait_healthy  # noqa: E402

from pd_serve.instance.launch import free_port  # noqa: E402

DEMO = REPO / "models" / "shakespeare-llama"


def write_config(path: Path, layerwise: bool, threads: int) -> Path:
    cfg = {"model": {"path": str(DEMO), "backend": "torch", "threads": threads},
           "cache": {"block_size": 16, "num_blocks": 1024, "enable_prefix_caching": False},
           "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 2048},
           "pd": {"handoff_layerwise": layerwise, "b_p": 2}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, work: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def launch(name: str, argv: list[str]) -> str:
        port = free_port()
        procs.append(spawn(name, [*argv, "--config", str(config)], port, work))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, procs[-1], timeout=300)
        return url

    decode = launch("decode", ["instance", "--role", "decode"])
    prefill = launch("prefill", ["instance", "--role", "prefill", "--decode-peers", decode])
    return launch("gateway", ["gateway", "--prefill", prefill]), procs


def bench(gateway: str, length: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pd_serve", "bench", "run", "--base-url", gateway,
           "--input-len", str(length), "--output-len", str(args.output_len), "--range-ratio",
           "0", "--num-prompts", str(args.num_prompts), "--max-concurrency", "1",
           "--request-rate", "1000", "--seed", "0", "--ignore-eos", "--temperature", "0",
           "--save-requests", "--no-progress", "--result", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    reqs = [r for r in json.loads(out.read_text())["requests"] if r["success"]]
    first_gap = [r["itl_s"][0] * 1e3 for r in reqs if r["itl_s"]]
    later = [g * 1e3 for r in reqs for g in r["itl_s"][1:]]
    return {"input_len": length, "completed": len(reqs),
            "first_gap_ms_median": round(statistics.median(first_gap), 2),
            "first_gap_ms_mean": round(statistics.fmean(first_gap), 2),
            "ttft_ms_median": round(statistics.median(r["ttft_s"] * 1e3 for r in reqs), 2),
            "later_gap_ms_median": round(statistics.median(later), 2),
            "first_gaps_ms": [round(g, 2) for g in first_gap]}


def run_mode(layerwise: bool, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    mode = "layerwise" if layerwise else "staged"
    config = write_config(work / f"{mode}.yaml", layerwise, args.threads)
    gateway, procs = start(config, work)
    rows = []
    try:
        bench(gateway, 64, argparse.Namespace(**{**vars(args), "num_prompts": 2}),
              work / f"{mode}-warmup.json")
        for length in args.lengths:
            rows.append({"mode": mode, **bench(gateway, length, args,
                                               work / f"{mode}-{length}.json")})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "first_gaps_ms"}),
                  flush=True)
    finally:
        stop_all(procs)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 1900])
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="staged/layer-wise alternations")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):  # alternate, so drift of a shared machine hits both
            for layerwise in (False, True):
                rows += [{"round": rnd, **r} for r in run_mode(layerwise, args, Path(tmp))]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["out"] = str(Path(settings["out"]).resolve().relative_to(REPO)) \
        if Path(settings["out"]).resolve().is_relative_to(REPO) else "(outside the repo)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "layerwise_handoff_first_gap",
                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                    "settings": settings, "rows": rows}, indent=1) + "\n")
    print(f"{'mode':10} {'len':>5} {'first gap p50':>14} {'TTFT p50':>9} {'later gap p50':>14}")
    for r in rows:
        print(f"{r['mode']:10} {r['input_len']:5} {r['first_gap_ms_median']:14.1f} "
              f"{r['ttft_ms_median']:9.1f} {r['later_gap_ms_median']:14.1f}")


if __name__ == "__main__":
    main()
