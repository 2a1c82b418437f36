"""Pieces of tools/bench_gpu_handoff.py: KV geometry, data patterns, ranges, kernels, prefill side.

The prefill side runs in a spawned process on its own GPU (lifecycle of `PrefillSide`):
1. `prefill_main` creates an NcclTransport and sends its connection id up the pipe;
2. it answers one command per message: accept (the decode side's pair, for raw sends), setup
   (paged cache filled with a pattern, contiguous buffer, both registered and exported, one
   gather so the buffer is valid), stage (timed gather), raw / torch (timed sends), teardown;
3. quit: deregisters what is left and closes the transport.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pd_serve.kv.nccl import NcclConfig, NcclTransport  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
DTYPE = torch.bfloat16
ROW = KV_HEADS * HEAD_DIM  # elements of one token in one plane
TOKEN_BYTES = LAYERS * 2 * ROW * 2  # 128 KiB per token
TIMEOUT_S = 120.0

GatherFn = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], None]
ScatterFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]


@dataclass(frozen=True)
class Case:
    """One request shape: tokens, block size and the seed of its block tables."""

    tokens: int
    block_size: int
    seed: int = 0

    @property
    def blocks(self) -> int:
        return math.ceil(self.tokens / self.block_size)

    @property
    def cache_blocks(self) -> int:  # a quarter spare, so the request's blocks scatter
        return self.blocks + self.blocks // 4 + 1

    @property
    def elems(self) -> int:
        return LAYERS * 2 * self.tokens * ROW

    @property
    def nbytes(self) -> int:
        return self.elems * 2

    @property
    def block_elems(self) -> int:
        return self.block_size * ROW

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Random distinct block ids of the request on the prefill and on the decode side."""
        rng = np.random.default_rng(self.seed)
        src = rng.permutation(self.cache_blocks)[:self.blocks].astype(np.int32)  # [blocks]
        dst = rng.permutation(self.cache_blocks)[:self.blocks].astype(np.int32)  # [blocks]
        return src, dst

    def paged(self, device: str) -> torch.Tensor:
        shape = (LAYERS, 2, self.cache_blocks, self.block_size, KV_HEADS, HEAD_DIM)
        return torch.zeros(shape, dtype=DTYPE, device=device)  # [L, 2, NB, BS, KVH, D]


def device_name(index: int) -> str:
    """The torch device of GPU `index` (one place, so a CPU dry run can swap it)."""
    return f"cuda:{index}"


