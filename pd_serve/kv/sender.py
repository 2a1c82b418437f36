"""Prefill side of the KV hand-off: per-slot contiguous buffers that decode instances read.

Lifecycle (caller: the prefill instance's engine thread; nothing blocks on the network):
1. constructed: allocates `num_slots` slot buffers, each sized for the slot layout's tokens
   (max_model_len), registers each with the transport and exports its descriptor once;
2. `stage(slot, runner, block_table, num_tokens)` copies a parked request's K/V out of the paged
   cache into the slot buffer as [layer0.K | layer0.V | layer1.K | ...], checksums each layer
   and returns the `HandoffSource` to send to a decode instance;
   Layer-wise instead: `begin_layerwise` before the prefill runs returns the source at once
   (its progress trailer says RUNNING), `stage_layer` during the prefill copies each layer as
   soon as it is computed, `finish_layerwise` (first token; DONE) or `abort_layerwise`
   (FAILED / FINISHED) ends it; the reader polls the trailer meanwhile (pd_serve.kv.progress);
3. the decode instance reads the bytes (the transport serves them; the sender does nothing);
4. `release(slot)` once the hand-off completed or failed (the caller then releases the
   request's blocks in the engine too);
5. `close()` deregisters the slot buffers.
Who frees what: the caller picks free slots and must `release` every staged slot; the sender
owns and deregisters its buffers. `leak_check()` asserts no slot is staged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pd_serve.backends.base import ModelRunner
from pd_serve.kv import progress
from pd_serve.kv.buffers import HostBuffers, KVBuffers, trailer_offset
from pd_serve.kv.buffers import crc32_checksums as layer_checksums
from pd_serve.kv.layout import KVLayout
from pd_serve.kv.messages import HandoffSource
from pd_serve.kv.progress import trailer_bytes
from pd_serve.kv.transport import Transport

__all__ = ["KVSender", "layer_checksums"]


class KVSender:
    """`num_slots` registered slot buffers of `slot_layout.total_bytes` bytes each, in host
    memory by default or wherever `buffers` puts them (device memory for NCCL)."""

    def __init__(self, transport: Transport, slot_layout: KVLayout, num_slots: int,
                 buffers: KVBuffers | None = None) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.transport = transport
        self.slot_layout = slot_layout
        self._mem: KVBuffers = buffers or HostBuffers()
        self._trailer = trailer_offset(slot_layout.total_bytes)
        # One flat byte buffer per slot: [trailer + trailer_bytes(L)] uint8 (KV, then progress).
        self._buffers = [self._mem.alloc(self._trailer + trailer_bytes(slot_layout.num_layers))
                         for _ in range(num_slots)]
        self._handles: list[int] = []
        self._regions: list[bytes] = []
        try:
            for buf in self._buffers:
                self._handles.append(transport.register(buf))
                self._regions.append(transport.export(self._handles[-1]))
            self._conn_id = transport.conn_id()
        except Exception:
            self.close()
            raise
        self._staged: dict[int, str] = {}  # slot -> request id
        self._layerwise: dict[int, KVLayout] = {}  # slot -> layout, while it is being staged
        self.on_progress: Callable[[int], None] | None = None  # handle: progress was written

    @property
    def num_slots(self) -> int:
        return len(self._buffers)

    def free_slots(self) -> list[int]:
        return [s for s in range(self.num_slots) if s not in self._staged]

    def stage(self, slot: int, runner: ModelRunner, block_table: list[int], num_tokens: int,
              request_id: str = "") -> HandoffSource:
        """Copies `num_tokens` tokens of K/V from `block_table`'s blocks into slot `slot`.
        ValueError for a busy or unknown slot or a request longer than the slot."""
        layout = self._claim(slot, num_tokens, request_id)
        try:
            self._mem.fill(self._buffers[slot], runner, block_table, layout)
        except BaseException:
            self._staged.pop(slot)
            raise
        return HandoffSource(request_id=request_id, conn_id=self._conn_id,
                             region=self._regions[slot], offset=0, layout=layout,
                             checksums=self._mem.checksums(layout, self._buffers[slot]),
                             checksum_algo=self._mem.checksum_algo)

    def begin_layerwise(self, slot: int, num_tokens: int, request_id: str) -> HandoffSource:
        """Claims `slot` for a layer-wise hand-off of `num_tokens` tokens: the progress trailer
        says RUNNING with no layer staged; the source can go to decode before the prefill."""
        layout = self._claim(slot, num_tokens, request_id)
        self._layerwise[slot] = layout
        self._mem.set_words(self._buffers[slot], self._trailer, 0, [progress.RUNNING, 0, -1])
        self._written(slot)
        return HandoffSource(request_id=request_id, conn_id=self._conn_id,
                             region=self._regions[slot], offset=0, layout=layout, checksums=(),
                             checksum_algo=self._mem.checksum_algo,
                             progress_offset=self._trailer)

    def stage_layer(self, slot: int, request_id: str, runner: ModelRunner,
                    block_table: list[int], layer: int) -> None:
        """Copies layer `layer` of the slot's request out of the cache and reports it staged.
        Every layer-wise call names the request: a slot freed early (its decode peer died) and
        claimed again must not take the first request's writes."""
        layout = self._layerwise_layout(slot, request_id)
        if not 0 <= layer < layout.num_layers:
            raise ValueError(f"layer {layer} outside [0, {layout.num_layers})")
        self._mem.fill_layer(self._buffers[slot], runner, block_table, layout, layer,
                             self._trailer)
        self._written(slot)

    def finish_layerwise(self, slot: int, request_id: str, first_token_id: int) -> None:
        """Every layer staged: publishes the first token, then DONE. ValueError if a layer is
        missing (the prefill did not run every layer's hook) or the slot is not the request's."""
        layout = self._layerwise_layout(slot, request_id)
        staged = int(self._mem.words(self._buffers[slot], self._trailer, 2)[1])
        if staged != layout.num_layers:
            raise ValueError(f"slot {slot}: {staged} of {layout.num_layers} layers staged")
        self._mem.set_words(self._buffers[slot], self._trailer, 2, [first_token_id])
        self._mem.set_words(self._buffers[slot], self._trailer, 0, [progress.DONE])
        self._layerwise.pop(slot)
        self._written(slot)

    def abort_layerwise(self, slot: int, request_id: str, finished: bool) -> None:
        """Ends a layer-wise hand-off without KV for decode: FINISHED (the request ended at its
        first token) or FAILED. The slot stays staged until `release`: the reader may still be
        polling it. A slot not being staged layer-wise for this request is left alone."""
        if self._staged.get(slot) != request_id or self._layerwise.pop(slot, None) is None:
            return
        state = progress.FINISHED if finished else progress.FAILED
        self._mem.set_words(self._buffers[slot], self._trailer, 0, [state])
        self._written(slot)

    def release(self, slot: int) -> None:
        """Frees a staged slot (hand-off done or failed); releasing a free slot is a no-op."""
        self._staged.pop(slot, None)
        self._layerwise.pop(slot, None)

    def _claim(self, slot: int, num_tokens: int, request_id: str) -> KVLayout:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside [0, {self.num_slots})")
        if slot in self._staged:
            raise ValueError(f"slot {slot} still holds request {self._staged[slot]!r}")
        if not 1 <= num_tokens <= self.slot_layout.num_tokens:
            raise ValueError(f"{num_tokens} tokens do not fit a slot of "
                             f"{self.slot_layout.num_tokens}")
        self._staged[slot] = request_id
        return self.slot_layout.with_tokens(num_tokens)

    def _layerwise_layout(self, slot: int, request_id: str) -> KVLayout:
        layout = self._layerwise.get(slot)
        if layout is None or self._staged.get(slot) != request_id:
            raise ValueError(f"slot {slot} is not being staged layer-wise for {request_id!r}")
        return layout

    def _written(self, slot: int) -> None:
        """Progress words or layer bytes were written: device transports order their sends
        after them (the hook records an event), host ones see them at once."""
        if self.on_progress is not None:
            self.on_progress(self._handles[slot])

    def buffer(self, slot: int) -> Any:
        """The slot's flat byte buffer (tests and diagnostics)."""
        return self._buffers[slot]

    def leak_check(self) -> None:
        """AssertionError if a slot is still staged or a buffer lost its registration."""
        if self._staged or self._layerwise:
            raise AssertionError(f"slots still staged: {self._staged} (layer-wise: "
                                 f"{sorted(self._layerwise)})")
        if len(self._handles) != self.num_slots:
            raise AssertionError("slot buffers are not all registered")

    def close(self) -> None:
        """Deregisters every slot buffer; the sender must not be used afterwards."""
        while self._handles:
            self.transport.deregister(self._handles.pop())
        self._regions.clear()
