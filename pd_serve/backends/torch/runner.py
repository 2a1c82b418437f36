"""TorchRunner: the ModelRunner of the PyTorch backend (CPU, or CUDA in bf16/fp16/fp32).

Two execution paths over the same weights and cache, chosen once in the constructor: the plain
formulation (`TorchDecoder.forward`, gathered context slots under a dense mask; CPU's default,
the reference) and the fast path (`fast_path.py`: flash prefill, paged decode attention, CUDA
graphs; CUDA's default). `TorchOptions` overrides the choice for tests and benchmarks.

Lifecycle:
1. `TorchRunner(cfg)` loads the checkpoint (or generates random-init weights) onto the device
   and allocates the KV cache, all layers in one tensor of `num_blocks + 1` blocks (the last is
   the scratch block that takes padding writes);
2. `warmup()` (optional; the serving runtime calls it) captures the decode CUDA graphs;
   `reconfigure(options)` switches the path later (and needs another `warmup`);
3. `prefill` / `decode` / their `_argmax` forms / `read_kv` / `write_kv` / the device KV
   methods any number of times, one call at a time;
4. `close` drops the weights, graphs and the cache. The runner never frees blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import numpy as np
import torch

from pd_serve.backends.base import DecodeBatch, ModelRunner, PrefillBatch, RunnerConfig
from pd_serve.backends.inputs import PackedBatch, attention_mask, pack_decode, pack_prefill
from pd_serve.backends.torch.fast_path import FastPath, token_slots
from pd_serve.backends.torch.importance import prompt_importance
from pd_serve.backends.torch.kernels import load_pd_kernels
from pd_serve.backends.torch.model import ForwardInputs, TorchDecoder, weight_fetch
from pd_serve.backends.torch.options import TorchOptions
from pd_serve.models.config import ModelConfig

F = TypeVar("F", bound=Callable[..., Any])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _on_device(fn: F) -> F:
    """Runs a runner method in inference mode with the runner's GPU current: the engine and
    loader threads start on cuda:0, and Triton kernels and CUDA graphs use the current device."""
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        with torch.inference_mode(), ctx:
            return fn(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


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
        parsed = torch.device("cuda", parsed.index or 0)  # graphs and generators want an index
    return parsed


class TorchRunner(ModelRunner):
    """Runs the PyTorch decoder over a paged KV cache; returns float32 NumPy logits."""

    def __init__(self, cfg: RunnerConfig, options: TorchOptions | None = None) -> None:
        self.device = parse_device(cfg.device)
        # CPU always runs float32 (RunnerConfig.dtype applies to accelerators).
        self.dtype = torch.float32 if self.device.type == "cpu" else DTYPES[cfg.dtype]
        if cfg.threads is not None:
            if cfg.threads <= 0:
                raise ValueError(f"threads must be positive, got {cfg.threads}")
            torch.set_num_threads(cfg.threads)
        self.options = options if options is not None else TorchOptions.from_env()
        mc = ModelConfig.from_dir(cfg.model_dir)
        self.model_config = mc
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        self.block_size, self.num_blocks = cfg.block_size, cfg.num_blocks
        self.scratch_slot = cfg.num_blocks * cfg.block_size
        with torch.inference_mode():
            fetch = weight_fetch(cfg.model_dir, mc, self.device)
            self.model = TorchDecoder(mc, fetch, self.max_model_len, self.device, self.dtype)
            shape = (mc.num_layers, 2, cfg.num_blocks + 1, cfg.block_size, mc.num_kv_heads,
                     mc.head_dim)
            # [num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim]
            self.kv_blocks = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # [num_layers, 2, (num_blocks + 1) * block_size, num_kv_heads, head_dim], same storage
        self.kv_cache = self.kv_blocks.view(mc.num_layers, 2, -1, mc.num_kv_heads, mc.head_dim)
        self.fast: FastPath | None = None
        self.reconfigure(self.options)

    def reconfigure(self, options: TorchOptions) -> None:
        """Chooses the execution path for `options` over the loaded weights and cache (the one
        place it is chosen; benchmarks switch paths without reloading). Graphs captured before
        are dropped: call `warmup` again."""
        self.options = options
        fast = options.fast if options.fast is not None else self.device.type == "cuda"
        self.fast = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if fast:
            self.fast = FastPath(self.model, self.kv_blocks, options, self.max_model_len,
                                 load_pd_kernels())

    @_on_device
    def warmup(self) -> int:
        """Captures the fast path's decode graphs; returns how many (0 on the plain path)."""
        return self.fast.warmup() if self.fast is not None else 0

    @_on_device
    def prefill(self, batch: PrefillBatch) -> np.ndarray | list[np.ndarray]:
        self._check_prefill(batch)
        if self.fast is not None:
            logits = self.fast.prefill(batch.seqs, batch.return_all_logits,
                                       self.layer_hook).float().cpu().numpy()
            if not batch.return_all_logits:
                return logits  # [num_seqs, vocab]
            bounds = np.cumsum([len(s.token_ids) for s in batch.seqs])[:-1]
            return np.split(logits, bounds)
        packed = pack_prefill(batch, self.block_size, self.scratch_slot)
        if batch.return_all_logits:
            logits = self._forward(packed, True, self.layer_hook)  # [B, T, vocab]
            return [logits[i, :q] for i, q in enumerate(packed.query_lens)]
        return self._forward(packed, False, self.layer_hook)

    @_on_device
    def prefill_argmax(self, batch: PrefillBatch) -> np.ndarray:
        if self.fast is None:
            return super().prefill_argmax(batch)
        self._check_prefill(batch)
        logits = self.fast.prefill(batch.seqs, False, self.layer_hook)  # [num_seqs, vocab]
        return logits.argmax(-1).cpu().numpy()

    supports_importance = True

    @_on_device
    def prefill_importance(self, batch: PrefillBatch, last_q: int) -> list[np.ndarray]:
        self._check_prefill(batch)
        return [prompt_importance(self.model, self.kv_cache, s, last_q, self.block_size)
                for s in batch.seqs]

    @_on_device
    def decode(self, batch: DecodeBatch) -> np.ndarray:
        self._check_decode(batch)
        if self.fast is not None:
            logits = self.fast.decode(batch)[1]  # a view of the static output buffer
            return logits.to("cpu", torch.float32, copy=True).numpy()  # [n, vocab]
        packed = pack_decode(batch, self.block_size, self.scratch_slot)
        return self._forward(packed, all_logits=False)

    @_on_device
    def decode_argmax(self, batch: DecodeBatch) -> np.ndarray:
        if self.fast is None:
            return super().decode_argmax(batch)
        self._check_decode(batch)
        ids = self.fast.decode(batch)[0]  # [n] int64: the only copy back
        return ids.to("cpu", copy=True).numpy()

    @_on_device
    def read_kv(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        """Returns float32 [num_layers, 2, num_tokens, num_kv_heads, head_dim]."""
        slots = self._token_slots(block_table, num_tokens)
        return self.kv_cache[:, :, slots].float().cpu().numpy()

    supports_layer_hook = True

    @_on_device
    def read_kv_layer(self, block_table: list[int], num_tokens: int, layer: int) -> np.ndarray:
        """Returns float32 [2, num_tokens, num_kv_heads, head_dim] of one layer."""
        slots = self._token_slots(block_table, num_tokens)
        return self.kv_cache[layer, :, slots].float().cpu().numpy()

    @_on_device
    def write_kv(self, block_table: list[int], kv: np.ndarray | torch.Tensor) -> None:
        """`kv` in the `read_kv` layout: a NumPy array, or a tensor on any device (a CUDA
        tensor in the cache dtype is written without a host round trip)."""
        mc = self.model_config
        if kv.ndim != 5 or tuple(kv.shape[:2]) != (mc.num_layers, 2) or tuple(
                kv.shape[3:]) != (mc.num_kv_heads, mc.head_dim):
            raise ValueError(f"write_kv: kv has shape {tuple(kv.shape)}, expected "
                             f"({mc.num_layers}, 2, num_tokens, {mc.num_kv_heads}, {mc.head_dim})")
        slots = self._token_slots(block_table, kv.shape[2])
        src = kv if isinstance(kv, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(kv))
        self.kv_cache[:, :, slots] = src.to(self.device, self.dtype)

    @_on_device
    def gather_kv_device(self, block_table: list[int], num_tokens: int,
                         out: torch.Tensor, layer: int | None = None) -> None:
        """Copies the first `num_tokens` tokens' K/V into `out` on the device: a contiguous
        tensor of the cache dtype or uint8 with room for them, whose first elements receive
        the `read_kv` layout [num_layers, 2, num_tokens, num_kv_heads, head_dim] (with
        `layer`: that layer only, [1, 2, num_tokens, ...])."""
        layers = slice(None) if layer is None else slice(layer, layer + 1)
        table, flat = self._device_args(block_table, num_tokens, out, layer)
        kernels = load_pd_kernels()
        if kernels is not None:
            kernels.gather_kv(self.kv_blocks[layers], table, num_tokens, out)
        else:
            flat.view(self._kv_shape(num_tokens, layer is not None)).copy_(
                self.kv_cache[layers, :, self._token_slots(block_table, num_tokens)])

    @_on_device
    def scatter_kv_device(self, block_table: list[int], src: torch.Tensor,
                          num_tokens: int) -> None:
        """Writes `src` (laid out as `gather_kv_device` fills it, on the device) into the
        slots of the first `num_tokens` positions of `block_table`."""
        table, flat = self._device_args(block_table, num_tokens, src)
        kernels = load_pd_kernels()
        if kernels is not None:
            kernels.scatter_kv(src, self.kv_blocks, table, num_tokens)
        else:
            slots = self._token_slots(block_table, num_tokens)
            self.kv_cache[:, :, slots] = flat.view(self._kv_shape(num_tokens))

    def close(self) -> None:
        self.fast = None
        del self.model, self.kv_cache, self.kv_blocks
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward(self, packed: PackedBatch, all_logits: bool,
                 layer_hook: Callable[[int], None] | None = None) -> np.ndarray:
        """The plain formulation. Logits as float32 NumPy: [B, vocab], or [B, T, vocab] with
        `all_logits`; `layer_hook(i)` after layer i's K/V are written (prefill only)."""
        mask = attention_mask(packed)  # [B, T, C]

        def dev(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device, torch.int64)

        inputs = ForwardInputs(
            token_ids=dev(packed.token_ids), positions=dev(packed.positions),
            slot_mapping=dev(packed.slot_mapping), context_slots=dev(packed.context_slots),
            mask=torch.from_numpy(mask).to(self.device).unsqueeze(1),  # [B, 1, T, C]
            logit_index=None if all_logits else dev(packed.query_lens - 1),
        )
        return self.model.forward(inputs, self.kv_cache, layer_hook).cpu().numpy()

    def _check_prefill(self, batch: PrefillBatch) -> None:
        if not batch.seqs:
            raise ValueError("empty prefill batch")
        for seq in batch.seqs:
            if not seq.token_ids:
                raise ValueError("prefill: a sequence chunk has no token_ids")
            if seq.start_pos < 0:
                raise ValueError(f"prefill: start_pos must be >= 0, got {seq.start_pos}")
            self._check_table(seq.block_table)
            end = seq.start_pos + len(seq.token_ids)
            if end > self.max_model_len:
                raise ValueError(f"sequence of {end} tokens exceeds max_model_len "
                                 f"{self.max_model_len}")
            if len(seq.block_table) * self.block_size < end:
                raise ValueError(f"block table of {len(seq.block_table)} blocks cannot hold "
                                 f"{end} tokens")
            self._check_tokens(seq.token_ids)

    def _check_decode(self, batch: DecodeBatch) -> None:
        n = len(batch.token_ids)
        if n == 0:
            raise ValueError("empty decode batch")
        if len(batch.positions) != n or len(batch.block_tables) != n:
            raise ValueError(f"decode: {n} token_ids but {len(batch.positions)} positions and "
                             f"{len(batch.block_tables)} block_tables")
        if self.fast is not None:
            return  # the fast path checks tables, positions and tokens vectorised while packing
        for table in batch.block_tables:
            self._check_table(table)
        if max(batch.positions) >= self.max_model_len:
            raise ValueError(f"sequence of {max(batch.positions) + 1} tokens exceeds "
                             f"max_model_len {self.max_model_len}")
        self._check_tokens(batch.token_ids)

    def _check_tokens(self, ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")

    def _check_table(self, table: list[int]) -> None:
        if any(b < 0 or b >= self.num_blocks for b in table):
            raise ValueError(f"block table {table} has ids outside [0, {self.num_blocks})")

    def _kv_shape(self, num_tokens: int, one_layer: bool = False) -> tuple[int, ...]:
        mc = self.model_config
        return (1 if one_layer else mc.num_layers, 2, num_tokens, mc.num_kv_heads, mc.head_dim)

    def _device_args(self, block_table: list[int], num_tokens: int, buf: torch.Tensor,
                     layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Checks a device hand-off's table and buffer (of one layer when `layer` is given);
        returns the table (int32 on the device) and the buffer's first K/V elements as a flat
        tensor of the cache dtype."""
        self._check_table(block_table)
        if num_tokens <= 0 or num_tokens > len(block_table) * self.block_size:
            raise ValueError(f"{num_tokens} tokens do not fit {len(block_table)} blocks")
        if layer is not None and not 0 <= layer < self.model_config.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.model_config.num_layers})")
        need = int(np.prod(self._kv_shape(num_tokens, layer is not None)))
        ok_type = buf.dtype in (self.dtype, torch.uint8) and buf.is_contiguous()
        flat = buf.view(-1).view(self.dtype) if ok_type and buf.device == self.device else None
        if flat is None or flat.numel() < need:
            raise ValueError(f"KV buffer must be a contiguous {self.dtype} or uint8 tensor on "
                             f"{self.device} with room for {need} elements "
                             f"{self._kv_shape(num_tokens)}, got {buf.dtype} {tuple(buf.shape)} "
                             f"on {buf.device}")
        table = torch.tensor(block_table, dtype=torch.int32, device=self.device)
        return table, flat[:need]

    def _token_slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Cache slot of each position 0 .. num_tokens - 1, [num_tokens] int64 on the device."""
        self._check_table(block_table)
        if num_tokens < 0 or num_tokens > len(block_table) * self.block_size:
            raise ValueError(f"{num_tokens} tokens do not fit {len(block_table)} blocks")
        slots = token_slots(block_table, 0, num_tokens, self.block_size)
        return torch.from_numpy(slots).to(self.device)
