"""Benchmarks pd_kernels on one GPU at the Llama-3-8B KV shape (H=32, KVH=8, D=128, bf16).

(a) paged decode attention, batch x context x block size, one layer's cache, every row at the
    full context: `ours` (pd_kernels.paged_decode_attention, eager, and replayed from a CUDA
    graph), `flex` (torch flex_attention, compiled, over KV already gathered into contiguous
    [B, KVH, ctx, D]: the gather is NOT timed, so it is flex's best case) and `ref` (torch index
    gather of the blocks + scaled_dot_product_attention, both timed). Effective bandwidth is
    the K and V bytes read divided by the time.
(b) gather_kv / scatter_kv of one request's KV over all 32 layers, tokens x block size: ours
    vs pd_kernels.reference (advanced indexing) and torch index_select / index_copy_ on the
    flattened cache. GB/s counts bytes read plus bytes written (2 x the KV payload).
Baseline in the same run: a 1 GiB device-to-device torch copy, GB/s = 2 x 1 GiB / time. Each
time is the median over --iters calls timed one by one with CUDA events after warm-up; a
256 MiB buffer is overwritten before every timed call so the KV is not served from L2.

    python tools/bench_gpu_kernels.py [--quick] [--iters 30] [--sweep-splits] [--out x.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pd_serve.backends.torch.kernels import load_pd_kernels as find_pd_kernels  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32
DTYPE = torch.bfloat16


def load_pd_kernels() -> ModuleType:
    """pd_kernels as installed, else the source tree's kernels/ under that name."""
    module = find_pd_kernels()
    assert module is not None, "kernels/ is missing from the source tree"
    return module


class Timer:
    """Median microseconds of single calls, CUDA events, L2 flushed before each call."""

    def __init__(self, iters: int, warmup: int) -> None:
        self.iters, self.warmup = iters, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # [256 MiB]

    def us(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.flush.fill_(1)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)


def copy_bandwidth(timer: Timer) -> float:
    """GB/s of a 1 GiB device copy, read + write bytes."""
    src = torch.ones(2**30, dtype=torch.uint8, device="cuda")  # [1 GiB]
    dst = torch.empty_like(src)
    return 2 * src.numel() / timer.us(lambda: dst.copy_(src)) / 1e3


def graph_of(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def compiled_flex() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # one compile per (B, ctx)
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(flex_attention, dynamic=False)


def attention_inputs(batch: int, ctx: int, block_size: int) -> dict[str, torch.Tensor]:
    """q, one layer's K/V cache in shuffled blocks, tables and lengths (all rows full)."""
    per_row = ctx // block_size
    num_blocks = batch * per_row + 1
    shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)  # [NB, BS, KVH, D]
    return {
        "q": torch.randn(batch, HEADS, HEAD_DIM, device="cuda").to(DTYPE),  # [B, H, D]
        "k": torch.randn(shape, device="cuda").to(DTYPE),
        "v": torch.randn(shape, device="cuda").to(DTYPE),
        "tables": torch.randperm(num_blocks - 1, device="cuda")[:batch * per_row]
        .view(batch, per_row).int(),  # [B, ctx / BS]
        "lens": torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),  # [B]
    }


