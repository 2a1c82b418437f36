"""The decode side of tools/bench_gpu_handoff.py: this process, its GPU, one timed run per call.

Lifecycle of a `DecodeSide`:
1. constructed: an NcclTransport on its device; reads the prefill's connection id from the
   pipe, connects (the prefill side accepts the same pair for its raw sends);
2. `setup(case)`: the prefill side fills and registers its paged cache and contiguous buffer;
   this side allocates and registers its own, imports the prefill's descriptors;
3. `run(method)` times one hand-off (seconds, see the benchmark's docstring); `clear(method)`
   zeroes what the method writes, before the repetition that is verified;
4. `teardown()` per case, then `close()`, which reports what was left registered.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

import bench_gpu_handoff_lib as lib
import numpy as np
import torch
from bench_gpu_handoff_lib import (
    DTYPE,
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    TIMEOUT_S,
    Case,
    block_reads,
    layer_reads,
    load_kernels,
)

from pd_serve.kv.nccl import NcclConfig, NcclTransport

now = time.perf_counter  # CLOCK_MONOTONIC on Linux: the same clock in both processes


class DecodeSide:
    """Decode side of the benchmark (see the module docstring)."""

    def __init__(self, conn: Connection, device: int) -> None:
        self.conn, self.device, self.dev = conn, device, lib.device_name(device)
        torch.cuda.set_device(device)
        _, self.scatter, _, _ = load_kernels()
        self.transport = NcclTransport(NcclConfig(device=device))
        tag, self.conn_id = conn.recv()
        assert tag == "conn_id", tag
        self.peer: Any = None
        self.case = Case(1, 1)
        self.kv = self.contig = self.table = torch.empty(0)
        self.handles: dict[str, int] = {}
        self.remote: dict[str, Any] = {}
        self.reads: dict[str, np.ndarray] = {}
        self.reconnect()

    def _reply(self) -> tuple[Any, ...]:
        reply = self.conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"prefill side: {reply[1]}")
        return tuple(reply)

    def ask(self, *msg: Any) -> tuple[Any, ...]:
        self.conn.send(msg)
        return self._reply()

    def reconnect(self) -> None:
        """After a failure: drops replies still in the pipe, then makes a fresh pair unless the
        current one is alive (a failed read drops its pair)."""
        while self.conn.poll(1.0):
            self.conn.recv()
        if self.peer is not None and self.peer.dead is None:
            return
        self.peer = self.transport.connect(self.conn_id, TIMEOUT_S)
        self.ask("accept")

    def setup(self, case: Case) -> None:
        _, kv_desc, contig_desc = self.ask("setup", case)
        self.case = case
        self.kv = case.paged(self.dev)  # [L, 2, NB, BS, KVH, D]
        self.contig = torch.zeros(case.elems, dtype=DTYPE, device=self.dev)  # [L*2*T*KVH*D]
        self.table = torch.as_tensor(case.tables()[1], device=self.dev)  # [blocks] int32
        self.handles = {"kv": self.transport.register(self.kv),
                        "contig": self.transport.register(self.contig)}
        self.remote = {"kv": self.transport.import_(self.peer, kv_desc),
                       "contig": self.transport.import_(self.peer, contig_desc)}
        self.reads = {"bulk": np.array([[0, 0, case.nbytes]], dtype=np.int64),
                      "per_layer": layer_reads(case), "block": block_reads(case)}

    def clear(self, method: str) -> None:
        (self.contig if method in ("raw", "ours_read_only") else self.kv).zero_()
        torch.cuda.synchronize(self.device)

    def run(self, method: str) -> dict[str, float]:
        result: dict[str, float] = getattr(self, f"_{method}")()
        return result

    def _raw(self) -> dict[str, float]:
        self.conn.send(("raw",))
        t_post = now()
        self.transport.recv_contiguous(self.peer, self.contig, TIMEOUT_S)
        t_end = now()
        t_sent = self._reply()[1]
        return {"e2e": t_end - max(t_sent, t_post)}

    def _ours(self, reads: np.ndarray, gather_scatter: bool) -> dict[str, float]:
        gather = 0.0
        if gather_scatter:
            _, t0, t1 = self.ask("stage")
            gather = t1 - t0
        t2 = now()
        self.transport.read_batch(self.peer, self.handles["contig"], self.remote["contig"],
                                  reads, TIMEOUT_S)
        t3 = now()
        if gather_scatter:
            self.scatter(self.contig, self.kv, self.table, self.case.tokens)
            torch.cuda.synchronize(self.device)
        t4 = now()
        return {"e2e": gather + t4 - t2, "gather": gather, "transfer": t3 - t2,
                "scatter": t4 - t3}

    def _ours_bulk(self) -> dict[str, float]:
        return self._ours(self.reads["bulk"], True)

    def _ours_per_layer(self) -> dict[str, float]:
        return self._ours(self.reads["per_layer"], True)

    def _ours_read_only(self) -> dict[str, float]:
        return self._ours(self.reads["bulk"], False)

    def _block_fixed(self) -> dict[str, float]:
        t2 = now()
        self.transport.read_batch(self.peer, self.handles["kv"], self.remote["kv"],
                                  self.reads["block"], TIMEOUT_S)
        return {"e2e": now() - t2}

    def _torch(self) -> dict[str, float]:
        self.conn.send(("torch",))
        t_post = now()
        self.transport.recv_contiguous(self.peer, self.contig, TIMEOUT_S)
        t3 = now()
        case = self.case
        blocks = self.contig.view(LAYERS, 2, case.blocks, case.block_size, KV_HEADS, HEAD_DIM)
        self.kv[:, :, self.table.long()] = blocks
        torch.cuda.synchronize(self.device)
        t4 = now()
        _, t0, t1, t_sent = self._reply()
        start = max(t_sent, t_post)
        return {"e2e": (t1 - t0) + (t4 - start), "gather": t1 - t0, "transfer": t3 - start,
                "scatter": t4 - t3}

    def teardown(self) -> None:
        for handle in self.handles.values():
            self.transport.deregister(handle)
        self.handles, self.remote = {}, {}
        self.kv = self.contig = self.table = torch.empty(0)
        torch.cuda.empty_cache()
        self.ask("teardown")

    def close(self) -> dict[str, Any]:
        """Tears down, stops the prefill process and closes; what was left (leak check)."""
        if self.handles:
            self.teardown()
        while self.conn.poll(0.1):
            self.conn.recv()
        self.conn.send(("quit",))
        left: dict[str, Any] = {"prefill_registered": int(self.conn.recv()[1]),
                "decode_registered": self.transport.num_registered}
        self.transport.close()
        left["decode_pairs"] = self.transport.num_peers
        return left
