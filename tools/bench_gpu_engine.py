"""Benchmark: the torch runner on one GPU with Llama-3-8B-shaped random weights, against the
HBM and matmul ceilings measured in the same run and transformers on the same weights.

Measures (CUDA events, warm-up calls, medians):
(a) decode step (`decode_argmax`) at each batch x context with CUDA graphs and the fused layer
    ops, then eager, against the HBM floor (weight bytes + KV bytes read per step) / measured
    copy bandwidth; decode attention variants (flex, torch) at the largest context; graphs and
    a 1-prompt prefill without the fused ops (the unfused baseline);
(b) prefill (`prefill_argmax`) of fresh prompts, MFU against a measured bf16 matmul;
(c) transformers' LlamaForCausalLM with the same generated weights (skipped if missing);
(d) the LLMEngine step loop (scheduler + runner) decode throughput at batch 32.
The weights are generated on the GPU from the seed (pd_serve.models.random_init): no checkpoint.

    python tools/bench_gpu_engine.py --out $OUT/bench_gpu_engine.json          # ~6 min, H100
    python tools/bench_gpu_engine.py --quick --out $OUT/quick.json            # tiny model
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu_engine_lib import (  # noqa: E402
    copy_bandwidth,
    decode_grid,
    engine_loop,
    hf_reference,
    matmul_ceiling,
    prefill_runs,
    weight_bytes,
)

from pd_serve.backends.base import RunnerConfig  # noqa: E402
from pd_serve.backends.torch.options import TorchOptions  # noqa: E402
from pd_serve.backends.torch.runner import TorchRunner  # noqa: E402
from pd_serve.models.random_init import write_random_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--attention", nargs="*", default=["flex", "torch"],
                   help="decode attention variants to time besides the default")
    p.add_argument("--engine-batch", type=int, default=32)
    p.add_argument("--engine-steps", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    p.add_argument("--quick", action="store_true", help="tiny model, small grid (smoke test)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.preset, args.batches, args.contexts = "tiny", [1, 8], [128]
        args.prefill_tokens, args.prefill_batches, args.iters = 256, [1, 2], 5
        args.engine_batch, args.engine_steps = 8, 5
    if args.out is None:
        args.out = Path(os.environ.get("OUT", ".")) / "bench_gpu_engine.json"
    return args


def build_runner(model_dir: str, args: argparse.Namespace) -> TorchRunner:
    """A bf16 runner with room for the largest decode grid point and prefill batch."""
    bs, top = 16, max(args.batches)
    need = max(top * -(-max(args.contexts) // bs), max(args.prefill_batches)
               * -(-args.prefill_tokens // bs), args.engine_batch * -(-(512 + 64) // bs))
    max_len = max(*args.contexts, args.prefill_tokens, 512 + args.engine_steps + 32)
    sizes = tuple(b for b in (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64) if b < top) + (top,)
    opts = TorchOptions(fast=True, graph_batch_sizes=sizes, fused=True)
    return TorchRunner(RunnerConfig(model_dir, backend="torch", device=args.device,
                                    dtype="bfloat16", block_size=bs, num_blocks=need + 8,
                                    max_model_len=max_len), opts)


def measure_ours(runner: TorchRunner, model_dir: str, args: argparse.Namespace,
                 base: dict[str, Any]) -> dict[str, Any]:
    mc = runner.model_config
    res: dict[str, Any] = {}
    wbytes = weight_bytes(runner)
    bw = base["copy"]["gb_per_s"] * 1e9

    def floor(b: int, ctx: int) -> float:
        return (wbytes + b * ctx * mc.kv_bytes_per_token(2)) / bw * 1e3

    t0 = time.perf_counter()
    res["graphs_captured"] = runner.warmup()
    res["warmup_s"] = round(time.perf_counter() - t0, 2)
    res["weight_bytes"] = wbytes
    res["decode_graphs"] = decode_grid(runner, args.batches, args.contexts, args.iters, floor)
    default_opts = runner.options
    runner.reconfigure(TorchOptions(fast=True, cuda_graphs=False, fused=True))
    res["decode_eager"] = decode_grid(runner, args.batches, args.contexts, args.iters, floor)
    res["decode_attention"] = {}
    for name in args.attention:
        try:
            runner.reconfigure(TorchOptions(fast=True, decode_attention=name, fused=True,
                                            graph_batch_sizes=(1, 32)))
            runner.warmup()
            res["decode_attention"][name] = decode_grid(
                runner, [b for b in (1, 32) if b <= max(args.batches)], [max(args.contexts)],
                args.iters, floor)
        except Exception as exc:  # an optional variant; its failure is a result too
            res["decode_attention"][name] = {"failed": repr(exc)[:400]}
    res["unfused"] = unfused_baseline(runner, args, floor, base)
    runner.reconfigure(default_opts)
    res["prefill"] = prefill_runs(runner, args.prefill_tokens, args.prefill_batches,
                                  args.iters, base["matmul"]["tflop_per_s"])
    runner.warmup()
    res["engine"] = engine_loop(runner, model_dir, args.engine_batch,
                                512 if not args.quick else 64, args.engine_steps)
    return res


def unfused_baseline(runner: TorchRunner, args: argparse.Namespace,
                     floor: Callable[[int, int], float], base: dict[str, Any]) -> dict[str, Any]:
    """The same graphs and prefill without the fused layer ops (the torch elementwise stack):
    what the fused kernels buy, measured in the same run."""
    batches = [b for b in (1, 32) if b <= max(args.batches)]
    runner.reconfigure(TorchOptions(fast=True, fused=False, graph_batch_sizes=tuple(batches)))
    runner.warmup()
    return {"decode_graphs": decode_grid(runner, batches, args.contexts, args.iters, floor),
            "prefill": prefill_runs(runner, args.prefill_tokens, [1], args.iters,
                                    base["matmul"]["tflop_per_s"])}


def print_table(result: dict[str, Any]) -> None:
    base, ours = result["baselines"], result["ours"]
    print(f"copy {base['copy']['gb_per_s']} GB/s, matmul {base['matmul']['tflop_per_s']} "
          f"TFLOP/s, weights {ours['weight_bytes'] / 1e9:.2f} GB")
    print(f"{'decode':8} {'batch':>5} {'ctx':>5} {'graphs ms':>10} {'eager ms':>9} "
          f"{'floor ms':>9} {'x floor':>8}")
    for g, e in zip(ours["decode_graphs"], ours["decode_eager"]):
        print(f"{'':8} {g['batch']:5} {g['context']:5} {g['median_ms']:10.3f} "
              f"{e['median_ms']:9.3f} {g['floor_ms']:9.3f} {g['x_floor']:8.2f}")
    for name, rows in ours["decode_attention"].items():
        print(f"attention {name}: {rows}")
    for r in ours["unfused"]["decode_graphs"]:
        print(f"unfused decode batch {r['batch']} ctx {r['context']}: {r['median_ms']:.3f} ms "
              f"({r['x_floor']:.2f}x floor)")
    for r in ours["unfused"]["prefill"]:
        print(f"unfused prefill batch {r['batch']}: {r['median_ms']:.2f} ms, MFU {r['mfu']:.0%}")
    for r in ours["prefill"]:
        print(f"prefill batch {r['batch']} x {r['tokens']}: {r['median_ms']:.2f} ms, "
              f"{r['tflop_per_s']} TFLOP/s, MFU {r['mfu']:.0%}")
    e = ours["engine"]
    print(f"engine batch {e['batch']}: step {e['step_median_ms']:.3f} ms, "
          f"{e['tokens_per_s']} tok/s")
    print(f"transformers: {json.dumps(result['transformers'])}")


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_engine: CUDA is not available", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor(), "torch": torch.__version__, "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    result["baselines"] = {
        "copy": copy_bandwidth(device, 1.0 if not args.quick else 0.125, args.iters),
        "matmul": matmul_ceiling(device, 8192 if not args.quick else 1024, args.iters)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_random_model(Path(tmp) / args.preset, args.preset, args.seed))
        t0 = time.perf_counter()
        runner = build_runner(model_dir, args)
        result["load_s"] = round(time.perf_counter() - t0, 2)
        result["ours"] = measure_ours(runner, model_dir, args, result["baselines"])
        mc = runner.model_config
        runner.close()
        result["transformers"] = {"skipped": "--no-hf"} if args.no_hf else hf_reference(
            model_dir, mc, device, args.prefill_tokens,
            [b for b in (1, 32) if b <= max(args.batches)], 512 if not args.quick else 64,
            args.iters)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