def gathered(x: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x[name]'s blocks of every row as contiguous [B, KVH, ctx, D] (torch index gather)."""
    batch, per_row = x["tables"].shape
    blocks = x[name][x["tables"].long()]  # [B, ctx / BS, BS, KVH, D]
    return blocks.view(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)


def bench_attention(pk: ModuleType, timer: Timer, flex: Callable[..., torch.Tensor] | None,
                    batch: int, ctx: int, block_size: int) -> dict[str, Any]:
    x = attention_inputs(batch, ctx, block_size)
    scale = HEAD_DIM ** -0.5
    out = torch.empty_like(x["q"])

    def ours() -> None:
        pk.paged_decode_attention(x["q"], x["k"], x["v"], x["tables"], x["lens"], scale,
                                  out=out)

    def ref() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            x["q"].unsqueeze(2), gathered(x, "k"), gathered(x, "v"), scale=scale,
            enable_gqa=True)

    row: dict[str, Any] = {"batch": batch, "context": ctx, "block_size": block_size,
                           "kv_bytes": 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2}
    row["ours_us"] = timer.us(ours)
    graph = graph_of(ours)
    row["ours_graph_us"] = timer.us(graph.replay)
    row["ref_us"] = timer.us(ref)
    row["max_abs_diff_vs_ref"] = float((out.float() - ref().squeeze(2).float()).abs().max())
    row["flex_us"], row["flex_error"] = None, None
    if flex is not None:
        k4, v4, q4 = gathered(x, "k").contiguous(), gathered(x, "v").contiguous(), \
            x["q"].unsqueeze(2)
        try:
            row["flex_us"] = timer.us(lambda: flex(q4, k4, v4, scale=scale, enable_gqa=True))
        except Exception as exc:  # a compile failure is a result to report, not a crash
            row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for name in ("ours", "ours_graph", "ref", "flex"):
        us = row[f"{name}_us"]
        row[f"{name}_gb_s"] = None if us is None else row["kv_bytes"] / us / 1e3
    return row


