"""TorchRunner: the ModelRunner of the PyTorch backend (CPU, or CUDA in bf16/fp16/fp32).

Lifecycle:
1. `TorchRunner(cfg)` loads the checkpoint onto the device and allocates the KV cache, all
   layers in one tensor of `num_blocks + 1` blocks (the last is the scratch block that takes
   padding writes);
2. `prefill` / `decode` / `read_kv` / `write_kv` any number of times, one call at a time;
3. `close` drops the weights and the cache. The runner never frees blocks (the engine does).
"""

from __future__ import annotations

import numpy as np
import torch

from pd_serve.backends.base import DecodeBatch, ModelRunner, PrefillBatch, RunnerConfig
from pd_serve.backends.inputs import (
    PackedBatch,
    attention_mask,
    pack_decode,
    pack_prefill,
)
from pd_serve.backends.torch.model import ForwardInputs, TorchDecoder
from pd_serve.models.checkpoint import load_weights
from pd_serve.models.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_device(device: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`; raises ValueError naming `device` otherwise."""
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N (torch backend), got {device!r}")
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a valid torch device ({exc})") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPUs visible")
    return parsed


class TorchRunner(ModelRunner):
    """Runs the PyTorch decoder over a paged KV cache; returns float32 NumPy logits."""

    def __init__(self, cfg: RunnerConfig) -> None:
        self.device = parse_device(cfg.device)
        # CPU always runs float32 (RunnerConfig.dtype applies to accelerators).
        self.dtype = torch.float32 if self.device.type == "cpu" else DTYPES[cfg.dtype]
        if cfg.threads is not None:
            if cfg.threads <= 0:
                raise ValueError(f"threads must be positive, got {cfg.threads}")
            torch.set_num_threads(cfg.threads)
        mc = ModelConfig.from_dir(cfg.model_dir)
        self.model_config = mc
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        self.block_size, self.num_blocks = cfg.block_size, cfg.num_blocks
        self.scratch_slot = cfg.num_blocks * cfg.block_size
        with torch.inference_mode():
            weights = load_weights(cfg.model_dir, mc)
            self.model = TorchDecoder(mc, weights, self.max_model_len, self.device, self.dtype)
            shape = (mc.num_layers, 2, cfg.num_blocks + 1, cfg.block_size, mc.num_kv_heads,
                     mc.head_dim)
            # [num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim]
            self.kv_blocks = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # [num_layers, 2, (num_blocks + 1) * block_size, num_kv_heads, head_dim], same storage
        self.kv_cache = self.kv_blocks.view(mc.num_layers, 2, -1, mc.num_kv_heads, mc.head_dim)

    @torch.inference_mode()
    def prefill(self, batch: PrefillBatch) -> np.ndarray | list[np.ndarray]:
        for seq in batch.seqs:
            if not seq.token_ids:
                raise ValueError("prefill: a sequence chunk has no token_ids")
            self._check_table(seq.block_table)
        packed = pack_prefill(batch, self.block_size, self.scratch_slot)
        if batch.return_all_logits:
            logits = self._forward(packed, all_logits=True)  # [B, T, vocab]
            return [logits[i, :q] for i, q in enumerate(packed.query_lens)]
        return self._forward(packed, all_logits=False)

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch) -> np.ndarray:
        n = len(batch.token_ids)
        if len(batch.positions) != n or len(batch.block_tables) != n:
            raise ValueError(f"decode: {n} token_ids but {len(batch.positions)} positions and "
                             f"{len(batch.block_tables)} block_tables")
        for table in batch.block_tables:
            self._check_table(table)
        packed = pack_decode(batch, self.block_size, self.scratch_slot)
        return self._forward(packed, all_logits=False)

    @torch.inference_mode()
    def read_kv(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        """Returns float32 [num_layers, 2, num_tokens, num_kv_heads, head_dim]."""
        slots = self._token_slots(block_table, num_tokens)
        return self.kv_cache[:, :, slots].float().cpu().numpy()

    @torch.inference_mode()
    def write_kv(self, block_table: list[int], kv: np.ndarray) -> None:
        mc = self.model_config
        if kv.ndim != 5 or kv.shape[:2] != (mc.num_layers, 2) or kv.shape[3:] != (
                mc.num_kv_heads, mc.head_dim):
            raise ValueError(f"write_kv: kv has shape {kv.shape}, expected "
                             f"({mc.num_layers}, 2, num_tokens, {mc.num_kv_heads}, {mc.head_dim})")
        slots = self._token_slots(block_table, kv.shape[2])
        self.kv_cache[:, :, slots] = torch.from_numpy(np.ascontiguousarray(kv)).to(
            self.device, self.dtype)

    def close(self) -> None:
        del self.model, self.kv_cache, self.kv_blocks
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward(self, packed: PackedBatch, all_logits: bool) -> np.ndarray:
        """Logits as float32 NumPy: [B, vocab], or [B, T, vocab] with `all_logits`."""
        if int(packed.context_lens.max()) > self.max_model_len:
            raise ValueError(f"sequence of {int(packed.context_lens.max())} tokens exceeds "
                             f"max_model_len {self.max_model_len}")
        vocab = self.model_config.vocab_size
        if packed.token_ids.min() < 0 or packed.token_ids.max() >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")
        mask = attention_mask(packed)  # [B, T, C]
        mask[:, :, 0] = True  # padding queries see one key, so no row softmaxes over nothing

        def dev(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device, torch.int64)

        inputs = ForwardInputs(
            token_ids=dev(packed.token_ids), positions=dev(packed.positions),
            slot_mapping=dev(packed.slot_mapping), context_slots=dev(packed.context_slots),
            mask=torch.from_numpy(mask).to(self.device).unsqueeze(1),  # [B, 1, T, C]
            logit_index=None if all_logits else dev(packed.query_lens - 1),
        )
        return self.model.forward(inputs, self.kv_cache).cpu().numpy()

    def _check_table(self, table: list[int]) -> None:
        if any(b < 0 or b >= self.num_blocks for b in table):
            raise ValueError(f"block table {table} has ids outside [0, {self.num_blocks})")

    def _token_slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Cache slot of each position 0 .. num_tokens - 1, [num_tokens] int64 on the device."""
        self._check_table(block_table)
        if num_tokens < 0 or num_tokens > len(block_table) * self.block_size:
            raise ValueError(f"{num_tokens} tokens do not fit {len(block_table)} blocks")
        pos = np.arange(num_tokens)
        table = np.asarray(block_table, dtype=np.int64)
        slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
        return torch.from_numpy(slots).to(self.device)
