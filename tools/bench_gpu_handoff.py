"""GPU KV hand-off benchmark: prefill on GPU 0, decode on GPU 1, NCCL between two processes.

Llama-3-8B-shaped KV (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB per token) in paged
caches [L, 2, NB, BS, KVH, D] on both sides, the request's blocks scattered at random. Methods,
measured in the same run on the same pair of processes and communicator:
  raw            one ncclSend/ncclRecv of the request's bytes, buffer to buffer (the ceiling);
  ours_bulk      pd_kernels.gather_kv (one launch, prefill GPU) + NcclTransport.read_batch of
                 one range + pd_kernels.scatter_kv (decode GPU);
  ours_per_layer the same with one range per layer (32 ranges);
  ours_read_only the read_batch alone (what the transport adds over raw);
  block_fixed    one range per block per layer per K/V, paged cache to paged cache, grouped
                 (the older systems' way; no gather/scatter);
  torch          torch index-gather + raw send + index-scatter.
Timing: both processes read the same monotonic clock. e2e = gather time (prefill, until its
synchronize) + decode time from the moment both sides posted (raw, torch) or from the
read_batch call (ours, block_fixed) until the data is scattered and synchronized. GB/s = KV
bytes / median e2e over --reps repetitions after --warmup. Data are checked bit-exact once per
case and method (a few blocks on several layers). NCCL_NVLS_ENABLE=0 is set.

Usage: python tools/bench_gpu_handoff.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu_handoff_lib import (  # noqa: E402
    LAYERS,
    TIMEOUT_S,
    TOKEN_BYTES,
    Case,
    expected_block,
    load_kernels,
    prefill_main,
)
from bench_gpu_handoff_side import DecodeSide  # noqa: E402

METHODS = ("raw", "ours_bulk", "ours_per_layer", "ours_read_only", "block_fixed", "torch")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="512 tokens, block 16, 3 reps")
    default_out = Path(os.environ.get("OUT", "results")) / "bench_gpu_handoff.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.block_sizes, args.reps, args.warmup = [512], [16], 3, 1
    for t in args.tokens:
        for bs in args.block_sizes:
            if t % bs:
                parser.error(f"--tokens {t} is not a multiple of block size {bs}")
    return args


def summarize(case: Case, runs: list[dict[str, float]]) -> dict[str, Any]:
    keys = runs[0].keys()
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    return {"median_s": med, "min_e2e_s": min(r["e2e"] for r in runs),
            "max_e2e_s": max(r["e2e"] for r in runs), "reps": len(runs),
            "gbps": case.nbytes / med["e2e"] / 1e9}


def verify(side: DecodeSide, method: str) -> bool:
    """A few blocks of several planes, bit-exact: the paged cache, or the contiguous buffer
    for the methods that stop there."""
    case = side.case
    src, dst = case.tables()
    picks = sorted({0, case.blocks // 2, case.blocks - 1})
    contig_only = method in ("raw", "ours_read_only")
    for plane in (0, 1, 2 * LAYERS - 1):
        for i in picks:
            want = expected_block(case, plane, int(src[i]), side.dev)
            if contig_only:
                row = side.contig.view(torch.int16).view(2 * LAYERS, -1)[plane]
                got = row[i * case.block_elems:(i + 1) * case.block_elems]
            else:
                got = side.kv[plane // 2, plane % 2, int(dst[i])].reshape(-1).view(torch.int16)
            if not torch.equal(got, want):
                return False
    return True


def run_method(side: DecodeSide, method: str, args: argparse.Namespace) -> dict[str, Any]:
    for _ in range(args.warmup):
        side.run(method)
    side.clear(method)
    runs = [side.run(method)]
    ok = verify(side, method)
    runs += [side.run(method) for _ in range(args.reps - 1)]
    return {**summarize(side.case, runs), "verified": ok}


def run_case(side: DecodeSide, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    side.setup(case)
    out: dict[str, Any] = {"tokens": case.tokens, "block_size": case.block_size,
                           "bytes": case.nbytes, "methods": {}}
    for method in args.methods:
        try:
            out["methods"][method] = run_method(side, method, args)
        except Exception as exc:  # noqa: BLE001 - recorded; the next method reconnects
            out["methods"][method] = {"error": f"{type(exc).__name__}: {exc}"}
            side.reconnect()
        print(f"  {case.tokens} tokens, block {case.block_size}: {method} done", flush=True)
    raw = out["methods"].get("raw", {}).get("gbps")
    for res in out["methods"].values():
        if raw and "gbps" in res:
            res["ratio_vs_raw"] = res["gbps"] / raw
    side.teardown()
    return out


def table(results: list[dict[str, Any]], methods: list[str]) -> str:
    lines = ["tokens  block     MiB  " + "  ".join(f"{m:>16}" for m in methods)]
    for r in results:
        cells = []
        for m in methods:
            res = r["methods"].get(m, {})
            cell = "error" if "error" in res else f"{res.get('gbps', 0):7.1f}"
            if "ratio_vs_raw" in res and m != "raw":
                cell += f" ({res['ratio_vs_raw']:.2f})"
            cells.append(f"{cell + ('' if res.get('verified', True) else ' BAD'):>16}")
        lines.append(f"{r['tokens']:6}  {r['block_size']:5}  {r['bytes'] / 2**20:6.0f}  "
                     + "  ".join(cells))
    return "\n".join(lines) + "\n(GB/s of KV bytes over median end-to-end time; ratio vs raw)"


def machine(side: DecodeSide, kernels: str) -> dict[str, Any]:
    from pd_serve.kv import nccl_lib

    return {"gpus": [torch.cuda.get_device_name(i) for i in range(2)],
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": nccl_lib.version_string(nccl_lib.load()), "kernels": kernels,
            "python": sys.version.split()[0], "host": os.uname().nodename}


def main() -> int:
    args = parse_args()
    if torch.cuda.device_count() < 2:
        print(f"needs 2 GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # inherited by the prefill process
    _, _, kernels, warning = load_kernels()
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=prefill_main, args=(child, 0), daemon=True)
    proc.start()
    side = DecodeSide(conn, device=1)
    started, results = time.time(), []
    try:
        for tokens in args.tokens:
            for bs in args.block_sizes:
                try:
                    results.append(run_case(side, Case(tokens, bs), args))
                except Exception as exc:  # noqa: BLE001 - recorded, the next case goes on
                    results.append({"tokens": tokens, "block_size": bs, "bytes": 0,
                                    "methods": {}, "error": f"{type(exc).__name__}: {exc}"})
                    side.reconnect()
    finally:
        try:
            leftover: dict[str, Any] = side.close()
        except (EOFError, OSError, RuntimeError) as exc:
            leftover = {"error": f"closing failed: {type(exc).__name__}: {exc}"}
        proc.join(60)
    report = {"bench": "gpu_handoff", "date": datetime.datetime.now().isoformat(),
              "elapsed_s": time.time() - started, "machine": machine(side, kernels),
              "warnings": [w for w in (warning,) if w],
              "kv": {"layers": LAYERS, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16",
                     "bytes_per_token": TOKEN_BYTES},
              "settings": {"reps": args.reps, "warmup": args.warmup, "timeout_s": TIMEOUT_S,
                           "quick": args.quick, "prefill_gpu": 0, "decode_gpu": 1},
              "leak_check": leftover, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=_jsonable))
    print(table(results, args.methods))
    print(f"kernels: {kernels}; {report['warnings'] or 'no warnings'}; JSON: {args.out}")
    return 0


def _jsonable(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    sys.exit(main())