def kv_copy_inputs(tokens: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All layers' paged KV with twice the blocks the request needs, and a shuffled table."""
    need = math.ceil(tokens / block_size)
    num_blocks = 2 * need + 1
    kv_blocks = torch.randn(LAYERS, 2, num_blocks, block_size, KV_HEADS, HEAD_DIM,
                            device="cuda").to(DTYPE)  # [L, 2, NB, BS, KVH, D]
    table = torch.randperm(num_blocks - 1, device="cuda")[:need].int()  # [need]
    return kv_blocks, table


def bench_kv_copy(pk: ModuleType, timer: Timer, tokens: int, block_size: int) -> dict[str, Any]:
    kv_blocks, table = kv_copy_inputs(tokens, block_size)
    buf = torch.empty(LAYERS, 2, tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE,
                      device="cuda")  # [L, 2, T, KVH, D], the KVLayout order
    pos = torch.arange(tokens, device="cuda")
    slots = table.long()[pos // block_size] * block_size + pos % block_size  # [T]
    flat = kv_blocks.view(LAYERS * 2, -1, KV_HEADS * HEAD_DIM)  # [2L, NB * BS, KVH * D]
    flat_buf = buf.view(LAYERS * 2, tokens, KV_HEADS * HEAD_DIM)
    cases = {
        "gather_ours": lambda: pk.gather_kv(kv_blocks, table, tokens, buf),
        "gather_ref": lambda: pk.reference.ref_gather_kv(kv_blocks, table, tokens, buf),
        "gather_index_select": lambda: torch.index_select(flat, 1, slots, out=flat_buf),
        "scatter_ours": lambda: pk.scatter_kv(buf, kv_blocks, table, tokens),
        "scatter_ref": lambda: pk.reference.ref_scatter_kv(buf, kv_blocks, table, tokens),
        "scatter_index_copy": lambda: flat.index_copy_(1, slots, flat_buf),
    }
    row: dict[str, Any] = {"tokens": tokens, "block_size": block_size,
                           "kv_bytes": buf.numel() * buf.element_size()}
    for name, fn in cases.items():
        us = timer.us(fn)
        row[f"{name}_us"], row[f"{name}_gb_s"] = us, 2 * row["kv_bytes"] / us / 1e3
    check = torch.empty_like(buf)
    pk.reference.ref_gather_kv(kv_blocks, table, tokens, check)
    pk.gather_kv(kv_blocks, table, tokens, buf)
    row["gather_matches_ref"] = bool(torch.equal(buf, check))
    return row


def sweep_splits(pk: ModuleType, timer: Timer) -> list[dict[str, Any]]:
    """Our decode attention at fixed split counts (tuning WAVES / MAX_TILES_PER_SPLIT)."""
    rows = []
    for batch, ctx in ((1, 2048), (1, 8192), (8, 8192), (32, 2048), (64, 8192)):
        rows += sweep_case(timer, batch, ctx)
    return rows


def sweep_case(timer: Timer, batch: int, ctx: int) -> list[dict[str, Any]]:
    from pd_kernels.decode_attention import choose_num_splits, paged_decode_attention_triton

    x = attention_inputs(batch, ctx, 16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = choose_num_splits(batch, KV_HEADS, ctx // 16, 16, sms)
    rows = []
    for splits in sorted({1, 2, 4, 8, 16, 32, 64, 128, chosen}):
        call = functools.partial(paged_decode_attention_triton, x["q"], x["k"], x["v"],
                                 x["tables"], x["lens"], 0.1, num_splits=splits)
        us = timer.us(call)
        rows.append({"batch": batch, "context": ctx, "block_size": 16, "splits": splits,
                     "chosen": splits == chosen, "us": us})
        mark = "*" if splits == chosen else " "
        print(f"  sweep B={batch} ctx={ctx} splits={splits:3d}{mark} {us:8.1f} us", flush=True)
    return rows


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> dict[str, Any]:
    pk = load_pd_kernels()
    timer = Timer(args.iters, args.warmup)
    copy_gb_s = copy_bandwidth(timer)
    print(f"device copy bandwidth (read + write): {copy_gb_s:.0f} GB/s", flush=True)
    batches, contexts, blocks, tokens = ((1, 8), (512, 2048), (16,), (512,)) if args.quick \
        else ((1, 8, 32, 64), (512, 2048, 8192), (16, 128), (512, 2048, 8192))
    flex = None if args.no_flex else compiled_flex()
    attention = []
    print("| B | ctx | BS | ours us | graph us | flex us | ref us | ours GB/s | % copy |")
    for batch in batches:
        for ctx in contexts:
            for block_size in blocks:
                r = bench_attention(pk, timer, flex, batch, ctx, block_size)
                attention.append(r)
                print(f"| {batch} | {ctx} | {block_size} | {r['ours_us']:.1f} | "
                      f"{r['ours_graph_us']:.1f} | {fmt(r['flex_us'])} | {r['ref_us']:.1f} | "
                      f"{r['ours_gb_s']:.0f} | {100 * r['ours_gb_s'] / copy_gb_s:.0f} |",
                      flush=True)
                torch.cuda.empty_cache()
    copies = []
    print("| tokens | BS | gather GB/s (ours/ref/index_select) | scatter GB/s "
          "(ours/ref/index_copy) |")
    for n in tokens:
        for block_size in blocks:
            r = bench_kv_copy(pk, timer, n, block_size)
            copies.append(r)
            print(f"| {n} | {block_size} | {r['gather_ours_gb_s']:.0f} / "
                  f"{r['gather_ref_gb_s']:.0f} / {r['gather_index_select_gb_s']:.0f} | "
                  f"{r['scatter_ours_gb_s']:.0f} / {r['scatter_ref_gb_s']:.0f} / "
                  f"{r['scatter_index_copy_gb_s']:.0f} |", flush=True)
            torch.cuda.empty_cache()
    sweep = sweep_splits(pk, timer) if args.sweep_splits else []
    return {"copy_gb_s": copy_gb_s, "attention": attention, "kv_copy": copies,
            "split_sweep": sweep, "flex_form": "contiguous pre-gathered KV, gather not timed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes (smoke run)")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per case (>= 20)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-flex", action="store_true", help="skip torch flex_attention")
    parser.add_argument("--sweep-splits", action="store_true",
                        help="also time decode attention at fixed split counts")
    default_out = Path(os.environ["OUT"]) / "bench_gpu_kernels.json" if os.environ.get("OUT") \
        else None
    parser.add_argument("--out", type=Path, default=default_out, help="write JSON here")
    args = parser.parse_args()
    if args.iters < 20:
        parser.error("--iters must be at least 20")
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_kernels: needs a CUDA GPU")
    result = run(args)
    result["meta"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "python": platform.python_version(), "iters": args.iters, "quick": args.quick,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "layers": LAYERS, "dtype": "bfloat16"},
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
