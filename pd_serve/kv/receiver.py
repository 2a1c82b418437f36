"""Decode side of the KV hand-off: read a prefill slot buffer, verify it, RecvScatter it.

Lifecycle (caller: the decode instance's hand-off code, one fetch per staging buffer at a time;
`fetch` blocks up to its timeout):
1. constructed: allocates `num_staging` staging buffers sized for `staging_layout`
   (max_model_len tokens each) and registers them with the transport; fetches into different
   buffers may overlap (a layer-wise read waits on its prefill, so one buffer would hold up
   every hand-off behind it);
2. `fetch(source, block_table, runner, mode, timeout_s)` connects to the source's endpoint
   (connections and imported regions are cached per peer), reads the request's bytes into the
   staging buffer (one read, one per layer, or one per block per layer per K/V), verifies the
   per-layer checksums and writes the K/V into the reserved blocks with `runner.write_kv`
   (`read` does the same without the write, for callers that scatter on the engine thread);
   a layer-wise source (`read_layerwise`) is read while its prefill still runs: the progress
   trailer is polled and each newly staged run of layers read at once;
3. `close()` deregisters the staging buffers.
Who frees what: the caller owns the reserved blocks (the engine's reservation) and cancels the
reservation when `fetch` raises; a failed fetch registers nothing and drops the cached
connection of the failing peer, so the next fetch from it reconnects.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal

from pd_serve.backends.base import ModelRunner
from pd_serve.kv import progress
from pd_serve.kv.buffers import HostBuffers, KVBuffers, trailer_offset
from pd_serve.kv.layout import KVLayout
from pd_serve.kv.messages import HandoffSource
from pd_serve.kv.progress import Progress, trailer_bytes, trailer_words
from pd_serve.kv.transport import Read, Transport, TransportError, TransportTimeout

Mode = Literal["bulk", "per_layer", "block_fixed"]
MODES: tuple[str, ...] = ("bulk", "per_layer", "block_fixed")


POLL_MIN_S, POLL_MAX_S = 2e-4, 4e-3  # layer-wise: trailer polling backs off between these


class HandoffError(RuntimeError):
    """A hand-off failed (transport error, timeout, bad metadata or checksum mismatch)."""


class HandoffAborted(HandoffError):
    """The prefill side ended a layer-wise hand-off: `finished` when the request ended at its
    first token (nothing to decode), else its prefill or staging failed."""

    def __init__(self, message: str, finished: bool) -> None:
        super().__init__(message)
        self.finished = finished


class KVReceiver:
    """`num_staging` registered staging buffers plus cached peer connections. Reads into
    different staging buffers may run on different threads at once (the transport, not
    thread-safe itself, is called under one lock, one read_batch at a time); each buffer is
    one caller's at a time."""

    def __init__(self, transport: Transport, staging_layout: KVLayout, block_size: int,
                 buffers: KVBuffers | None = None, num_staging: int = 1) -> None:
        if num_staging < 1:
            raise ValueError(f"num_staging must be positive, got {num_staging}")
        self.transport = transport
        self.staging_layout = staging_layout
        self.block_size = block_size
        self._mem: KVBuffers = buffers or HostBuffers()
        self._trailer = trailer_offset(staging_layout.total_bytes)
        size = self._trailer + trailer_bytes(staging_layout.num_layers)
        # each [trailer + trailer_bytes(L)] uint8: the KV, then a layer-wise source's progress
        self._staging = [self._mem.alloc(size) for _ in range(num_staging)]
        self._handles: list[int] = []
        self._io = threading.Lock()  # transport calls and the connection caches
        self._peers: dict[bytes, Any] = {}  # conn id -> peer
        self._remotes: dict[tuple[bytes, bytes], Any] = {}  # (conn id, region) -> remote
        try:
            for buf in self._staging:
                self._handles.append(transport.register(buf))
        except Exception:
            self.close()
            raise
        self.last_num_reads = 0  # ranges the last fetch read (bulk 1, per layer L, ...)

    @property
    def num_staging(self) -> int:
        return len(self._staging)

    def fetch(self, source: HandoffSource, block_table: list[int], runner: ModelRunner,
              mode: Mode = "bulk", timeout_s: float = 10.0, staging: int = 0) -> Any:
        """`read`, then RecvScatter: writes the K/V into `block_table`'s blocks with
        `runner.write_kv`; returns the received K/V. HandoffError on any failure."""
        kv = self.read(source, block_table, mode, timeout_s, staging)
        runner.write_kv(block_table, kv)
        return kv

    def read(self, source: HandoffSource, block_table: list[int], mode: Mode = "bulk",
             timeout_s: float = 10.0, staging: int = 0) -> Any:
        """Reads and verifies the request's K/V without touching the cache; returns
        [num_layers, 2, num_tokens, num_kv_heads, head_dim], a view of staging buffer
        `staging` valid until the next read into it (for callers that must run `write_kv` on
        the engine thread, since a runner is not thread-safe). HandoffError on any failure."""
        layout = self._check(source, block_table, mode)
        if source.layerwise:
            raise HandoffError(f"hand-off of {source.request_id!r} is layer-wise: use "
                               f"read_layerwise")
        reads = [Read(off, source.offset + off, n) for off, n in _ranges(layout, mode,
                                                                         self.block_size)]
        deadline = time.monotonic() + timeout_s
        self._transfer(source, staging, reads, deadline)
        self.last_num_reads = len(reads)
        self._verify(source, layout, source.checksums, staging)
        return self._mem.as_kv(layout, self._staging[staging])

    def read_layerwise(self, source: HandoffSource, block_table: list[int],
                       timeout_s: float = 10.0, staging: int = 0) -> tuple[Any, int]:
        """`read` of a layer-wise source while its prefill runs: polls the progress trailer
        and reads each run of newly staged layers in one range, until the owner says DONE.
        Returns the K/V view and the first token id. HandoffAborted when the owner gave up
        (the prefill failed, or the request ended at its first token); HandoffError on any
        other failure, including no DONE within `timeout_s`."""
        layout = self._check(source, block_table, "bulk")
        if not source.layerwise:
            raise HandoffError(f"hand-off of {source.request_id!r} is not layer-wise")
        n_layers, layer_bytes = layout.num_layers, layout.layer_bytes
        trailer = Read(self._trailer, source.progress_offset, trailer_bytes(n_layers))
        buf = self._buffer(staging)
        deadline, done, reads, pause = time.monotonic() + timeout_s, 0, 0, POLL_MIN_S
        while True:
            self._transfer(source, staging, [trailer], deadline)
            try:
                prog = Progress.parse(self._mem.words(buf, self._trailer,
                                                      trailer_words(n_layers)), n_layers)
            except ValueError as exc:
                raise HandoffError(f"hand-off of {source.request_id!r}: {exc}") from exc
            if prog.state in (progress.FAILED, progress.FINISHED):
                raise HandoffAborted(f"hand-off of {source.request_id!r} was ended by its "
                                     f"prefill ({progress.STATES[prog.state]})",
                                     prog.state == progress.FINISHED)
            if prog.staged > done:  # layers are contiguous: one range for the new ones
                self._transfer(source, staging, [Read(done * layer_bytes, source.offset
                                                      + done * layer_bytes,
                                                      (prog.staged - done) * layer_bytes)],
                               deadline)
                done, reads, pause = prog.staged, reads + 1, POLL_MIN_S
            if prog.state == progress.DONE:
                break
            if time.monotonic() + pause > deadline:
                raise HandoffError(f"hand-off of {source.request_id!r} timed out after "
                                   f"{timeout_s} s with {done} of {n_layers} layers read")
            time.sleep(pause)
            pause = min(2 * pause, POLL_MAX_S)
        self.last_num_reads = reads
        self._verify(source, layout, prog.checksums, staging)
        return self._mem.as_kv(layout, buf), prog.first_token

    def _transfer(self, source: HandoffSource, staging: int, reads: list[Read],
                  deadline: float) -> None:
        """One read_batch from the source's peer into staging buffer `staging`; transport
        failures become HandoffError."""
        timeout_s = max(deadline - time.monotonic(), 1e-3)
        with self._io:
            try:
                peer, remote = self._connect(source, timeout_s)
                self.transport.read_batch(peer, self._handle(staging), remote, reads, timeout_s)
            except TransportTimeout as exc:
                self._forget(source.conn_id)
                raise HandoffError(f"hand-off of {source.request_id!r} timed out: "
                                   f"{exc}") from exc
            except TransportError as exc:
                self._forget(source.conn_id)
                raise HandoffError(f"hand-off of {source.request_id!r} failed: {exc}") from exc

    def _verify(self, source: HandoffSource, layout: KVLayout, checksums: tuple[int, ...],
                staging: int) -> None:
        if source.checksum_algo != self._mem.checksum_algo:
            raise HandoffError(f"hand-off of {source.request_id!r}: checksums are "
                               f"{source.checksum_algo!r}, this receiver checks "
                               f"{self._mem.checksum_algo!r}")
        got = self._mem.checksums(layout, self._staging[staging])
        bad = [i for i, (a, b) in enumerate(zip(got, checksums)) if a != b]
        if bad:
            raise HandoffError(f"hand-off of {source.request_id!r}: checksum mismatch in "
                               f"layer(s) {bad} ({len(bad)} of {layout.num_layers})")

    def _check(self, source: HandoffSource, block_table: list[int], mode: str) -> KVLayout:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        layout, mine = source.layout, self.staging_layout
        if (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype) != (
                mine.num_layers, mine.num_kv_heads, mine.head_dim, mine.dtype):
            raise HandoffError(f"hand-off of {source.request_id!r}: source layout {layout} "
                               f"does not match this model's {mine}")
        if layout.num_tokens > mine.num_tokens:
            raise HandoffError(f"hand-off of {source.request_id!r}: {layout.num_tokens} "
                               f"tokens exceed the staging buffer's {mine.num_tokens}")
        need = -(-layout.num_tokens // self.block_size)
        if len(block_table) != need:
            raise HandoffError(f"hand-off of {source.request_id!r}: {len(block_table)} "
                               f"reserved blocks for {layout.num_tokens} tokens (need {need})")
        return layout

    def _connect(self, source: HandoffSource, timeout_s: float) -> tuple[Any, Any]:
        peer = self._peers.get(source.conn_id)
        if peer is None:
            peer = self.transport.connect(source.conn_id, timeout_s)
            self._peers[source.conn_id] = peer
        key = (source.conn_id, source.region)
        remote = self._remotes.get(key)
        if remote is None:
            remote = self.transport.import_(peer, source.region)
            self._remotes[key] = remote
        return peer, remote

    def _forget(self, conn_id: bytes) -> None:
        self._peers.pop(conn_id, None)
        for key in [k for k in self._remotes if k[0] == conn_id]:
            del self._remotes[key]

    def _buffer(self, staging: int) -> Any:
        if not 0 <= staging < len(self._staging):
            raise ValueError(f"staging buffer {staging} outside [0, {len(self._staging)})")
        return self._staging[staging]

    def _handle(self, staging: int) -> int:
        self._buffer(staging)
        if len(self._handles) != len(self._staging):
            raise TransportError("the receiver is closed")
        return self._handles[staging]

    @property
    def num_peers(self) -> int:
        return len(self._peers)

    def close(self) -> None:
        """Deregisters the staging buffers; the receiver must not be used afterwards."""
        while self._handles:
            self.transport.deregister(self._handles.pop())
        self._peers.clear()
        self._remotes.clear()


def _ranges(layout: KVLayout, mode: str, block_size: int) -> list[tuple[int, int]]:
    if mode == "bulk":
        return [(0, layout.total_bytes)]
    if mode == "per_layer":
        return layout.layer_ranges()
    return layout.block_fixed_ranges(block_size)
