"""Benchmarks the cann_ext host TCP transport on hand-off-shaped READs between two processes.

A spawned "prefill" process registers a KV buffer and serves it; this process (the "decode"
side) connects and READs it into its own registered buffer, timing post -> wait per case:
  contiguous   one READ of the whole request's KV ([layers, 2, tokens, heads, dim] bytes);
  per_layer    one READ per layer (its K and V are adjacent in the contiguous form);
  block_fixed  one READ per block per layer per K/V, from and to shuffled block ids of paged
               caches [layers, 2, num_blocks, block_size, heads, dim] (no gather/scatter);
  block_fixed_sync  the same READs, each posted and waited for before the next: one
               sender/receiver confirmation round trip per block, the per-block cost the
               paper attributes to block-fixed transfer.
All READs of the other cases go in one batched cx_post (pipelined). Reports the median of
--repeats runs. block_fixed_sync times only the first --sync-max-reads READs of a case when
it has more, and extrapolates linearly to all of them (`extrapolated_from` in the JSON, `~`
in the table).

Usage: python tools/bench_transport.py [--tokens 512 2048 8192] [--repeats 5] [--out x.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pd_serve.kv.cann_ext import Endpoint, make_xfers  # noqa: E402


@dataclass(frozen=True)
class KVShape:
    """Per-token KV geometry of one model."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    def token_bytes(self) -> int:
        """Bytes of one token of K (or V) in one layer."""
        return self.num_kv_heads * self.head_dim * self.dtype_bytes


MODELS = (
    KVShape("demo (6L, 4 KV heads, dim 32, fp32)", 6, 4, 32, 4),
    KVShape("Llama-3-8B (32L, 8 KV heads, dim 128, bf16)", 32, 8, 128, 2),
)


@dataclass
class Result:
    model: str
    tokens: int
    mode: str
    block_size: int | None
    num_reads: int
    bytes: int
    median_s: float
    gb_per_s: float
    extrapolated_from: int | None = None  # READs actually timed (block_fixed_sync prefix)


def serve(conn: mp.connection.Connection, nbytes: int) -> None:
    """The prefill process: registers nbytes, publishes them, serves READs until told to stop."""
    with Endpoint(timeout_ms=60_000) as ep:
        kv = np.ones(nbytes, dtype=np.uint8)  # [nbytes], pages touched up front
        handle = ep.register(kv)
        conn.send((ep.conn_id(), ep.export(handle)))
        conn.recv()


def case_reads(
    shape: KVShape, tokens: int, mode: str, block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(local offsets, remote offsets, lengths) of every READ of one case."""
    plane = tokens * shape.token_bytes()  # one layer's K (or V) for the request
    if mode == "contiguous":
        return (
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            np.array([2 * shape.num_layers * plane]),
        )
    if mode == "per_layer":
        offsets = np.arange(shape.num_layers, dtype=np.int64) * 2 * plane
        return offsets, offsets, np.full(shape.num_layers, 2 * plane)
    num_blocks = -(-tokens // block_size)
    block = block_size * shape.token_bytes()
    planes = np.arange(2 * shape.num_layers, dtype=np.int64)[:, None] * num_blocks * block
    local = planes + rng.permutation(num_blocks)[None, :] * block  # [planes, num_blocks]
    remote = planes + rng.permutation(num_blocks)[None, :] * block
    return local.reshape(-1), remote.reshape(-1), np.full(local.size, block)


def time_case(
    ep: Endpoint, peer: int, local: int, remote: int, reads: tuple, repeats: int
) -> float:
    """Median seconds of one batched post -> wait of every READ of the case."""
    batch = make_xfers(local, reads[0], reads[2], remote, reads[1])
    times = []
    for _ in range(repeats + 1):  # the first run warms the socket windows
        start = time.perf_counter()
        ep.wait(ep.post(peer, "read", batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def time_sync_case(
    ep: Endpoint, peer: int, local: int, remote: int, reads: tuple, repeats: int
) -> float:
    """Median seconds of posting and waiting for each READ of the case in turn."""
    batch = make_xfers(local, reads[0], reads[2], remote, reads[1])  # [num_reads]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for i in range(batch.size):
            ep.wait(ep.post(peer, "read", batch[i:i + 1]))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(ep: Endpoint, peer: int, local: int, remote: int, shape: KVShape, tokens: int,
            mode: str, block: int | None, args: argparse.Namespace,
            rng: np.random.Generator) -> Result:
    """Times one case; a block_fixed_sync case over --sync-max-reads READs is extrapolated."""
    reads = case_reads(shape, tokens, mode.removesuffix("_sync"), block or 1, rng)
    total, num_reads = int(reads[2].sum()), int(reads[2].size)
    timed = None
    if mode != "block_fixed_sync":
        secs = time_case(ep, peer, local, remote, reads, args.repeats)
    else:
        if num_reads > args.sync_max_reads:
            timed = args.sync_max_reads
            reads = (reads[0][:timed], reads[1][:timed], reads[2][:timed])
        secs = time_sync_case(ep, peer, local, remote, reads, args.repeats)
        secs *= num_reads / (timed or num_reads)  # equal-sized READs: time scales with count
    return Result(shape.name, tokens, mode, block, num_reads, total, secs, total / secs / 1e9,
                  timed)


def run(args: argparse.Namespace) -> list[Result]:
    max_tokens = max(args.tokens) + max(args.block_sizes)
    nbytes = max(2 * m.num_layers * max_tokens * m.token_bytes() for m in MODELS)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child, nbytes))
    proc.start()
    results = []
    try:
        conn_id, desc = parent.recv()
        with Endpoint(timeout_ms=60_000) as ep:
            peer = ep.connect(conn_id)
            remote = ep.import_(peer, desc)
            local = ep.register(np.zeros(nbytes, dtype=np.uint8))
            rng = np.random.default_rng(0)
            cases = [("contiguous", None), ("per_layer", None)]
            for block in args.block_sizes:
                cases += [("block_fixed", block), ("block_fixed_sync", block)]
            for shape in MODELS:
                for tokens in args.tokens:
                    for mode, block in cases:
                        results.append(measure(ep, peer, local, remote, shape, tokens, mode,
                                               block, args, rng))
                        print(format_row(results[-1]), flush=True)
    finally:
        parent.send("stop")
        proc.join(30)
    return results


def format_row(r: Result) -> str:
    mode = r.mode if r.block_size is None else f"{r.mode}/{r.block_size}"
    approx = "" if r.extrapolated_from is None else "~"
    reads = f"{r.num_reads}" if r.extrapolated_from is None else (
        f"{r.num_reads} (timed {r.extrapolated_from})")
    return (
        f"| {r.model} | {r.tokens} | {mode} | {reads} | {r.bytes / 2**20:.1f} MiB "
        f"| {approx}{r.median_s * 1e3:.2f} ms | {approx}{r.gb_per_s:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sync-max-reads", type=int, default=8192,
                        help="block_fixed_sync: time at most this many READs, extrapolate")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    print("| model | tokens | mode | READs | bytes | median | GB/s |")
    print("|---|---|---|---|---|---|---|")
    results = run(args)
    if args.out:
        meta = {
            "command": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "cpus": mp.cpu_count(),
            "repeats": args.repeats,
            "sync_max_reads": args.sync_max_reads,
        }
        args.out.write_text(
            json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1)
        )


if __name__ == "__main__":
    main()