def pattern16(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """int16 bit patterns of finite positive bf16 values, a function of (index, seed) alone."""
    return ((idx * 2654435761 + seed * 40503) >> 9 & 0x3FFF).to(torch.int16)


def fill_pattern(kv: torch.Tensor, seed: int) -> None:
    """Writes pattern16 of each element's flat index into the paged cache, plane by plane."""
    planes = kv.view(torch.int16).view(LAYERS * 2, -1)  # [L * 2, NB * BS * KVH * D]
    idx = torch.arange(planes.shape[1], dtype=torch.int64, device=kv.device)
    for p in range(planes.shape[0]):
        planes[p] = pattern16(idx + p * planes.shape[1], seed)


def expected_block(case: Case, plane: int, block: int, device: str) -> torch.Tensor:
    """[BS * KVH * D] int16: what fill_pattern wrote into block `block` of plane `plane`."""
    start = (plane * case.cache_blocks + block) * case.block_elems
    idx = torch.arange(start, start + case.block_elems, dtype=torch.int64, device=device)
    return pattern16(idx, case.seed)


def layer_reads(case: Case) -> np.ndarray:
    """[L, 3] (local, remote, length): one range per layer of the contiguous buffer."""
    starts = np.arange(LAYERS, dtype=np.int64) * (case.nbytes // LAYERS)
    return np.stack([starts, starts, np.full_like(starts, case.nbytes // LAYERS)], axis=1)


def block_reads(case: Case) -> np.ndarray:
    """[L * 2 * blocks, 3]: one range per block per layer per K/V, paged cache to paged cache."""
    src, dst = case.tables()
    block_bytes = case.block_elems * 2
    plane = np.arange(LAYERS * 2, dtype=np.int64)[:, None] * case.cache_blocks  # [P, 1]
    local = (plane + dst.astype(np.int64)[None, :]) * block_bytes  # [P, blocks]
    remote = (plane + src.astype(np.int64)[None, :]) * block_bytes
    return np.stack([local.ravel(), remote.ravel(), np.full(local.size, block_bytes)], axis=1)


def torch_gather(kv: torch.Tensor, table: torch.Tensor, tokens: int, out: torch.Tensor) -> None:
    """Index-based gather ([L, 2, tokens, KVH, D] into out's first elements)."""
    blocks = kv[:, :, table.long()]  # [L, 2, blocks, BS, KVH, D]
    flat = blocks.reshape(LAYERS, 2, -1, KV_HEADS, HEAD_DIM)[:, :, :tokens]
    out.view(-1)[:LAYERS * 2 * tokens * ROW].view(LAYERS, 2, tokens, KV_HEADS, HEAD_DIM) \
        .copy_(flat)


def torch_scatter(src: torch.Tensor, kv: torch.Tensor, table: torch.Tensor, tokens: int) -> None:
    """Index-based scatter, the inverse of torch_gather (whole blocks are rewritten)."""
    ids = table.long()
    blocks = kv[:, :, ids]  # [L, 2, blocks, BS, KVH, D] copy
    flat = blocks.view(LAYERS, 2, -1, KV_HEADS, HEAD_DIM)
    flat[:, :, :tokens] = src.view(-1)[:LAYERS * 2 * tokens * ROW].view(
        LAYERS, 2, tokens, KV_HEADS, HEAD_DIM)
    kv[:, :, ids] = blocks


def load_kernels() -> tuple[GatherFn, ScatterFn, str, str | None]:
    """(gather, scatter, source, warning): pd_kernels if it imports (installed, or kernels/ of
    this checkout), else the index-based torch fallback with a warning."""
    try:
        import pd_kernels
    except ImportError:
        init = ROOT / "kernels" / "__init__.py"
        try:
            spec = importlib.util.spec_from_file_location(
                "pd_kernels", init, submodule_search_locations=[str(init.parent)])
            assert spec is not None and spec.loader is not None
            pd_kernels = importlib.util.module_from_spec(spec)
            sys.modules["pd_kernels"] = pd_kernels
            spec.loader.exec_module(pd_kernels)
        except Exception as exc:  # noqa: BLE001 - any failure means "use the fallback"
            sys.modules.pop("pd_kernels", None)
            return (torch_gather, torch_scatter, "torch index fallback",
                    f"WARNING: pd_kernels did not import ({exc}); gather/scatter are the "
                    f"index-based torch fallback, not the one-launch kernels")
    triton = pd_kernels.triton_available()
    source = "pd_kernels (triton)" if triton else "pd_kernels (torch reference: no triton)"
    warning = None if triton else "WARNING: pd_kernels runs its torch reference (no triton)"
    return pd_kernels.gather_kv, pd_kernels.scatter_kv, source, warning


class PrefillSide:
    """The prefill process's state (see the module docstring)."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.dev = device_name(device)
        self.gather = load_kernels()[0]
        self.transport = NcclTransport(NcclConfig(device=device))
        self.peer: Any = None
        self.case: Case | None = None
        self.kv = self.contig = self.table = torch.empty(0)
        self.handles: list[int] = []

    def op_accept(self) -> tuple[Any, ...]:
        self.peer = self.transport.accept_peer(TIMEOUT_S)
        return ("ok",)

    def op_setup(self, case: Case) -> tuple[Any, ...]:
        self.case = case
        self.kv = case.paged(self.dev)
        fill_pattern(self.kv, case.seed)
        self.table = torch.as_tensor(case.tables()[0], device=self.dev)  # [blocks] int32
        self.contig = torch.empty(case.elems, dtype=DTYPE, device=self.dev)  # [L*2*T*KVH*D]
        self.gather(self.kv, self.table, case.tokens, self.contig)
        torch.cuda.synchronize(self.device)
        self.handles = [self.transport.register(t) for t in (self.kv, self.contig)]
        return ("descs", *[self.transport.export(h) for h in self.handles])

    def op_stage(self) -> tuple[Any, ...]:
        assert self.case is not None
        t0 = time.perf_counter()
        self.gather(self.kv, self.table, self.case.tokens, self.contig)
        torch.cuda.synchronize(self.device)  # stage() returns with the bytes complete
        return ("t", t0, time.perf_counter())

    def op_raw(self) -> tuple[Any, ...]:
        t_post = time.perf_counter()
        self.transport.send_contiguous(self.peer, self.contig, TIMEOUT_S)
        return ("t", t_post)

    def op_torch(self) -> tuple[Any, ...]:
        t0 = time.perf_counter()
        blocks = self.kv[:, :, self.table.long()]  # [L, 2, blocks, BS, KVH, D]
        torch.cuda.synchronize(self.device)
        t1 = t_post = time.perf_counter()
        self.transport.send_contiguous(self.peer, blocks.view(-1), TIMEOUT_S)
        return ("t", t0, t1, t_post)

    def op_teardown(self) -> tuple[Any, ...]:
        while self.handles:
            self.transport.deregister(self.handles.pop())
        self.kv = self.contig = self.table = torch.empty(0)
        torch.cuda.empty_cache()
        return ("ok",)


def prefill_main(conn: Connection, device: int) -> None:
    """Entry point of the spawned prefill process."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(device)
    side = PrefillSide(device)
    conn.send(("conn_id", side.transport.conn_id()))
    try:
        while True:
            op, *args = conn.recv()
            if op == "quit":
                break
            try:
                conn.send(getattr(side, f"op_{op}")(*args))
            except Exception as exc:  # noqa: BLE001 - reported to the decode side
                conn.send(("error", f"{op}: {type(exc).__name__}: {exc}"))
    finally:
        side.op_teardown()
        side.transport.close()
        conn.send(("closed", side.transport.num_registered))
