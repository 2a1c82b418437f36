"""MindSporeRunner: the MindSpore implementation of ModelRunner (CPU here, Ascend in production).

Device: `cpu` runs the generic attention formulation; `ascend` runs Ascend's fused kernels
(ReshapeAndCache, FlashAttentionScore, PagedAttention) where dtype and head size allow, chosen
once by `attention.select_attention`, which also fails clearly on a machine without Ascend.

Shapes: MindSpore compiles one graph per distinct input shape. We pad every batch up to a
(B, T, C) bucket (B a power of two; T >= 16 for prefill and 1 for decode; C >= max(16,
block_size); T and C powers of two up to 256, then quarter-octave steps 320, 384, 448, 512,
640, ...; see `inputs.shape_bucket`) rather than compiling with dynamic shapes, because static
shapes let the compiler fix memory and fuse kernels (on Ascend, whole-graph sinking needs them),
dynamic-shape kernels for ScatterUpdate/Gather are slower or missing on some targets, and the
padding waste stays under 20% above 256 tokens. The number of graphs stays logarithmic in length
(prefill and decode are separate graphs since their T differs); `warmup()` compiles the
common buckets up front and `compiled_shapes` records every bucket seen.

Lifecycle: 1. the constructor configures the process once (device, host threads), loads
weights and zeroes the KV cache; 2. `warmup()` optionally compiles buckets; 3. `prefill` /
`decode` / `read_kv` / `write_kv` / `prefill_importance` (eager, `importance.py`) any number
of times; 4. `close()` drops the cells.
"""

from __future__ import annotations

import logging
import os

import mindspore as ms
import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype

from pd_serve.backends.base import DecodeBatch, ModelRunner, PrefillBatch, RunnerConfig
from pd_serve.backends.inputs import (
    PackedBatch,
    next_bucket,
    pack_decode,
    pack_prefill,
    shape_bucket,
)
from pd_serve.backends.mindspore.attention import ASCEND_FUSED, select_attention
from pd_serve.backends.mindspore.importance import prompt_importance
from pd_serve.backends.mindspore.model import CacheSpec, DecoderModel
from pd_serve.models.checkpoint import load_weights
from pd_serve.models.config import ModelConfig
from pd_serve.models.rope import cos_sin_table

DEVICE_TARGETS = {"cpu": "CPU", "ascend": "Ascend"}  # the one place the device choice lives
DTYPES = {"float32": mstype.float32, "bfloat16": mstype.bfloat16, "float16": mstype.float16}
MIN_PREFILL_T = 16
MIN_CONTEXT = 16

logger = logging.getLogger(__name__)
_process: dict[str, object] = {}  # device and threads are process-wide in MindSpore, set once


def configure_process(device: str, threads: int | None) -> None:
    """Selects the device target and CPU kernel threads; MindSpore allows each only once per
    process, so a later runner must ask for the same device (threads: the first one wins)."""
    if device not in DEVICE_TARGETS:
        raise ValueError(f"device must be one of {sorted(DEVICE_TARGETS)} for mindspore, "
                         f"got {device!r}")
    if threads is not None and threads <= 0:
        raise ValueError(f"threads must be positive, got {threads}")
    if _process:
        if _process["device"] != device:
            raise ValueError(f"device is already {_process['device']!r} in this process; "
                             f"MindSpore cannot switch to {device!r}")
        if threads is not None and _process["threads"] != threads:
            logger.warning("threads=%s ignored: MindSpore threads are already %s in this process",
                           threads, _process["threads"])
        return
    ms.set_device(DEVICE_TARGETS[device])
    if device == "cpu":
        # CPU kernel threads: MindSpore's default is 25 whatever the host has, which
        # oversubscribes small hosts (decode at batch 1 took 13.2 ms with 25 threads and 8.5 ms
        # with 2 on a 2-core host, docs/benchmarks.md), so default to the cores we may use.
        # The runtime's dispatch threads stay at their default:
        # ms.runtime.dispatch_threads_num(2) made decode steps ~50x slower on a 2-core host.
        ms.device_context.cpu.op_tuning.threads_num(threads or len(os.sched_getaffinity(0)))
    _process.update(device=device, threads=threads)


