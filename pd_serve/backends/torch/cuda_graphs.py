"""Decode steps on static buffers: one pinned host->device copy per step, CUDA graph replay.

Every decode step's inputs are packed on the host into one int32 array laid out as
`[token_ids B | positions B | slots B | context_lens B | block_tables B*MB]` for a bucket
(B rows, MB block-table columns), copied to the device in one transfer, and read through views.
Padding rows take token 0 at position 0 with context length 1, their table all scratch block, so
their K/V write goes to the scratch block and their outputs are discarded. Results land in
static output buffers (logits in the model dtype, argmax token ids).

Lifecycle:
1. `DecodeGraphs(...)` allocates the staging buffers (pinned on CUDA) and the outputs;
2. `capture()` (CUDA with graphs on) records one graph per (B, MB) bucket, largest first, all
   sharing one memory pool; each bucket is run once eagerly first so kernels compile and
   libraries initialise outside the capture;
3. `run(batch)` any number of times: pack, copy, replay the bucket's graph (or run the padded
   step eagerly: before capture, or on CPU; or unpadded: graphs off, or a batch larger than the
   largest bucket) and return output views;
4. the owner drops it; graphs and the pool go with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pd_serve.backends.base import DecodeBatch

StepFn = Callable[["DecodeInputs"], torch.Tensor]  # -> logits [B, vocab], model dtype


@dataclass(frozen=True)
class DecodeInputs:
    """Device views of one packed step (all int32)."""

    token_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [B]
    context_lens: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, MB]


@dataclass(frozen=True)
class Layout:
    block_size: int
    scratch_block: int  # index of the scratch block (= num_blocks)
    max_model_len: int
    vocab_size: int


def pack_rows(host: np.ndarray, batch: DecodeBatch, rows: int, cols: int, lay: Layout) -> None:
    """Writes `batch` padded to (rows, cols) into `host` (int32, the layout above); ValueError
    for tokens, positions or block tables the cache cannot serve. An empty batch packs rows
    of padding only (graph capture)."""
    n, bs = len(batch.token_ids), lay.block_size
    view = host[:rows * (4 + cols)]
    tok, pos, slot, ctx = (view[i * rows:(i + 1) * rows] for i in range(4))
    tab = view[4 * rows:].reshape(rows, cols)
    tab.fill(lay.scratch_block)
    tok[n:], pos[n:], ctx[n:], slot[n:] = 0, 0, 1, lay.scratch_block * bs
    if n == 0:
        return
    p = np.asarray(batch.positions, dtype=np.int64)
    t = np.asarray(batch.token_ids, dtype=np.int64)
    if p.min() < 0 or p.max() >= lay.max_model_len:
        raise ValueError(f"decode positions must lie in [0, {lay.max_model_len}) "
                         f"(max_model_len), got {p.min()}..{p.max()}")
    if t.min() < 0 or t.max() >= lay.vocab_size:
        raise ValueError(f"token ids must lie in [0, {lay.vocab_size})")
    used = p // bs + 1  # [n] blocks holding each row's context
    for i, table in enumerate(batch.block_tables):
        if len(table) < used[i]:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {p[i] + 1} tokens")
        tab[i, :used[i]] = table[:used[i]]
    real = tab[:n][np.arange(cols)[None] < used[:, None]]
    if real.min() < 0 or real.max() >= lay.scratch_block:
        raise ValueError(f"block tables have ids outside [0, {lay.scratch_block})")
    tok[:n], pos[:n], ctx[:n] = t, p, p + 1
    slot[:n] = tab[np.arange(n), p // bs] * bs + p % bs


class Staging:
    """A host int32 buffer (pinned on CUDA) and its device twin, in the layout above."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.host = torch.empty(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.dev = torch.empty(size, dtype=torch.int32, device=device)  # [size]

    def upload(self, batch: DecodeBatch, rows: int, cols: int, lay: Layout) -> DecodeInputs:
        size = rows * (4 + cols)
        pack_rows(self.host.numpy(), batch, rows, cols, lay)
        self.dev[:size].copy_(self.host[:size], non_blocking=True)
        d = self.dev
        return DecodeInputs(d[:rows], d[rows:2 * rows], d[2 * rows:3 * rows],
                            d[3 * rows:4 * rows], d[4 * rows:size].view(rows, cols))


