"""One-sided READs of device memory over 2-rank communicators of a collective library.

Backend-neutral: NcclTransport (CUDA, pd_serve.kv.nccl) and HcclTransport (Ascend,
pd_serve.kv.hccl) subclass `P2PTransport` with their pair class, wire spec, regions and id
maker. Differences from the Transport ABC: `register` takes device memory of the transport's
device (ranges are bytes), not a numpy array (host arrays raise TransportError). Everything
else keeps the ABC's contract.

Lifecycle of a transport (caller: one thread at a time; serving threads run inside):
1. constructed: checks the device and the library (TransportError saying why not), binds its
   control listener; `conn_id()` (JSON: host, port, device index and uuid, pid) is published;
2. the owner (prefill) `register`s memory and `export`s descriptors. A peer may read a region
   only after the bytes in it are complete: the owner synchronises first, or calls
   `set_ready_event(handle, event)` so the serving stream waits for that event;
3. the reader (decode) `connect`s (a control connection, a communicator id it makes and sends,
   both sides join a 2-rank communicator; cached per owner, made on demand, so instances may
   join later), `import_`s descriptors and runs `read_batch` (or `read_batch_async` +
   `wait`): one control message lists the ranges, the owner posts one send per range in
   groups, the reader the matching receives on its transfer stream. On a timeout, a library
   error or a peer that went away the pair's communicator is torn down and dropped (the next
   connect makes a new one): TransportTimeout / TransportError, never a hang;
4. `deregister` every handle (waits for reads being served), then `close()`.
"""

from __future__ import annotations

import itertools
import queue
import secrets
import socket
import time
from typing import Any, ClassVar

import numpy as np

from pd_serve.kv.p2p_config import P2PConfig
from pd_serve.kv.p2p_peer import P2PPeer
from pd_serve.kv.p2p_read import P2PRead, positive
from pd_serve.kv.p2p_regions import Regions
from pd_serve.kv.p2p_server import ControlServer
from pd_serve.kv.p2p_wire import (
    ConnId,
    Hello,
    HelloOk,
    PeerInfo,
    ReadRequest,
    RegionDesc,
    WireError,
    check_ranges,
    read_table,
)
from pd_serve.kv.transport import Read, Transport, TransportError, TransportTimeout

DEREGISTER_WAIT_S = 30.0


