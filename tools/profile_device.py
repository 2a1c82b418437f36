"""Measure the profiles the P/D-Device settings planner reads (pd_device.profiles) on this
machine: device prefill time vs tokens and decode step time with the device's runner
thread-limited, cloud TTFT vs prompt tokens and TPOT through a running gateway's assist API,
and quality vs refinement ratio rho.

* device: each backend in its own subprocess (MindSpore and torch thread pools are process-wide
  and would compete), `create_runner(RunnerConfig(threads=T))`; every shape is run once to
  warm up (MindSpore compiles per shape), then the median of `--repeats` runs; prefill from an
  empty cache, decode steps at each `--decode-contexts` (the profile keeps the slowest);
* cloud: greedy assist requests (N = `--cloud-tokens`, rho = `--cloud-rho`, so the
  refinement's cost is included) per prompt length; TTFT = send -> `first` event, TPOT =
  median gap between successive tokens; loopback, so no link time is included;
* quality(rho): on held-out corpus prompts, the cloud-only greedy output y (assist with N =
  G - 1, rho = 1) is scored under the refined prompt the cloud returns for rho (assist with
  N = 0): quality = share of y_2..y_G that the device's model ranks first given the refined
  prompt and y's previous tokens (teacher-forced top-1 agreement; y_1 comes from the cloud).

    python tools/profile_device.py --cloud-url http://127.0.0.1:8000 --out profiles_raw.json

writes the raw measurements to --out and one planner profile per backend next to it
(`<out stem>_<backend>.json`, load with pd_device.profiles.Profiles.load).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_device_lib import (  # noqa: E402
    DEFAULT_CORPUS,
    REPO,
    AssistClient,
    held_out_tokens,
    measure_quality,
)

from pd_device.profiles import (  # noqa: E402
    CloudProfile,
    DeviceProfile,
    Profiles,
    QualityCurve,
    TimeCurve,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "shakespeare-llama")
    p.add_argument("--backends", nargs="+", default=["mindspore", "torch"])
    p.add_argument("--threads", type=int, default=1, help="device runner threads")
    p.add_argument("--slowdown", type=float, default=1.0,
                   help="device times multiplied by this (DeviceConfig.slowdown)")
    p.add_argument("--lengths", nargs="+", type=int,
                   default=[16, 32, 64, 128, 256, 512, 1024, 2048])
    p.add_argument("--decode-contexts", nargs="+", type=int, default=[200, 900],
                   help="decode contexts; context + steps should stay inside one MindSpore "
                        "shape bucket (200..216 in 256, 900..916 in 1024)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cloud-url", default=None, help="gateway base URL (no cloud part if unset)")
    p.add_argument("--cloud-tokens", type=int, default=16)
    p.add_argument("--cloud-rho", type=float, default=0.5)
    p.add_argument("--rhos", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--quality-prompts", type=int, default=6)
    p.add_argument("--quality-len", type=int, default=512)
    p.add_argument("--quality-output", type=int, default=64)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ.get("OUT", "results")) / "device_profiles.json"
    return args


def measure_device(model: Path, backend: str, threads: int | None, lengths: list[int],
                   contexts: list[int], steps: int, repeats: int,
                   quantile: float = 90.0) -> dict[str, Any]:
    """Seconds per engine step in this process, as the device runtime pays them (the runner
    plus the engine's scheduling and sampling): prefill of n tokens from an empty cache (one
    step; `quantile` and median of `repeats`) per length, and decode steps per context (the
    `quantile` and median of `steps` steps, timed on a second pass)."""
    import numpy as np

    from pd_serve.backends import create_runner
    from pd_serve.backends.base import RunnerConfig
    from pd_serve.config import CacheConfig, SchedulerConfig
    from pd_serve.engine.engine import LLMEngine
    from pd_serve.engine.sampling_params import SamplingParams
    from pd_serve.models.tokenizer import Tokenizer

    longest = max(max(lengths), max(contexts) + steps) + 1
    runner = create_runner(RunnerConfig(str(model), backend=backend, threads=threads,
                                        num_blocks=-(-longest // 16) + 2))
    engine = LLMEngine(runner, Tokenizer(str(model)),
                       CacheConfig(16, runner.num_blocks, False),
                       SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=longest,
                                       max_model_len=longest + 16))
    vocab = runner.model_config.vocab_size
    rng = np.random.default_rng(0)

    def run(n: int, max_tokens: int) -> list[float]:
        """Step seconds of one greedy request of n random tokens (its own work: the smaller
        of wall and CPU time, as pd_device.worker.stretch_s counts it)."""
        engine.add_request(f"p{rng.integers(1 << 30)}", rng.integers(3, vocab, n).tolist(),
                           SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                          ignore_eos=True))
        times = []
        while engine.has_unfinished():
            t0, c0 = time.perf_counter(), time.process_time()
            engine.step()
            times.append(min(time.perf_counter() - t0, time.process_time() - c0))
        return times

    out: dict[str, Any] = {"backend": backend, "threads": threads, "quantile": quantile,
                           "prefill_s": [], "prefill_median_s": [], "decode_s": [],
                           "decode_median_s": []}
    for n in lengths:
        run(n, 1)  # warm-up / compile for this shape
        t = [run(n, 1)[0] for _ in range(repeats)]
        out["prefill_s"].append([n, float(np.percentile(t, quantile))])
        out["prefill_median_s"].append([n, statistics.median(t)])
    for ctx in contexts:
        # the first pass compiles and warms up (MindSpore stays slow for a few calls after
        # building a graph); only the second is timed
        run(ctx, steps + 1)
        t = run(ctx, steps + 1)[1:]
        out["decode_s"].append([ctx, float(np.percentile(t, quantile))])
        out["decode_median_s"].append([ctx, statistics.median(t)])
    runner.close()
    return out


def measure_cloud(client: AssistClient, lengths: list[int], n: int, rho: float, repeats: int,
                  vocab: int = 1024) -> dict[str, Any]:
    """Median TTFT per prompt length and the median token gap of greedy assist requests."""
    import random
    rng = random.Random(0)
    ttft: list[list[float]] = []
    gaps: list[float] = []
    client.run([5] * 8, n, rho, n + 1)  # connection and first-request warm-up
    for length in lengths:
        firsts = []
        for _ in range(repeats):
            run = client.run([rng.randrange(3, vocab) for _ in range(length)], n, rho, n + 1)
            firsts.append(run.first_s)
            times = [run.first_s, *run.token_s]
            gaps.extend(b - a for a, b in zip(times, times[1:]))
        ttft.append([length, statistics.median(firsts)])
    return {"ttft_s": ttft, "tpot_s": statistics.median(gaps) if gaps else 0.0,
            "cloud_tokens": n, "rho": rho, "repeats": repeats}


def worker(args: argparse.Namespace) -> None:
    """Runs one part in this process and prints its JSON (the last stdout line)."""
    if args.worker == "quality":
        from pd_serve.backends import create_runner
        from pd_serve.backends.base import RunnerConfig

        runner = create_runner(RunnerConfig(str(args.model), backend=args.backends[0],
                                            num_blocks=160))
        client = AssistClient(args.cloud_url, args.model)
        text = held_out_tokens(args.model, args.corpus) if args.corpus.is_file() else None
        if text is None:
            raise SystemExit(f"quality needs the corpus: {args.corpus} not found")
        step = len(text) // max(1, args.quality_prompts)
        prompts = [text[i * step:i * step + args.quality_len]
                   for i in range(args.quality_prompts)]
        result = measure_quality(runner, client, prompts, args.rhos, args.quality_output)
    else:
        result = measure_device(args.model, args.worker, args.threads, args.lengths,
                                args.decode_contexts, args.decode_steps, args.repeats)
    print(json.dumps(result), flush=True)


def run_worker(args: argparse.Namespace, part: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", part]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{part} worker failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def profiles_of(device: dict[str, Any], cloud: dict[str, Any] | None,
                quality: dict[str, Any] | None, slowdown: float,
                provenance: dict[str, Any]) -> Profiles:
    """The planner's Profiles from the raw parts (no cloud measured: an unusable cloud whose
    TTFT is infinite is not expressible, so a 1 h TTFT stands for it)."""
    dev = DeviceProfile(TimeCurve(tuple(map(tuple, device["prefill_s"]))),
                        max(s for _, s in device["decode_s"]),
                        f"{device['backend']} threads={device['threads']}")
    if slowdown != 1.0:
        dev = dev.scaled(slowdown)
    cloud_p = (CloudProfile(TimeCurve(tuple(map(tuple, cloud["ttft_s"]))), cloud["tpot_s"])
               if cloud else CloudProfile(TimeCurve(((1.0, 3600.0),)), 3600.0))
    points = tuple((r, q) for r, q in quality["curve"]) if quality else ()
    return Profiles(dev, cloud_p, QualityCurve(points), provenance)


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpu": platform.processor(),
                        "cores": os.cpu_count(), "python": platform.python_version()},
            "model": args.model.name, "threads": args.threads, "slowdown": args.slowdown,
            "command": "python tools/profile_device.py " + " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    raw: dict[str, Any] = {"provenance": provenance(args), "device": {}, "profiles": {}}
    for backend in args.backends:
        raw["device"][backend] = run_worker(args, backend)
        print(f"device {backend}: prefill {raw['device'][backend]['prefill_s']}, "
              f"decode {raw['device'][backend]['decode_s']}", flush=True)
    cloud = quality = None
    if args.cloud_url:
        client = AssistClient(args.cloud_url, args.model)
        cloud = raw["cloud"] = measure_cloud(client, args.lengths, args.cloud_tokens,
                                             args.cloud_rho, args.repeats)
        client.close()
        print(f"cloud: ttft {cloud['ttft_s']}, tpot {cloud['tpot_s'] * 1e3:.1f} ms", flush=True)
        quality = raw["quality"] = run_worker(args, "quality")
        print(f"quality: {quality['curve']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for backend, dev in raw["device"].items():
        prof = profiles_of(dev, cloud, quality, args.slowdown, raw["provenance"])
        path = args.out.with_name(f"{args.out.stem}_{backend}.json")
        prof.save(path)
        raw["profiles"][backend] = str(path)
    args.out.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {args.out} and {', '.join(raw['profiles'].values())}")


if __name__ == "__main__":
    main()