class MindSporeRunner(ModelRunner):
    """Prefill and decode through one jit-compiled DecoderModel, one graph per shape bucket."""

    def __init__(self, cfg: RunnerConfig) -> None:
        self.model_config = ModelConfig.from_dir(cfg.model_dir)
        # before the device is touched: on a machine without Ascend this names what is missing
        self.attention = select_attention(cfg.device, cfg.dtype, self.model_config.head_dim)
        logger.info("mindspore attention: %s (%s)", self.attention.kind, self.attention.reason)
        configure_process(cfg.device, cfg.threads)
        self.block_size, self.num_blocks = cfg.block_size, cfg.num_blocks
        self.scratch_slot = cfg.num_blocks * cfg.block_size
        self.max_model_len = cfg.max_model_len or self.model_config.max_position_embeddings
        # CPU kernels run float32; half precision is for Ascend.
        dtype = DTYPES[cfg.dtype] if cfg.device != "cpu" else mstype.float32
        mc = self.model_config
        tables = cos_sin_table(mc.rope, mc.head_dim, self.max_model_len)
        weights = load_weights(cfg.model_dir, mc)
        cache = CacheSpec(self.attention.kind, cfg.num_blocks + 1, cfg.block_size)
        self.model = DecoderModel(mc, weights, cache, tables, dtype)
        self.model.set_train(False)
        self._forward = ms.jit(self.model.construct)
        self.compiled_shapes: set[tuple[int, ...]] = set()  # (B, T, C, rows) buckets run so far

    def prefill(self, batch: PrefillBatch) -> np.ndarray | list[np.ndarray]:
        n = len(batch.seqs)
        if n == 0 or any(not s.token_ids for s in batch.seqs):
            raise ValueError("prefill needs at least one sequence and one token per sequence")
        t_max = max(len(s.token_ids) for s in batch.seqs)
        c_max = max(s.start_pos + len(s.token_ids) for s in batch.seqs)
        t = shape_bucket(t_max, MIN_PREFILL_T)
        packed = pack_prefill(batch, self.block_size, self.scratch_slot,
                              pad_to=(next_bucket(n), t, self._context_bucket(max(c_max, t))))
        if batch.return_all_logits:
            rows = np.arange(packed.token_ids.size, dtype=np.int32)  # [B * T]
            logits = self._run(packed, rows).reshape(packed.token_ids.shape + (-1,))
            return [logits[i, :len(s.token_ids)] for i, s in enumerate(batch.seqs)]
        return self._run(packed, self._last_rows(packed))[:n]

    supports_importance = True

    def prefill_importance(self, batch: PrefillBatch, last_q: int) -> list[np.ndarray]:
        return [prompt_importance(self.model, s, self._slots(s.block_table, len(s.token_ids)),
                                  last_q) for s in batch.seqs]

    def decode(self, batch: DecodeBatch) -> np.ndarray:
        n = len(batch.token_ids)  # pack_decode checks the batch's lengths agree
        c_max = max(batch.positions, default=-1) + 1
        packed = pack_decode(batch, self.block_size, self.scratch_slot,
                             pad_to=(next_bucket(n), 1, self._context_bucket(c_max)))
        return self._run(packed, self._last_rows(packed))[:n]

    def warmup(self, batch_sizes: tuple[int, ...] = (1,), prefill_lens: tuple[int, ...] = (16, 64),
               decode_contexts: tuple[int, ...] = (64, 128)) -> int:
        """Compiles prefill (batch 1) and decode buckets by running them on scratch slots only;
        returns how many new graphs were compiled."""
        before = len(self.compiled_shapes)
        for t in prefill_lens:
            self._run_scratch(1, shape_bucket(t, MIN_PREFILL_T), self._context_bucket(t))
        for b in batch_sizes:
            for c in decode_contexts:
                self._run_scratch(next_bucket(b), 1, self._context_bucket(c))
        return len(self.compiled_shapes) - before

    def read_kv(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        slots = Tensor(self._slots(block_table, num_tokens), mstype.int32)
        out = [[kv.asnumpy().astype(np.float32) for kv in layer.attn.kernel.read(slots)]
               for layer in self.model.layers]
        return np.asarray(out)  # [num_layers, 2, num_tokens, num_kv_heads, head_dim]

    def write_kv(self, block_table: list[int], kv: np.ndarray) -> None:
        mc = self.model_config
        num_tokens = kv.shape[2] if kv.ndim == 5 else -1
        expected = (mc.num_layers, 2, num_tokens, mc.num_kv_heads, mc.head_dim)
        if kv.shape != expected:
            raise ValueError(f"kv has shape {kv.shape}, expected {expected}")
        slots = Tensor(self._slots(block_table, num_tokens), mstype.int32)
        for layer, layer_kv in zip(self.model.layers, kv):
            layer.attn.kernel.write(slots, layer_kv[0], layer_kv[1])

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._forward = None

    def _context_bucket(self, c: int) -> int:
        return shape_bucket(c, max(MIN_CONTEXT, self.block_size))

    def _slots(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        if any(not 0 <= b < self.num_blocks for b in block_table):
            raise ValueError(f"block table {block_table} has ids outside 0..{self.num_blocks - 1}")
        if len(block_table) * self.block_size < num_tokens:
            raise ValueError(f"block table of {len(block_table)} blocks cannot hold "
                             f"{num_tokens} tokens")
        pos = np.arange(num_tokens)
        table = np.asarray(block_table, np.int64)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).astype(
            np.int32)  # [num_tokens]

    @staticmethod
    def _last_rows(packed: PackedBatch) -> np.ndarray:
        b, t = packed.token_ids.shape
        return (np.arange(b) * t + np.maximum(packed.query_lens - 1, 0)).astype(np.int32)  # [B]

    def _run_scratch(self, b: int, t: int, c: int) -> None:
        scratch = np.full((b, t), self.scratch_slot, np.int32)
        zeros = np.zeros((b, t), np.int32)
        packed = PackedBatch(zeros, zeros, scratch, np.full((b, c), self.scratch_slot, np.int32),
                             np.zeros(b, np.int32), np.zeros(b, np.int32), 0)
        self._run(packed, self._last_rows(packed))

    def _run(self, packed: PackedBatch, rows: np.ndarray) -> np.ndarray:
        """Runs one padded batch; returns float32 logits [len(rows), vocab]."""
        if packed.context_lens.max(initial=0) > self.max_model_len:
            raise ValueError(f"context of {packed.context_lens.max()} tokens exceeds "
                             f"max_model_len {self.max_model_len}")
        # block ids come from the engine's block manager: a bad one is a bug, not user input
        assert packed.slot_mapping.min() >= 0 and packed.context_slots.max() <= self.scratch_slot
        b, t = packed.token_ids.shape
        self.compiled_shapes.add((b, t, packed.context_slots.shape[1], len(rows)))
        inputs = [packed.token_ids, packed.positions, packed.slot_mapping, packed.context_slots,
                  packed.context_lens, rows]
        if self.attention.kind == ASCEND_FUSED:
            from pd_serve.backends.mindspore.ascend_ops import fused_step_inputs

            block_tables, inputs[4] = fused_step_inputs(packed, self.block_size)
            inputs.append(block_tables)
        return self._forward(*[Tensor(a) for a in inputs]).asnumpy()
