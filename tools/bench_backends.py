"""Benchmark: prefill and decode tokens/s of the MindSpore and PyTorch backends on one machine.

Each backend runs in its own subprocess (the two frameworks' thread pools would otherwise
compete), one after the other in the same invocation, on the same checkpoint and batch shapes.
Graph compilation and warm-up are timed separately and excluded from the throughput figures.

    python tools/bench_backends.py --model models/shakespeare-llama \
        --out docs/results/cpu_backends.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/shakespeare-llama")
    p.add_argument("--backends", nargs="+", default=["mindspore", "torch"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2,
                   help="alternate the backends this many times (shows run-to-run spread)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def run_worker(args: argparse.Namespace) -> dict:
    """Measures one backend in this process and returns its figures."""
    import numpy as np

    from pd_serve.backends import create_runner
    from pd_serve.backends.base import DecodeBatch, PrefillBatch, RunnerConfig, SeqChunk

    max_b = max(args.batches)
    per_seq = -(-(args.prompt_len + args.decode_steps + 2) // args.block_size)
    cfg = RunnerConfig(model_dir=args.model, backend=args.worker, device=args.device,
                       block_size=args.block_size, num_blocks=max_b * per_seq,
                       threads=args.threads)
    t0 = time.perf_counter()
    runner = create_runner(cfg)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = runner.model_config.vocab_size
    results: dict = {"backend": args.worker, "load_s": round(load_s, 3), "batches": {}}
    for b in args.batches:
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
        prompts = rng.integers(1, vocab, size=(b, args.prompt_len)).tolist()
        batch = PrefillBatch([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])
        t0 = time.perf_counter()
        logits = runner.prefill(batch)  # first call compiles (MindSpore) and warms caches
        first_prefill_s = time.perf_counter() - t0
        prefill_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            logits = runner.prefill(batch)
            prefill_times.append(time.perf_counter() - t0)
        tokens = np.argmax(logits, axis=-1).tolist()
        step_times: list[float] = []
        first_decode_s: float | None = None
        for step in range(args.decode_steps + 1):
            dec = DecodeBatch(tokens, [args.prompt_len + step] * b, tables)
            t0 = time.perf_counter()
            tokens = np.argmax(runner.decode(dec), axis=-1).tolist()
            dt = time.perf_counter() - t0
            if first_decode_s is None:
                first_decode_s = dt
            else:
                step_times.append(dt)
        p_med, d_med = statistics.median(prefill_times), statistics.median(step_times)
        assert first_decode_s is not None  # the decode loop runs at least once
        results["batches"][str(b)] = {
            "prefill_tokens": b * args.prompt_len,
            "prefill_s_median": round(p_med, 4),
            "prefill_tok_s": round(b * args.prompt_len / p_med, 1),
            "first_prefill_s": round(first_prefill_s, 3),
            "decode_step_ms_median": round(1000 * d_med, 2),
            "decode_tok_s": round(b / d_med, 1),
            "first_decode_s": round(first_decode_s, 3),
        }
    runner.close()
    return results


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for mod in ("mindspore", "torch", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "machine": machine(), "versions": versions(), "model": Path(args.model).name,
              "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
              "repeats": args.repeats, "results": []}
    for rnd, backend in [(r, b) for r in range(args.rounds) for b in args.backends]:
        cmd = [sys.executable, __file__, "--worker", backend] + sys.argv[1:]
        root = str(Path(__file__).resolve().parents[1])  # works without installing the package
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode:
            sys.exit(f"{backend} worker failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["round"] = rnd
        report["results"].append(result)
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    print(f"{'round':>5} {'backend':<10} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} "
          f"{'step ms':>8} {'1st prefill s':>14}")
    for res in report["results"]:
        for b, r in res["batches"].items():
            print(f"{res['round']:>5} {res['backend']:<10} {b:>5} {r['prefill_tok_s']:>14} "
                  f"{r['decode_tok_s']:>13} {r['decode_step_ms_median']:>8} "
                  f"{r['first_prefill_s']:>14}")


if __name__ == "__main__":
    main()
