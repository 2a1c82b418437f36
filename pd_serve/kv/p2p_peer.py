"""One connected pair of a collective-library transport: control socket, 2-rank communicator.

Backend-neutral; NcclPeer (pd_serve.kv.nccl_peer) and HcclPeer (pd_serve.kv.hccl_peer) add the
device side: the transfer stream, events, the communicator join and the warm-up bytes. The
owner of the regions sends, the reader receives; which rank each is, is the backend's choice.
Lifecycle:
1. created on a connected control socket by the reader's `connect` or the owner's serving
   thread. Who reads the socket (`pump`): on the owner side only that serving thread (a raw
   sender just sleeps there); on the reader side whichever caller thread waits, one at a time;
2. `init_comm(uid)` joins the communicator (polled: the join never blocks the caller past its
   deadline), `warm_up` moves a few bytes so the library's lazy point-to-point connection exists
   before the first real read;
3. `post` enqueues the ranges on the pair's transfer stream in groups and records an event
   after them; `wait_event` polls it (plus the library's asynchronous errors, the control
   socket and a deadline);
4. any failure goes through `fail`, which tears the communicator down (never waiting for the
   other side) and closes the socket exactly once; `close` does the same on purpose.
`lock` serialises the communicator calls (communicators are not thread-safe; the owner's
serving thread, a raw sender and `close` may share one) and is never held while waiting, so a
teardown from another thread ends a stuck transfer instead of waiting for its deadline.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import deque
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from pd_serve.kv._cx_lib import CannExtError
from pd_serve.kv.p2p_wire import (
    ConnId,
    Done,
    Error,
    FrameReader,
    Message,
    PeerInfo,
    WireError,
    WireSpec,
    encode,
)
from pd_serve.kv.transport import TransportError, TransportTimeout

log = logging.getLogger(__name__)

MAX_GROUP_OPS = 1024  # sends/receives per group (NCCL group, HcclBatchSendRecv call)
SPIN_S = 0.02  # poll without sleeping this long, then every POLL_STEP_S
POLL_STEP_S = 1e-4
SOCKET_TIMEOUT_S = 30.0  # a control send that cannot drain this long means the peer is stuck


class Comm(Protocol):
    """A communicator as the pair drives it (nccl_lib.Comm, hccl_lib.Comm)."""

    def in_progress(self) -> bool: ...

    def post(self, recv: bool, base: int, offsets: np.ndarray, lengths: np.ndarray, peer: int,
             stream: int) -> bool: ...

    def abort(self) -> None: ...


class Backoff:
    """Poll intervals: 0 for the first SPIN_S (short transfers finish fast), then a step."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def next(self) -> float:
        return 0.0 if time.monotonic() - self._start < SPIN_S else POLL_STEP_S