class P2PTransport(Transport):
    """The shared transport (see the module docstring); subclasses fill in the hooks."""

    BACKEND: ClassVar[str] = "?"  # "NCCL"
    DEVICE_NAME: ClassVar[str] = "device"  # "GPU": in the same-device refusal
    PEER: ClassVar[type[P2PPeer]] = P2PPeer
    CONN_ID: ClassVar[type[ConnId]] = ConnId
    REGION_DESC: ClassVar[type[RegionDesc]] = RegionDesc

    def __init__(self, config: P2PConfig) -> None:
        self.config = config
        reason = self._unavailable_reason(config.device)
        if reason is not None:
            raise TransportError(f"{self.BACKEND} transport unavailable: {reason}")
        self._regions = self._new_regions(config.device)
        self._info = self._peer_info(config.advertise_host or config.bind_host, config.device)
        self._nonce = secrets.token_hex(8)
        self._peers: dict[bytes, P2PPeer] = {}
        self._read_ids = itertools.count()
        self._server = ControlServer(self._regions, self._info, (config.bind_host, config.port),
                                     config.connect_timeout_s, config.max_serve_s,
                                     self._owner_peer, self.BACKEND)
        self._closed = False

    # ---- backend hooks ----

    def _unavailable_reason(self, device: int) -> str | None:
        raise NotImplementedError

    def _new_regions(self, device: int) -> Regions:
        raise NotImplementedError

    def _peer_info(self, host: str, device: int) -> PeerInfo:
        raise NotImplementedError

    def _owner_peer(self, sock: socket.socket, label: str) -> P2PPeer:
        """The owner's end of a new pair, made on its serving thread."""
        raise NotImplementedError

    def _reader_peer(self, sock: socket.socket, label: str) -> P2PPeer:
        raise NotImplementedError

    def _make_uid(self) -> bytes:
        """A fresh communicator id (the reader makes it); TransportError on failure."""
        raise NotImplementedError

    def _wait_local(self, peer: P2PPeer, local_ready: Any) -> None:
        """Orders the transfer stream after earlier work on the local region."""
        raise NotImplementedError

    def _span(self, obj: Any) -> tuple[int, int]:
        """(device address, bytes) of a buffer for a raw transfer."""
        return self._regions.check(obj)

    def _new_read(self, peer: P2PPeer, event: Any, deadline: float, what: str,
                  local: int) -> P2PRead:
        return P2PRead(peer, event, deadline, what,
                       lambda failed: self._read_done(peer, local, failed))

    # ---- the Transport interface ----

    @property
    def device(self) -> int:
        return self.config.device

    def conn_id(self) -> bytes:
        return self.CONN_ID(self._info.host, self._server.port, self._info, self._nonce).encode()

    def register(self, array: Any) -> int:
        """Registers device memory of this transport's device; returns its handle."""
        return self._regions.add(array)

    def set_ready_event(self, handle: int, event: Any) -> None:
        """Reads of this region are served only after `event` (recorded after the writes)
        completed; the alternative is synchronising before exporting."""
        self._regions.set_ready(handle, event)

    def export(self, handle: int) -> bytes:
        return self.REGION_DESC(self._nonce, handle, self._regions.get(handle).nbytes).encode()

    def deregister(self, handle: int) -> None:
        self._regions.remove(handle, DEREGISTER_WAIT_S)

    @property
    def num_registered(self) -> int:
        return len(self._regions)

    @property
    def num_peers(self) -> int:
        """Pairs this transport reads from plus pairs it serves (leak checks)."""
        return len(self._peers) + self._server.num_pairs

    def connect(self, conn_id: bytes, timeout_s: float) -> P2PPeer:
        peer = self._peers.get(conn_id)
        if peer is not None and peer.dead is None:
            return peer
        self._peers.pop(conn_id, None)
        owner = self._parse(self.CONN_ID.parse, conn_id)
        if owner.peer.uuid and owner.peer.uuid == self._info.uuid:
            raise TransportError(f"the owner at {owner.host}:{owner.port} is on this reader's "
                                 f"{self.DEVICE_NAME} ({owner.peer.uuid}); {self.BACKEND} "
                                 f"needs two devices")
        deadline = time.monotonic() + positive(timeout_s)
        try:
            sock = socket.create_connection((owner.host, owner.port), timeout=timeout_s)
        except TimeoutError as exc:
            raise TransportTimeout(f"connecting to {owner.host}:{owner.port} timed out") from exc
        except OSError as exc:
            raise TransportError(f"cannot connect to {owner.host}:{owner.port}: {exc}") from exc
        try:
            peer = self._reader_peer(sock, f"owner pid {owner.peer.pid} at "
                                           f"{owner.host}:{owner.port}")
        except BaseException:
            sock.close()
            raise
        try:
            self._join(peer, owner, deadline, timeout_s)
        except BaseException:
            peer.close()
            raise
        self._peers[conn_id] = peer
        return peer

    def _join(self, peer: P2PPeer, owner: ConnId, deadline: float, timeout_s: float) -> None:
        with peer.device_scope():
            uid = self._make_uid()
            peer.send(Hello(uid, self._info, ms(timeout_s)))
            peer.remote = peer.expect(HelloOk, deadline, "the hello").peer
            peer.conn = owner
            peer.init_comm(uid, deadline)
            peer.warm_up(deadline)

    def import_(self, peer: Any, desc: bytes) -> RegionDesc:
        region = self._parse(self.REGION_DESC.parse, desc)
        owner = self._live(peer).conn
        if owner is None or owner.nonce != region.nonce:
            raise TransportError("region descriptor belongs to another endpoint than this peer")
        return region

    def read_batch(self, peer: Any, local: int, remote: Any, reads: list[Read] | np.ndarray,
                   timeout_s: float) -> None:
        self.read_batch_async(peer, local, remote, reads, timeout_s).wait()

    def read_batch_async(self, peer: Any, local: int, remote: Any,
                         reads: list[Read] | np.ndarray, timeout_s: float,
                         local_ready: Any = None) -> P2PRead:
        """Posts the reads and returns at once; `wait()` the result. The transfer stream first
        waits for `local_ready` (an event of the backend) if given (see the subclass for what
        happens otherwise), so earlier work on the local region cannot race the new bytes.
        `reads`: Read tuples or an [n, 3] int64 array of the same columns."""
        p = self._live(peer)
        if not isinstance(remote, self.REGION_DESC) or p.conn is None \
                or remote.nonce != p.conn.nonce:
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
            p.send(ReadRequest(read_id, remote.handle, ms(timeout_s), table[:, 1:]))
            event = p.post(True, region.ptr, table[:, 0], table[:, 2], deadline)
        except BaseException:  # the owner may already serve it: the pair cannot be trusted
            self._regions.unpin(local)
            p.close()
            self._forget(p)
            raise
        what = f"read {read_id} ({len(table)} ranges, {int(table[:, 2].sum())} bytes)"
        return self._new_read(p, event, deadline, what, local)

    def _read_done(self, peer: P2PPeer, local: int, failed: bool) -> None:
        self._regions.unpin(local)
        if failed:
            self._forget(peer)

    def accept_peer(self, timeout_s: float) -> P2PPeer:
        """Owner side: the next live reader pair that finished its handshake (raw transfers)."""
        deadline = time.monotonic() + positive(timeout_s)
        while True:
            try:
                peer = self._server.accepted.get(timeout=max(deadline - time.monotonic(), 1e-3))
            except queue.Empty as exc:
                raise TransportTimeout(f"no reader connected within {timeout_s} s") from exc
            if peer.dead is None:
                return peer

    def send_contiguous(self, peer: P2PPeer, buffer: Any, timeout_s: float) -> None:
        """Raw baseline: one send of the whole buffer to the pair's other rank; blocks. Not
        while reads are being served on the same pair."""
        self._raw(peer, buffer, False, timeout_s)

    def recv_contiguous(self, peer: P2PPeer, buffer: Any, timeout_s: float) -> None:
        """Raw baseline: one receive of the whole buffer from the pair's other rank; blocks."""
        self._raw(peer, buffer, True, timeout_s)

    def _raw(self, peer: P2PPeer, buffer: Any, recv: bool, timeout_s: float) -> None:
        ptr, nbytes = self._span(buffer)
        p = self._live(peer)
        deadline = time.monotonic() + positive(timeout_s)
        try:
            self._wait_local(p, None)
            p.transfer(recv, ptr, nbytes, deadline, "raw " + ("receive" if recv else "send"))
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

    def _live(self, peer: Any) -> P2PPeer:
        if not isinstance(peer, self.PEER):
            raise TransportError(f"not a peer of an {type(self).__name__}: "
                                 f"{type(peer).__name__}")
        peer.check_alive()
        return peer

    def _forget(self, peer: P2PPeer) -> None:
        for key in [k for k, v in self._peers.items() if v is peer]:
            del self._peers[key]

    @staticmethod
    def _parse(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except WireError as exc:
            raise TransportError(str(exc)) from exc


def ms(timeout_s: float) -> int:
    """A timeout in whole milliseconds for the wire: >= 1, < 2^31."""
    return max(1, min(int(timeout_s * 1000), (1 << 31) - 1))
