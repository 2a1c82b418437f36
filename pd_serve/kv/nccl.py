"""The NCCL transport: one-sided READs of CUDA tensors between GPUs over 2-rank communicators.

Differences from the Transport ABC: `register` takes a contiguous CUDA tensor of the
transport's device (any dtype; ranges are bytes), not a numpy array (host arrays raise
TransportError). Everything else keeps the ABC's contract.

Lifecycle of a transport (caller: one thread at a time; serving threads run inside):
1. `NcclTransport(config)`: checks CUDA and libnccl (TransportError saying why not), binds its
   control listener; `conn_id()` (JSON: host, port, device index and uuid, pid) is published;
2. the owner (prefill) `register`s tensors and `export`s descriptors. A peer may read a region
   only after the bytes in it are complete: stage() synchronises, or the owner calls
   `set_ready_event(handle, event)` so the serving stream waits for that event first;
3. the reader (decode) `connect`s (a control connection, an ncclUniqueId it sends, both sides
   join a communicator: rank 0 owner, rank 1 reader; cached per owner, made on demand, so
   instances may join later), `import_`s descriptors and runs `read_batch` (or
   `read_batch_async` + `NcclRead.wait`): one control message lists the ranges, the owner posts
   one ncclSend per range in NCCL groups, the reader the matching ncclRecvs on its transfer
   stream. On a timeout, an NCCL error or a peer that went away the pair's communicator is
   aborted and dropped (the next connect makes a new one): TransportTimeout / TransportError,
   never a hang;
4. `deregister` every handle (waits for reads being served), then `close()`.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import time
from typing import Any

import numpy as np

from pd_serve.kv import nccl_lib
from pd_serve.kv.nccl_config import NcclConfig, nccl_unavailable_reason, peer_info
from pd_serve.kv.nccl_peer import NcclPeer
from pd_serve.kv.nccl_read import NcclRead, positive
from pd_serve.kv.nccl_regions import Regions, check_tensor
from pd_serve.kv.nccl_server import ControlServer
from pd_serve.kv.nccl_wire import (
    ConnId,
    Hello,
    HelloOk,
    ReadRequest,
    RegionDesc,
    WireError,
    check_ranges,
    read_table,
)
from pd_serve.kv.transport import Read, Transport, TransportError, TransportTimeout

__all__ = ["NcclConfig", "NcclRead", "NcclTransport", "nccl_unavailable_reason"]

_DEREGISTER_WAIT_S = 30.0


class NcclTransport(Transport):
    """The NCCL transport (see the module docstring)."""

    def __init__(self, config: NcclConfig | None = None) -> None:
        self.config = config or NcclConfig()
        reason = nccl_unavailable_reason(self.config.device)
        if reason is not None:
            raise TransportError(f"NCCL transport unavailable: {reason}")
        # Point-to-point communicators never use NVLink SHARP; its multicast buffers would
        # cost GPU memory per pair (and some hosts must not use it at all).
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        cfg = self.config
        self._regions = Regions(cfg.device)
        self._info = peer_info(cfg.advertise_host or cfg.bind_host, cfg.device)
        self._nonce = secrets.token_hex(8)
        self._peers: dict[bytes, NcclPeer] = {}
        self._read_ids = itertools.count()
        self._server = ControlServer(self._regions, self._info, (cfg.bind_host, cfg.port),
                                     cfg.connect_timeout_s, cfg.max_serve_s)
        self._closed = False

    @property
    def device(self) -> int:
        return self.config.device

    def conn_id(self) -> bytes:
        return ConnId(self._info.host, self._server.port, self._info, self._nonce).encode()

    def register(self, array: Any) -> int:
        """Registers a contiguous CUDA tensor of this transport's device; returns its handle."""
        return self._regions.add(array)

    def set_ready_event(self, handle: int, event: Any) -> None:
        """Reads of this region are served only after `event` (a torch.cuda.Event recorded
        after the writes) completed; the alternative is synchronising before exporting."""
        self._regions.set_ready(handle, event)

    def export(self, handle: int) -> bytes:
        return RegionDesc(self._nonce, handle, self._regions.get(handle).nbytes).encode()

    def deregister(self, handle: int) -> None:
        self._regions.remove(handle, _DEREGISTER_WAIT_S)

    @property
    def num_registered(self) -> int:
        return len(self._regions)

    @property
    def num_peers(self) -> int:
        """Pairs this transport reads from plus pairs it serves (leak checks)."""
        return len(self._peers) + self._server.num_pairs

    def connect(self, conn_id: bytes, timeout_s: float) -> NcclPeer:
        peer = self._peers.get(conn_id)
        if peer is not None and peer.dead is None:
            return peer
        self._peers.pop(conn_id, None)
        owner = self._parse(ConnId.parse, conn_id)
        if owner.peer.uuid and owner.peer.uuid == self._info.uuid:
            raise TransportError(f"the owner at {owner.host}:{owner.port} is on this reader's "
                                 f"GPU ({owner.peer.uuid}); NCCL needs two devices")
        deadline = time.monotonic() + positive(timeout_s)
        try:
            sock = socket.create_connection((owner.host, owner.port), timeout=timeout_s)
        except TimeoutError as exc:
            raise TransportTimeout(f"connecting to {owner.host}:{owner.port} timed out") from exc
        except OSError as exc:
            raise TransportError(f"cannot connect to {owner.host}:{owner.port}: {exc}") from exc
        peer = NcclPeer(sock, 1, self.device, f"owner pid {owner.peer.pid} at "
                                              f"{owner.host}:{owner.port}")
        try:
            self._join(peer, owner, deadline, timeout_s)
        except BaseException:
            peer.close()
            raise
        self._peers[conn_id] = peer
        return peer

    def _join(self, peer: NcclPeer, owner: ConnId, deadline: float, timeout_s: float) -> None:
        import torch

        with torch.cuda.device(self.device):
            try:
                uid = nccl_lib.unique_id()
            except nccl_lib.CannExtError as exc:
                raise TransportError(f"ncclGetUniqueId failed: {exc}") from exc
            peer.send(Hello(uid, self._info, _ms(timeout_s)))
            peer.remote = peer.expect(HelloOk, deadline, "the hello").peer
            peer.conn = owner
            peer.init_comm(uid, deadline)
            peer.warm_up(deadline)

    def import_(self, peer: Any, desc: bytes) -> RegionDesc:
        region = self._parse(RegionDesc.parse, desc)
        owner = self._live(peer).conn
        if owner is None or owner.nonce != region.nonce:
            raise TransportError("region descriptor belongs to another endpoint than this peer")
        return region

    def read_batch(self, peer: Any, local: int, remote: Any, reads: list[Read] | np.ndarray,
                   timeout_s: float) -> None:
        self.read_batch_async(peer, local, remote, reads, timeout_s).wait()

    def read_batch_async(self, peer: Any, local: int, remote: Any,
                         reads: list[Read] | np.ndarray, timeout_s: float,
                         local_ready: Any = None) -> NcclRead:
        """Posts the reads and returns at once. The transfer stream first waits for
        `local_ready` (a torch.cuda.Event) if given, else for the caller's current stream, so
        earlier work on the local region (a scatter of the last read) cannot race the new
        bytes. `reads`: Read tuples or an [n, 3] int64 array of the same columns."""
        p = self._live(peer)
        if not isinstance(remote, RegionDesc) or p.conn is None or remote.nonce != p.conn.nonce:
            raise TransportError("remote is not a region imported from this peer")
        table = self._parse(read_table, reads)  # [n, 3] (local offset, remote offset, length)
        region = self._regions.get(local)
        self._parse(check_ranges, table[:, 0], table[:, 2], region.nbytes, "local")
        self._parse(check_ranges, table[:, 1], table[:, 2], remote.nbytes, "remote")
        deadline = time.monotonic() + positive(timeout_s)
        read_id = next(self._read_ids)
        try:  # drop acks of earlier reads; a closed connection shows here, before posting
            p.pump(0.0)
            p.check_inbox()
        except TransportError:
            self._forget(p)
            raise
        self._regions.pin(local)
        try:
            self._wait_local(p, local_ready)
            p.send(ReadRequest(read_id, remote.handle, _ms(timeout_s), table[:, 1:]))
            event = p.post(True, region.ptr, table[:, 0], table[:, 2], deadline)
        except BaseException:  # the owner may already serve it: the pair cannot be trusted
            self._regions.unpin(local)
            p.close()
            self._forget(p)
            raise
        what = f"read {read_id} ({len(table)} ranges, {int(table[:, 2].sum())} bytes)"
        return NcclRead(p, event, deadline, what, lambda failed: self._read_done(p, local, failed))

    def _read_done(self, peer: NcclPeer, local: int, failed: bool) -> None:
        self._regions.unpin(local)
        if failed:
            self._forget(peer)

    def _wait_local(self, peer: NcclPeer, local_ready: Any) -> None:
        import torch

        if local_ready is not None:
            peer.stream.wait_event(local_ready)
        else:
            peer.stream.wait_stream(torch.cuda.current_stream(self.device))

    def accept_peer(self, timeout_s: float) -> NcclPeer:
        """Owner side: the next live reader pair that finished its handshake (raw transfers)."""
        import queue

        deadline = time.monotonic() + positive(timeout_s)
        while True:
            try:
                peer = self._server.accepted.get(timeout=max(deadline - time.monotonic(), 1e-3))
            except queue.Empty as exc:
                raise TransportTimeout(f"no reader connected within {timeout_s} s") from exc
            if peer.dead is None:
                return peer

    def send_contiguous(self, peer: NcclPeer, tensor: Any, timeout_s: float) -> None:
        """Raw baseline: one ncclSend of the whole tensor to the pair's other rank; blocks. Not
        while reads are being served on the same pair."""
        self._raw(peer, tensor, False, timeout_s)

    def recv_contiguous(self, peer: NcclPeer, tensor: Any, timeout_s: float) -> None:
        """Raw baseline: one ncclRecv of the whole tensor from the pair's other rank; blocks."""
        self._raw(peer, tensor, True, timeout_s)

    def _raw(self, peer: NcclPeer, tensor: Any, recv: bool, timeout_s: float) -> None:
        check_tensor(tensor, self.device)
        p = self._live(peer)
        deadline = time.monotonic() + positive(timeout_s)
        try:
            self._wait_local(p, None)
            p.transfer(recv, tensor, deadline, "raw " + ("receive" if recv else "send"))
        except TransportError:
            self._forget(p)
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.stop()
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()

    # ---- helpers ----

    @property
    def stall_s(self) -> float:
        """Tests: the owner sleeps this long before posting each read's sends."""
        return self._server.stall_s

    @stall_s.setter
    def stall_s(self, value: float) -> None:
        self._server.stall_s = value

    def _live(self, peer: Any) -> NcclPeer:
        if not isinstance(peer, NcclPeer):
            raise TransportError(f"not a peer of an NcclTransport: {type(peer).__name__}")
        peer.check_alive()
        return peer

    def _forget(self, peer: NcclPeer) -> None:
        for key in [k for k, v in self._peers.items() if v is peer]:
            del self._peers[key]

    @staticmethod
    def _parse(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except WireError as exc:
            raise TransportError(str(exc)) from exc


def _ms(timeout_s: float) -> int:
    return max(1, min(int(timeout_s * 1000), (1 << 31) - 1))