class DecodeGraphs:
    """Static-buffer decode: bucket choice, packing, graph capture and replay."""

    def __init__(self, step: StepFn, lay: Layout, batch_sizes: tuple[int, ...],
                 block_buckets: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                 use_graphs: bool) -> None:
        self.step, self.lay, self.device = step, lay, device
        self.batch_sizes, self.block_buckets = batch_sizes, block_buckets
        # Graphs pad every step to its bucket; on CPU the padded step runs eagerly (tests).
        self.padded = use_graphs
        self.use_graphs = use_graphs and device.type == "cuda"
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool: Any = None  # the graphs' shared memory pool (torch.cuda._POOL_HANDLE)
        rows, cols = batch_sizes[-1], block_buckets[-1]
        self._staging = Staging(rows * (4 + cols), device)
        self.out_logits = torch.empty(rows, lay.vocab_size, dtype=dtype, device=device)
        self.out_ids = torch.empty(rows, dtype=torch.int64, device=device)  # [rows]

    def bucket(self, n: int, need_blocks: int) -> tuple[int, int] | None:
        """The captured (B, MB) bucket for n rows needing `need_blocks` columns, or None."""
        rows = next((b for b in self.batch_sizes if b >= n), None)
        cols = next((c for c in self.block_buckets if c >= need_blocks), None)
        return None if rows is None or cols is None else (rows, cols)

    def capture(self) -> int:
        """Records every bucket's graph (no-op without graphs); returns how many are new."""
        if not self.use_graphs:
            return 0
        before = len(self.graphs)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        empty = DecodeBatch([], [], [])
        for cols in reversed(self.block_buckets):
            for rows in reversed(self.batch_sizes):
                if (rows, cols) in self.graphs:
                    continue
                inputs = self._staging.upload(empty, rows, cols, self.lay)
                self._body(inputs, self.out_ids, self.out_logits)  # compile, init libraries
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._body(inputs, self.out_ids, self.out_logits)
                self.graphs[rows, cols] = graph
        torch.cuda.synchronize(self.device)
        return len(self.graphs) - before

    def run(self, batch: DecodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs one step; returns device views (token ids [n] int64, logits [n, vocab])."""
        n = len(batch.token_ids)
        need = max(p // self.lay.block_size + 1 for p in batch.positions)
        key = self.bucket(n, need) if self.padded else None
        if key is not None:
            inputs = self._staging.upload(batch, key[0], key[1], self.lay)
            graph = self.graphs.get(key)
            if graph is not None:
                graph.replay()
            else:  # not captured (yet), or CPU: the same padded step, eagerly
                self._body(inputs, self.out_ids, self.out_logits)
            return self.out_ids[:n], self.out_logits[:n]
        if n > self.out_ids.shape[0] or n * (4 + need) > self._staging.host.numel():
            # Larger than any bucket: private buffers, so captured graphs keep theirs.
            staging = Staging(n * (4 + need), self.device)
            ids = torch.empty(n, dtype=torch.int64, device=self.device)  # [n]
            logits = torch.empty(n, self.lay.vocab_size, dtype=self.out_logits.dtype,
                                 device=self.device)  # [n, vocab]
        else:
            staging, ids, logits = self._staging, self.out_ids, self.out_logits
        self._body(staging.upload(batch, n, need, self.lay), ids, logits)
        return ids[:n], logits[:n]

    def _body(self, inputs: DecodeInputs, ids: torch.Tensor, logits: torch.Tensor) -> None:
        rows = inputs.token_ids.shape[0]
        out = self.step(inputs)  # [rows, vocab]
        logits[:rows].copy_(out)
        ids[:rows].copy_(out.argmax(-1))
