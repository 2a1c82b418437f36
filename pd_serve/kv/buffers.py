"""Where hand-off buffers live: host memory (numpy, host TCP transport) or device memory (torch
CUDA tensors, NCCL transport), behind one small strategy the sender and receiver share.

A strategy allocates flat buffers, fills a prefill slot buffer from the runner's paged cache
(whole, or one layer at a time for the layer-wise hand-off, with its progress trailer kept up
to date: pd_serve.kv.progress), checksums each layer and views a received buffer as K/V for
RecvScatter. The sender and receiver
keep their lifecycle and who-frees-what rules; only the memory and the copy kernels differ.

Checksums: host buffers use zlib.crc32 per layer. Device buffers use `i32sum` (the layer's bytes
read as int32 and summed into int64 on the device: one extra read of the buffer at memory speed,
one tiny copy to the host) or `none` when the operator trusts the link's own integrity checks
(NVLink and InfiniBand carry CRCs) and wants the hand-off at full speed.
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol

import numpy as np

from pd_serve.backends.base import ModelRunner
from pd_serve.kv.layout import KVLayout

CHECKSUM_ALGOS = ("crc32", "i32sum", "none")


class KVBuffers(Protocol):
    """Memory and copies of one side of the hand-off (caller: the sender or receiver)."""

    checksum_algo: str

    def alloc(self, nbytes: int) -> Any:
        """A zeroed flat buffer of `nbytes` bytes that the transport can register."""

    def fill(self, buffer: Any, runner: ModelRunner, block_table: list[int],
             layout: KVLayout) -> None:
        """Copies `layout.num_tokens` tokens of K/V out of `block_table`'s blocks into the
        first `layout.total_bytes` bytes of `buffer`, as [layer][K|V][token][head][dim]."""

    def checksums(self, layout: KVLayout, buffer: Any) -> tuple[int, ...]:
        """One checksum per layer (empty tuple entries are 0 for `none`)."""

    def as_kv(self, layout: KVLayout, buffer: Any) -> Any:
        """A view [num_layers, 2, num_tokens, num_kv_heads, head_dim] of `buffer`, which the
        runner's `write_kv` accepts."""

    def fill_layer(self, buffer: Any, runner: ModelRunner, block_table: list[int],
                   layout: KVLayout, layer: int, trailer: int) -> None:
        """`fill` of one layer, then its checksum into trailer word 3 + layer and word 1 (layers
        staged) = layer + 1, in that order; `trailer` is the trailer's byte offset."""

    def set_words(self, buffer: Any, trailer: int, start: int, values: list[int]) -> None:
        """Writes int64 trailer words start .. start + len(values) - 1, in order."""

    def words(self, buffer: Any, trailer: int, count: int) -> np.ndarray:
        """The first `count` trailer words as int64 [count] on the host."""


