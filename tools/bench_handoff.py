"""Benchmarks the KV hand-off end to end as the instances do it: stage, transfer, RecvScatter.

Two processes over loopback, as in a deployment (each instance owns one cann_ext endpoint in
its own process): a spawned "prefill" process holds a runner, a CannExtTransport and a
KVSender; this process is the "decode" side with its own runner, CannExtTransport and
KVReceiver. Per block size both runners are built with that block size; per prompt length
the prefill side prefills a random prompt into shuffled blocks of its paged cache; then per
hand-off mode (bulk | per_layer | block_fixed) and repeat it times separately
  stage     KVSender.stage (runner.read_kv into the slot buffer + per-layer crc32), prefill side;
  transfer  KVReceiver.read (the READs over the host TCP transport + crc32 verification);
  scatter   runner.write_kv of the received KV into shuffled reserved blocks (RecvScatter).
`crc` is the time of the per-layer crc32 alone over the received bytes (part of both stage and
transfer). The first round of every case is a warm-up, not timed; after it the decode cache's
KV (runner.read_kv) is compared with the source KV array once. The instances read on a worker
thread and scatter on the engine thread; here both run in turn on the main thread.

    python tools/bench_handoff.py [--backend torch|mindspore] [--tokens 512 2048] \
        [--block-sizes 16 128] [--repeats 5] [--out x.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pd_serve.backends import create_runner  # noqa: E402
from pd_serve.backends.base import PrefillBatch, RunnerConfig, SeqChunk  # noqa: E402
from pd_serve.kv.layout import KVLayout  # noqa: E402
from pd_serve.kv.messages import HandoffSource  # noqa: E402
from pd_serve.kv.receiver import MODES, KVReceiver  # noqa: E402
from pd_serve.kv.sender import KVSender, layer_checksums  # noqa: E402
from pd_serve.kv.transport import CannExtTransport  # noqa: E402


def runner_config(args: argparse.Namespace, block_size: int) -> RunnerConfig:
    """Both sides' runner: room for the longest prompt plus one spare block."""
    num_blocks = -(-max(args.tokens) // block_size) + 1
    return RunnerConfig(model_dir=args.model, backend=args.backend, device="cpu",
                        block_size=block_size, num_blocks=num_blocks, threads=args.threads)


class PrefillSide:
    """The prefill process's state: runner, transport, one-slot sender, the parked request."""

    def __init__(self, args: argparse.Namespace, block_size: int) -> None:
        self.runner = create_runner(runner_config(args, block_size))
        self.transport = CannExtTransport("127.0.0.1:0")
        layout = KVLayout.for_model(self.runner.model_config, max(args.tokens))
        self.sender = KVSender(self.transport, layout, num_slots=1)
        self.table: list[int] = []
        self.num_tokens = 0

    def prefill(self, num_tokens: int, seed: int) -> np.ndarray:
        """Prefills a random prompt into shuffled blocks; returns its KV (the source)."""
        rng = np.random.default_rng(seed)
        need = -(-num_tokens // self.runner.block_size)
        self.table = rng.permutation(self.runner.num_blocks)[:need].tolist()
        self.num_tokens = num_tokens
        prompt = rng.integers(1, self.runner.model_config.vocab_size, num_tokens).tolist()
        self.runner.prefill(PrefillBatch([SeqChunk(prompt, 0, self.table)]))
        return self.runner.read_kv(self.table, num_tokens)

    def stage(self) -> tuple[dict[str, Any], float]:
        start = time.perf_counter()
        source = self.sender.stage(0, self.runner, self.table, self.num_tokens, "bench")
        return source.to_dict(), time.perf_counter() - start

    def close(self) -> None:
        self.sender.leak_check()
        self.sender.close()
        leaked = self.transport.num_registered
        self.transport.close()
        self.runner.close()
        if leaked:
            raise AssertionError(f"prefill transport still holds {leaked} registrations")


def prefill_main(conn: Any, args: argparse.Namespace, block_size: int) -> None:
    """The spawned prefill process: answers ("prefill", n, seed), ("stage",), ("release",),
    ("stop",) until stopped."""
    side = PrefillSide(args, block_size)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] == "prefill":
            conn.send(side.prefill(cmd[1], cmd[2]))
        elif cmd[0] == "stage":
            conn.send(side.stage())
        elif cmd[0] == "release":
            side.sender.release(0)
            conn.send("ok")
        else:
            side.close()
            conn.send("closed")
            return


def ask(conn: Any, *cmd: Any) -> Any:
    conn.send(cmd)
    return conn.recv()


def one_handoff(conn: Any, receiver: KVReceiver, runner: Any, table: list[int],
                mode: str) -> tuple[dict[str, float], np.ndarray]:
    """stage -> read -> write_kv -> release; returns seconds per phase and the received KV."""
    source_dict, stage_s = ask(conn, "stage")
    source = HandoffSource.from_dict(source_dict)
    start = time.perf_counter()
    kv = receiver.read(source, table, mode)  # type: ignore[arg-type]
    transfer_s = time.perf_counter() - start
    start = time.perf_counter()
    runner.write_kv(table, kv)
    scatter_s = time.perf_counter() - start
    start = time.perf_counter()
    layer_checksums(source.layout, kv.reshape(-1).view(np.uint8))
    crc_s = time.perf_counter() - start
    ask(conn, "release")
    return {"stage": stage_s, "transfer": transfer_s, "scatter": scatter_s, "crc": crc_s}, kv


def run_case(conn: Any, receiver: KVReceiver, runner: Any, table: list[int],
             src: np.ndarray, mode: str, repeats: int) -> dict[str, Any]:
    """One warm-up hand-off (then the array check), `repeats` timed; medians in ms."""
    one_handoff(conn, receiver, runner, table, mode)
    if not np.array_equal(runner.read_kv(table, src.shape[2]), src):
        raise AssertionError(f"{mode}: the decode cache's KV differs from the source")
    rounds = [one_handoff(conn, receiver, runner, table, mode)[0] for _ in range(repeats)]
    out = {f"{k}_ms": 1e3 * statistics.median(r[k] for r in rounds) for k in rounds[0]}
    out["total_ms"] = 1e3 * statistics.median(
        r["stage"] + r["transfer"] + r["scatter"] for r in rounds)
    out["num_reads"] = receiver.last_num_reads
    out["bytes"] = int(src.nbytes)
    out["transfer_gb_per_s"] = src.nbytes / out["transfer_ms"] / 1e6
    return out


def run_block_size(args: argparse.Namespace, block_size: int) -> list[dict[str, Any]]:
    """Starts the prefill process and the decode side for one block size, runs every case."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=prefill_main, args=(child, args, block_size))
    proc.start()
    runner = create_runner(runner_config(args, block_size))
    transport = CannExtTransport("127.0.0.1:0")
    layout = KVLayout.for_model(runner.model_config, max(args.tokens))
    receiver = KVReceiver(transport, layout, block_size)
    results = []
    try:
        if conn.recv() != "ready":
            raise RuntimeError("the prefill process did not start")
        rng = np.random.default_rng(1)
        for tokens in args.tokens:
            src = ask(conn, "prefill", tokens, tokens)  # [layers, 2, tokens, heads, dim]
            need = -(-tokens // block_size)
            table = rng.permutation(runner.num_blocks)[:need].tolist()  # decode's reservation
            for mode in args.modes:
                row = {"backend": args.backend, "tokens": tokens, "block_size": block_size,
                       "mode": mode}
                row |= run_case(conn, receiver, runner, table, src, mode, args.repeats)
                print(format_row(row), flush=True)
                results.append(row)
        if ask(conn, "stop") != "closed":
            raise RuntimeError("the prefill process did not close cleanly")
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
        receiver.close()
        leaked = transport.num_registered
        transport.close()
        runner.close()
    if leaked:
        raise AssertionError(f"decode transport still holds {leaked} registrations")
    return results


HEADER = ("| backend | tokens | block | mode | READs | MiB | stage ms | transfer ms | scatter ms "
          "| total ms | transfer GB/s | crc ms |\n" + "|---" * 12 + "|")


def format_row(r: dict[str, Any]) -> str:
    return (f"| {r['backend']} | {r['tokens']} | {r['block_size']} | {r['mode']} "
            f"| {r['num_reads']} | {r['bytes'] / 2**20:.1f} | {r['stage_ms']:.2f} "
            f"| {r['transfer_ms']:.2f} | {r['scatter_ms']:.2f} | {r['total_ms']:.2f} "
            f"| {r['transfer_gb_per_s']:.2f} | {r['crc_ms']:.2f} |")


def meta(args: argparse.Namespace) -> dict[str, Any]:
    from pd_serve.kv import cann_ext

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    versions: dict[str, Any] = {"numpy": np.__version__, "cann_ext": cann_ext.version()}
    versions[args.backend] = __import__(args.backend).__version__
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"],
                            cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "versions": versions, "git_commit": commit, "repeats": args.repeats,
            "processes": "prefill side in a spawned process, decode side in the parent; "
                         "one CannExtTransport each, over 127.0.0.1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/shakespeare-llama"))
    parser.add_argument("--backend", default="torch", choices=["torch", "mindspore"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="runner host threads")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    print(HEADER)
    results = [row for b in args.block_sizes for row in run_block_size(args, b)]
    if args.out:
        args.out.write_text(json.dumps({"meta": meta(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
