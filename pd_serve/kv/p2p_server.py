"""Owner side of a collective-library transport: the control listener, a serving thread per reader.

Backend-neutral: the transport hands in a factory that makes its kind of pair (NcclPeer,
HcclPeer) on the serving thread. Lifecycle:
1. `ControlServer(...)` binds the listener and starts the accept thread;
2. per reader connection a serving thread (rank 0 of the pair): Hello -> HelloOk, communicator
   init, warm-up; then read requests: each one's region is pinned and its ranges checked, the
   ranges are posted as sends on the pair's stream (after the region's ready event, if one was
   set) and Done goes back once they completed (Error when refused). The pair dies, and its
   pins are released, on a closed socket, a library error or a read past its deadline;
3. `stop()` closes the listener, aborts every pair and joins the threads.
The serving threads never block the owner's caller: registering and staging go on meanwhile.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pd_serve.kv.p2p_peer import P2PPeer
from pd_serve.kv.p2p_regions import Regions
from pd_serve.kv.p2p_wire import (
    Done,
    Error,
    Hello,
    HelloOk,
    PeerInfo,
    ReadRequest,
    WireError,
    check_ranges,
)
from pd_serve.kv.transport import TransportError

log = logging.getLogger(__name__)


@dataclass
class _Serving:
    read_id: int
    handle: int
    event: Any  # the device event recorded after the read's sends
    deadline: float


class ControlServer:
    """The owner's listener and serving threads (see the module docstring)."""

    def __init__(self, regions: Regions, info: PeerInfo, bind: tuple[str, int],
                 connect_timeout_s: float, max_serve_s: float,
                 new_peer: Callable[[socket.socket, str], P2PPeer], backend: str) -> None:
        self._new_peer = new_peer  # (socket, label) -> the owner's end, on the serving thread
        self._backend = backend  # "NCCL": messages and thread names
        self._regions = regions
        self._info = info
        self._connect_timeout_s = connect_timeout_s
        self._max_serve_s = max_serve_s
        self._listener = socket.create_server(bind)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._peers: set[P2PPeer] = set()
        self.accepted: queue.Queue[P2PPeer] = queue.Queue()  # pairs ready for raw transfers
        self.stall_s = 0.0  # tests: sleep this long before posting a read's sends
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"pd-{backend.lower()}-accept-{self.port}")
        self._acceptor.start()

    @property
    def num_pairs(self) -> int:
        with self._lock:
            return len(self._peers)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Closes the listener, aborts every pair, joins the threads (idempotent)."""
        self._stop.set()
        self._listener.close()
        self._acceptor.join(timeout_s)
        with self._lock:
            peers, threads = list(self._peers), list(self._threads)
        for peer in peers:
            peer.close()
        for thread in threads:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("%s serving thread %s did not stop in %s s", self._backend,
                            thread.name, timeout_s)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not select.select([self._listener], [], [], 0.2)[0]:
                    continue
                sock, addr = self._listener.accept()
            except (OSError, ValueError):  # closed by stop()
                return
            thread = threading.Thread(target=self._serve_conn, args=(sock, addr), daemon=True,
                                      name=f"pd-{self._backend.lower()}-serve-{addr[1]}")
            with self._lock:
                if self._stop.is_set():
                    sock.close()
                    return
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve_conn(self, sock: socket.socket, addr: Any) -> None:
        peer = None
        try:
            peer = self._new_peer(sock, f"reader at {addr[0]}:{addr[1]}")
            with self._lock:
                self._peers.add(peer)
            if self._stop.is_set():  # stop() may have missed it
                return
            self._handshake(peer)
            self.accepted.put(peer)
            self._serve(peer)
        except TransportError as exc:
            log.info("%s serving ended: %s", self._backend, exc)
        except Exception:
            log.exception("%s serving thread failed", self._backend)
        finally:
            if peer is None:
                sock.close()
            else:
                peer.close()
                with self._lock:
                    self._peers.discard(peer)

    def _handshake(self, peer: P2PPeer) -> None:
        deadline = time.monotonic() + self._connect_timeout_s
        hello: Hello = peer.expect(Hello, deadline, "the hello")
        peer.remote = hello.peer
        peer.label = (f"reader pid {hello.peer.pid} at {hello.peer.host} "
                      f"({peer.DEVICE_KIND}:{hello.peer.device})")
        if hello.peer.uuid and hello.peer.uuid == self._info.uuid:
            why = (f"reader and owner share device {self._info.uuid}; {self._backend} needs two "
                   f"devices")
            peer.send(Error(None, why))
            raise peer.fail(why)
        peer.send(HelloOk(self._info))
        deadline = min(deadline, time.monotonic() + hello.timeout_ms / 1000)
        peer.init_comm(hello.uid, deadline)
        peer.warm_up(deadline)

    def _serve(self, peer: P2PPeer) -> None:
        pending: deque[_Serving] = deque()
        try:
            while not self._stop.is_set():
                peer.pump(0.001 if pending else 0.1)
                peer.check_inbox()
                while peer.inbox:
                    msg = peer.inbox.popleft()
                    if not isinstance(msg, ReadRequest):
                        raise peer.fail(f"unexpected {type(msg).__name__} from {peer.label}")
                    self._start(peer, msg, pending)
                self._reap(peer, pending)
        finally:
            for serving in pending:
                self._regions.unpin(serving.handle)

    def _start(self, peer: P2PPeer, req: ReadRequest, pending: deque[_Serving]) -> None:
        try:
            region = self._regions.pin(req.region)
        except TransportError as exc:
            peer.send(Error(req.read_id, f"read {req.read_id}: {exc}"))
            return
        try:
            check_ranges(req.ranges[:, 0], req.ranges[:, 1], region.nbytes, "remote")
            if self.stall_s:
                time.sleep(self.stall_s)
            deadline = time.monotonic() + min(req.timeout_ms / 1000, self._max_serve_s)
            if region.ready is not None:
                peer.wait_for(region.ready)
            event = peer.post(False, region.ptr, req.ranges[:, 0], req.ranges[:, 1], deadline)
        except WireError as exc:
            self._regions.unpin(req.region)
            peer.send(Error(req.read_id, f"read {req.read_id}: {exc}"))
            return
        except BaseException:
            self._regions.unpin(req.region)
            raise
        pending.append(_Serving(req.read_id, req.region, event, deadline))

    def _reap(self, peer: P2PPeer, pending: deque[_Serving]) -> None:
        while pending and pending[0].event.query():
            done = pending.popleft()
            self._regions.unpin(done.handle)
            peer.send(Done(done.read_id))
        if not pending:
            return
        peer.comm_busy()  # raises (tearing the pair down) on an asynchronous library error
        head = pending[0]
        if time.monotonic() > head.deadline:
            why = f"serving read {head.read_id} to {peer.label} timed out"
            try:
                peer.send(Error(head.read_id, why))
            except TransportError:
                pass
            raise peer.fail(why, timeout=True)