def trailer_offset(nbytes: int) -> int:
    """Byte offset of the progress trailer after `nbytes` of KV (8-byte aligned)."""
    return -(-nbytes // 8) * 8


def crc32_checksums(layout: KVLayout, buffer: np.ndarray) -> tuple[int, ...]:
    """zlib.crc32 of each layer's K and V planes in `buffer` (flat uint8)."""
    return tuple(zlib.crc32(buffer.data[off:off + n]) for off, n in layout.layer_ranges())


class HostBuffers:
    """numpy buffers; the runner's `read_kv` copies the cache out as the layout's dtype."""

    checksum_algo = "crc32"

    def alloc(self, nbytes: int) -> np.ndarray:
        return np.zeros(nbytes, np.uint8)  # [nbytes]

    def fill(self, buffer: np.ndarray, runner: ModelRunner, block_table: list[int],
             layout: KVLayout) -> None:
        kv = runner.read_kv(block_table, layout.num_tokens)  # [L, 2, T, KVH, D]
        dst = layout.to_array(buffer)
        if kv.shape != dst.shape:
            raise ValueError(f"runner KV {kv.shape} does not match the layout {dst.shape}")
        dst[...] = kv

    def checksums(self, layout: KVLayout, buffer: np.ndarray) -> tuple[int, ...]:
        return crc32_checksums(layout, buffer)

    def as_kv(self, layout: KVLayout, buffer: np.ndarray) -> np.ndarray:
        return layout.to_array(buffer)

    def fill_layer(self, buffer: np.ndarray, runner: ModelRunner, block_table: list[int],
                   layout: KVLayout, layer: int, trailer: int) -> None:
        kv = runner.read_kv_layer(block_table, layout.num_tokens, layer)  # [2, T, KVH, D]
        dst = layout.to_array(buffer)[layer]
        if kv.shape != dst.shape:
            raise ValueError(f"runner KV {kv.shape} does not match the layout {dst.shape}")
        dst[...] = kv
        off, n = layout.layer_ranges()[layer]
        self.set_words(buffer, trailer, 3 + layer, [zlib.crc32(buffer.data[off:off + n])])
        self.set_words(buffer, trailer, 1, [layer + 1])

    def set_words(self, buffer: np.ndarray, trailer: int, start: int, values: list[int]) -> None:
        buffer[trailer:].view(np.int64)[start:start + len(values)] = values

    def words(self, buffer: np.ndarray, trailer: int, count: int) -> np.ndarray:
        return buffer[trailer:].view(np.int64)[:count].copy()


class DeviceBuffers:
    """torch buffers on one CUDA device; fill and RecvScatter run the runner's fused kernels
    (`gather_kv_device` / `write_kv` of a device tensor), never through the host."""

    def __init__(self, device: Any, checksum_algo: str = "i32sum") -> None:
        import torch

        if checksum_algo not in ("i32sum", "none"):
            raise ValueError(f"device buffers checksum with i32sum or none, got "
                             f"{checksum_algo!r}")
        self._torch = torch
        self.device = torch.device(device)
        self.checksum_algo = checksum_algo

    def alloc(self, nbytes: int) -> Any:
        return self._torch.zeros(nbytes, dtype=self._torch.uint8, device=self.device)

    def fill(self, buffer: Any, runner: ModelRunner, block_table: list[int],
             layout: KVLayout) -> None:
        gather = getattr(runner, "gather_kv_device", None)
        if gather is None:
            raise ValueError(f"{type(runner).__name__} cannot gather K/V on the device; the "
                             f"NCCL transport needs the torch backend on CUDA")
        gather(block_table, layout.num_tokens, self._typed(layout, buffer))
        # The transport's own stream sends this buffer: the gather must have finished.
        self._torch.cuda.current_stream(self.device).synchronize()

    def checksums(self, layout: KVLayout, buffer: Any) -> tuple[int, ...]:
        if self.checksum_algo == "none":
            return (0,) * layout.num_layers
        if layout.layer_bytes % 4:
            raise ValueError(f"i32sum needs layers of whole int32 words ({layout.layer_bytes} "
                             f"bytes)")
        words = buffer[:layout.total_bytes].view(self._torch.int32)
        sums = words.view(layout.num_layers, -1).sum(dim=1, dtype=self._torch.int64)
        return tuple(int(s) for s in sums.tolist())

    def as_kv(self, layout: KVLayout, buffer: Any) -> Any:
        shape = (layout.num_layers, 2, layout.num_tokens, layout.num_kv_heads, layout.head_dim)
        return self._typed(layout, buffer).view(shape)

    def fill_layer(self, buffer: Any, runner: ModelRunner, block_table: list[int],
                   layout: KVLayout, layer: int, trailer: int) -> None:
        """Queues the layer's gather, checksum and progress words on the current stream; no
        host sync (the caller records an event for the transport's sends to wait on)."""
        gather = getattr(runner, "gather_kv_device", None)
        if gather is None:
            raise ValueError(f"{type(runner).__name__} cannot gather K/V on the device")
        per = layout.layer_bytes // layout.itemsize
        gather(block_table, layout.num_tokens,
               self._typed(layout, buffer)[layer * per:(layer + 1) * per], layer)
        words = self._words_view(buffer, trailer)
        if self.checksum_algo == "none":
            words[3 + layer].fill_(0)
        else:
            off, n = layout.layer_ranges()[layer]
            words[3 + layer] = buffer[off:off + n].view(self._torch.int32).sum(
                dtype=self._torch.int64)
        words[1].fill_(layer + 1)

    def set_words(self, buffer: Any, trailer: int, start: int, values: list[int]) -> None:
        words = self._words_view(buffer, trailer)
        for i, value in enumerate(values):  # scalar fills: no host-to-device copy, no sync
            words[start + i].fill_(value)

    def words(self, buffer: Any, trailer: int, count: int) -> np.ndarray:
        return self._words_view(buffer, trailer)[:count].cpu().numpy()

    def _words_view(self, buffer: Any, trailer: int) -> Any:
        tail = buffer[trailer:]
        return tail[:tail.numel() // 8 * 8].view(self._torch.int64)

    def _typed(self, layout: KVLayout, buffer: Any) -> Any:
        """The layout's first `total_bytes` bytes of `buffer` as the cache dtype, flat."""
        dtype = getattr(self._torch, layout.dtype)
        return buffer[:layout.total_bytes].view(dtype)