class P2PPeer:
    """One end of a pair (see the module docstring); subclasses supply the device hooks."""

    BACKEND = "?"  # the library's name, for messages
    DEVICE_KIND = "?"  # "cuda", "npu": device names in messages

    def __init__(self, sock: socket.socket, rank: int, reader: bool, device: int, label: str,
                 wire: WireSpec) -> None:
        sock.settimeout(SOCKET_TIMEOUT_S)
        self.sock = sock
        self.rank, self.peer_rank = rank, 1 - rank
        self.reader = reader
        self.device = device
        self.label = label  # "owner pid 12 at host:port", for messages
        self.remote: PeerInfo | None = None  # the other side, from its hello
        self.conn: ConnId | None = None  # reader side: the owner's published connection id
        self.comm: Comm | None = None
        self.lock = threading.RLock()  # held for each communicator call, never while waiting
        self._post_lock = threading.Lock()  # one batch posts at a time: groups stay in order
        self.inbox: deque[Message] = deque()
        self.dead: str | None = None  # why the pair failed, once it did
        self._wire = wire
        self._frames = FrameReader(wire)
        # Owner side: only the serving thread reads; reader side: any thread, one at a time.
        self._socket_thread = None if reader else threading.get_ident()
        self._sock_lock = threading.Lock()

    # ---- device hooks (subclasses) ----

    def device_scope(self) -> AbstractContextManager[Any]:
        """Makes the pair's device current for library calls made inside."""
        raise NotImplementedError

    def _join(self, uid: bytes) -> Comm:
        """Starts joining the communicator `uid` as `self.rank` of 2 (returns at once)."""
        raise NotImplementedError

    def _stream_handle(self) -> int:
        """The transfer stream as the library takes it (cudaStream_t / aclrtStream)."""
        raise NotImplementedError

    def _record(self) -> Any:
        """A new event recorded on the transfer stream (with `query() -> bool`)."""
        raise NotImplementedError

    def wait_for(self, event: Any) -> None:
        """Work posted after this on the transfer stream waits for `event` (no host wait)."""
        raise NotImplementedError

    def _warm_up_buffer(self) -> tuple[int, int]:
        """(device address, bytes) the warm-up moves."""
        raise NotImplementedError

    def _release(self) -> None:
        """Frees the pair's device resources after the communicator is gone (default none)."""

    # ---- control socket ----

    def send(self, msg: Message) -> None:
        try:
            self.sock.sendall(encode(msg, self._wire))
        except OSError as exc:
            raise self.fail(f"control connection to {self.label} broke: {exc}") from exc

    def _may_read(self) -> bool:
        return self._socket_thread is None or threading.get_ident() == self._socket_thread

    def pump(self, wait_s: float) -> None:
        """Moves what arrived (waiting up to wait_s) into `inbox`; a thread that may not read
        the socket now (see the module docstring) just sleeps here."""
        self.check_alive()
        if not self._may_read() or not self._sock_lock.acquire(blocking=False):
            time.sleep(wait_s)
            return
        try:
            readable = select.select([self.sock], [], [], wait_s)[0]
            data = self.sock.recv(1 << 20) if readable else None
            if data:
                self.inbox.extend(self._frames.feed(data))
        except OSError as exc:
            raise self.fail(f"control connection to {self.label} broke: {exc}") from exc
        except WireError as exc:
            raise self.fail(f"{self.label} sent a bad control message: {exc}") from exc
        finally:
            self._sock_lock.release()
        if data == b"":
            raise self.fail(f"{self.label} closed the control connection (process gone?)")

    def check_inbox(self) -> None:
        """Raises for an Error from the other side (the pair is then dead: its posted
        transfers can only be aborted); drops Done acks; keeps everything else in order.
        Only a thread that may read the socket looks."""
        if not self._may_read():
            return
        with self._sock_lock:
            if not any(isinstance(m, Error | Done) for m in self.inbox):
                return
            errors = [m for m in self.inbox if isinstance(m, Error)]
            self.inbox = deque(m for m in self.inbox if not isinstance(m, Error | Done))
        if errors:
            what = "" if errors[0].read_id is None else f" (read {errors[0].read_id})"
            raise self.fail(f"{self.label} reported an error{what}: {errors[0].message}")

    def expect(self, kind: type, deadline: float, what: str) -> Any:
        """The next message, which must be a `kind`; TransportTimeout after `deadline`."""
        backoff = Backoff()
        while not self.inbox:
            if time.monotonic() > deadline:
                raise self.fail(f"{what}: no answer from {self.label}", timeout=True)
            self.pump(max(backoff.next(), 0.01))
        msg = self.inbox.popleft()
        if isinstance(msg, Error):
            raise self.fail(f"{self.label} refused {what}: {msg.message}")
        if not isinstance(msg, kind):
            raise self.fail(f"{what}: expected {kind.__name__} from {self.label}, got "
                            f"{type(msg).__name__}")
        return msg

    # ---- communicator ----

    def init_comm(self, uid: bytes, deadline: float) -> None:
        with self.lock, self.device_scope():
            self.check_alive()
            try:
                self.comm = self._join(uid)
            except CannExtError as exc:
                raise self.fail(f"{self.BACKEND} communicator with {self.label} failed: "
                                f"{exc}") from exc
        self.wait_ready(deadline, f"{self.BACKEND} communicator init")

    def comm_busy(self) -> bool:
        """True while the library still sets something up; TransportError on an async error."""
        with self.lock:
            self.check_alive()  # under the lock: `fail` clears comm and sets dead together
            assert self.comm is not None, "comm_busy before init_comm"
            try:
                return self.comm.in_progress()
            except CannExtError as exc:
                raise self.fail(f"{self.BACKEND} error with {self.label}: {exc}") from exc

    def wait_ready(self, deadline: float, what: str) -> None:
        backoff = Backoff()
        while self.comm_busy():
            self.check_inbox()
            if time.monotonic() > deadline:
                raise self.fail(f"{what} with {self.label} timed out", timeout=True)
            self.pump(backoff.next())

    def post(self, recv: bool, base: int, offsets: np.ndarray, lengths: np.ndarray,
             deadline: float) -> Any:
        """Enqueues the ranges (groups of <= MAX_GROUP_OPS) on the transfer stream; returns an
        event recorded after them."""
        with self._post_lock, self.device_scope():
            for start in range(0, len(offsets), MAX_GROUP_OPS):
                part = slice(start, start + MAX_GROUP_OPS)
                with self.lock:
                    self.check_alive()
                    assert self.comm is not None, "post before init_comm"
                    try:
                        busy = self.comm.post(recv, base, offsets[part], lengths[part],
                                              self.peer_rank, self._stream_handle())
                    except CannExtError as exc:
                        raise self.fail(f"posting to {self.label} failed: {exc}") from exc
                if busy:  # non-blocking communicator: wait until it is really enqueued
                    self.wait_ready(deadline, "enqueueing a transfer")
            return self._record()

    def wait_event(self, event: Any, deadline: float, what: str) -> None:
        """Returns once `event` completed; TransportError (the pair torn down) on a library
        error, an error from the other side or a closed socket; TransportTimeout after
        `deadline`."""
        backoff = Backoff()
        while not event.query():
            self.check_inbox()
            self.comm_busy()
            if time.monotonic() > deadline:
                raise self.fail(f"{what} with {self.label} timed out", timeout=True)
            self.pump(backoff.next())

    def transfer(self, recv: bool, ptr: int, nbytes: int, deadline: float, what: str) -> None:
        """One whole-buffer send or receive, blocking until it completed."""
        one = np.zeros(1, np.int64)
        event = self.post(recv, ptr, one, one + nbytes, deadline)
        self.wait_event(event, deadline, what)

    def warm_up(self, deadline: float) -> None:
        """Owner sends a few bytes, reader receives them: the libraries connect lazily."""
        ptr, nbytes = self._warm_up_buffer()
        self.transfer(self.reader, ptr, nbytes, deadline, f"{self.BACKEND} warm-up transfer")

    # ---- failure and teardown ----

    def check_alive(self) -> None:
        if self.dead is not None:
            raise TransportError(f"connection to {self.label} failed earlier: {self.dead}")

    def fail(self, reason: str, timeout: bool = False) -> TransportError:
        """Marks the pair dead (first reason wins), tears the communicator down, closes the
        socket; returns the error for the caller to raise."""
        with self.lock:
            if self.dead is None:
                self.dead = reason
                self._teardown()
        return TransportTimeout(reason) if timeout else TransportError(reason)

    def close(self) -> None:
        """Tears the communicator down and closes the socket (idempotent)."""
        with self.lock:
            if self.dead is None:
                self.dead = "closed"
                self._teardown()

    def _teardown(self) -> None:
        comm, self.comm = self.comm, None
        if comm is not None:
            try:
                with self.device_scope():
                    comm.abort()
            except CannExtError as exc:
                log.warning("tearing down the %s communicator with %s: %s", self.BACKEND,
                            self.label, exc)
        try:
            self.sock.close()
        except OSError:
            pass
        self._release()
