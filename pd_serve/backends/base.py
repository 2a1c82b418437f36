"""The ModelRunner interface every backend implements, and the batch types it consumes.

A runner owns the model weights and the paged KV cache of one instance. The engine owns the
block tables (which block holds which tokens); the runner only reads and writes the slots it is
told to. Caller: the engine loop, on one thread per instance. All calls block until done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pd_serve.models.config import ModelConfig


@dataclass(frozen=True)
class RunnerConfig:
    """What a runner needs to start: checkpoint, framework, device and KV cache size."""

    model_dir: str
    backend: str = "mindspore"
    device: str = "cpu"  # torch: cpu | cuda | cuda:N; mindspore: cpu | ascend
    dtype: str = "float32"  # float32 | bfloat16 | float16 (CPU runs float32)
    block_size: int = 16
    num_blocks: int = 512
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    threads: int | None = None  # host threads for CPU execution (None: the cores available)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class SeqChunk:
    """One sequence's share of a prefill batch.

    `token_ids` are computed now at positions `start_pos .. start_pos + len - 1`; the first
    `start_pos` tokens are already in the KV cache (prefix-cache hit or an earlier chunk).
    `block_table` lists the blocks that hold positions 0 .. start_pos + len - 1, in order.
    """

    token_ids: list[int]
    start_pos: int
    block_table: list[int]


@dataclass
class PrefillBatch:
    seqs: list[SeqChunk]
    return_all_logits: bool = False  # tests: logits for every new token, not just the last


@dataclass
class DecodeBatch:
    """One new token per sequence at `positions[i]` (= tokens already cached for it)."""

    token_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]] = field(default_factory=list)


class ModelRunner(ABC):
    """Runs prefill and decode over a paged KV cache.

    Lifecycle: 1. constructed from a RunnerConfig (loads weights, allocates the cache of
    `num_blocks` blocks plus one scratch block for padding writes); 2. `prefill` / `decode` any
    number of times; 3. `close` releases device memory. The runner never frees blocks: the
    engine's block manager decides which blocks are in use.
    """

    model_config: ModelConfig
    block_size: int
    num_blocks: int
    max_model_len: int  # positions the runner's rope table and checks cover

    @abstractmethod
    def prefill(self, batch: PrefillBatch) -> np.ndarray | list[np.ndarray]:
        """Writes K/V of the new tokens into their slots and returns float32 logits of each
        sequence's last token, [num_seqs, vocab] (with `return_all_logits`: a list of
        [len(token_ids), vocab] arrays)."""

    @abstractmethod
    def decode(self, batch: DecodeBatch) -> np.ndarray:
        """Writes K/V of one token per sequence and returns float32 logits [num_seqs, vocab]."""

    def prefill_argmax(self, batch: PrefillBatch) -> np.ndarray:
        """Greedy tokens [num_seqs] int64: the argmax of each sequence's last-token logits
        (`prefill`'s result). Accelerator runners override this to pick on the device and copy
        back only the token ids; ties go to the lowest id, as `np.argmax`."""
        logits = self.prefill(PrefillBatch(batch.seqs))
        return np.asarray(logits).argmax(-1).astype(np.int64)

    def decode_argmax(self, batch: DecodeBatch) -> np.ndarray:
        """Greedy tokens [num_seqs] int64 of one decode step (see `prefill_argmax`)."""
        return np.asarray(self.decode(batch)).argmax(-1).astype(np.int64)

    supports_importance: bool = False  # whether `prefill_importance` is implemented

    def prefill_importance(self, batch: PrefillBatch, last_q: int) -> list[np.ndarray]:
        """Per-position importance of whole prompts already in the cache (each SeqChunk holds
        all L prompt tokens from start_pos 0): the attention the last min(last_q, L) positions
        pay to each position, summed over queries, heads and layers, normalised to sum 1;
        one float32 [L] array per sequence (pd_serve.engine.refine). Reads the cache only."""
        raise NotImplementedError(f"{type(self).__name__} cannot score prompt tokens")

    # Layer-wise hand-off: when set, prefill calls it with each layer's index right after that
    # layer's K/V are in the cache (engine thread, inside `prefill`); runners that cannot
    # (a compiled whole-model graph) leave `supports_layer_hook` False.
    supports_layer_hook: bool = False
    layer_hook: Callable[[int], None] | None = None

    def read_kv_layer(self, block_table: list[int], num_tokens: int, layer: int) -> np.ndarray:
        """One layer of `read_kv`: float32 [2, num_tokens, num_kv_heads, head_dim]."""
        return self.read_kv(block_table, num_tokens)[layer]

    @abstractmethod
    def read_kv(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        """Copies the first `num_tokens` tokens' K/V out of the cache as float32 on the host:
        [num_layers, 2, num_tokens, num_kv_heads, head_dim] (for tests and the host hand-off;
        device-to-device hand-off moves the cache dtype directly)."""

    @abstractmethod
    def write_kv(self, block_table: list[int], kv: np.ndarray) -> None:
        """Writes K/V laid out as `read_kv` returns into the slots of `block_table`."""

    @abstractmethod
    def close(self) -> None:
        """Releases device memory; the runner must not be used afterwards."""
