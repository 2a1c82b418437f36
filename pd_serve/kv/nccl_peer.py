"""One connected pair of the NCCL transport: control socket, 2-rank communicator, stream.

Rank 0 is the region owner (it sends), rank 1 the reader (it receives). Lifecycle:
1. created on a connected control socket by the reader's `connect` or the owner's serving
   thread. Who reads the socket (`pump`): on the owner side only that serving thread (a raw
   sender just sleeps there); on the reader side whichever caller thread waits, one at a time;
2. `init_comm(uid)` joins the communicator, `warm_up` moves a few bytes so NCCL's lazy
   point-to-point connection exists before the first real read;
3. `post` enqueues groups of sends/receives on the pair's transfer stream and records an event
   after them; `wait_event` polls it (plus NCCL's asynchronous errors, the control socket and
   a deadline);
4. any failure goes through `fail`, which aborts the communicator (never waiting for the other
   side) and closes the socket exactly once; `close` does the same on purpose.
`lock` serialises the communicator calls (NCCL communicators are not thread-safe; the owner's
serving thread, a raw sender and `close` may share one) and is never held while waiting, so a
teardown from another thread aborts a stuck transfer instead of waiting for its deadline.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from pd_serve.kv.nccl_lib import CannExtError, Comm
from pd_serve.kv.nccl_wire import (
    ConnId,
    Done,
    Error,
    FrameReader,
    Message,
    PeerInfo,
    WireError,
    encode,
)
from pd_serve.kv.transport import TransportError, TransportTimeout

log = logging.getLogger(__name__)

MAX_GROUP_OPS = 1024  # sends/receives per NCCL group; bigger batches post several groups
SPIN_S = 0.02  # poll without sleeping this long, then every POLL_STEP_S
POLL_STEP_S = 1e-4
SOCKET_TIMEOUT_S = 30.0  # a control send that cannot drain this long means the peer is stuck


def scratch_tensor(device: int) -> Any:
    """The 64 bytes a pair's warm-up moves."""
    import torch

    return torch.zeros(64, dtype=torch.uint8, device=f"cuda:{device}")  # [64]


class Backoff:
    """Poll intervals: 0 for the first SPIN_S (short transfers finish fast), then a step."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def next(self) -> float:
        return 0.0 if time.monotonic() - self._start < SPIN_S else POLL_STEP_S


class NcclPeer:
    """One end of a pair (see the module docstring for the lifecycle)."""

    def __init__(self, sock: socket.socket, rank: int, device: int, label: str) -> None:
        import torch

        self._torch = torch
        sock.settimeout(SOCKET_TIMEOUT_S)
        self.sock = sock
        self.rank, self.peer_rank = rank, 1 - rank
        self.device = device
        self.label = label  # "owner pid 12 at host:port", for messages
        self.remote: PeerInfo | None = None  # the other side, from its hello
        self.conn: ConnId | None = None  # reader side: the owner's published connection id
        self.comm: Comm | None = None
        self.stream = torch.cuda.Stream(device=device)
        self.lock = threading.RLock()  # held for each communicator call, never while waiting
        self._post_lock = threading.Lock()  # one batch posts at a time: groups stay in order
        self.inbox: deque[Message] = deque()
        self.dead: str | None = None  # why the pair failed, once it did
        self._frames = FrameReader()
        # Owner side: only the serving thread reads; reader side: any thread, one at a time.
        self._socket_thread = threading.get_ident() if rank == 0 else None
        self._sock_lock = threading.Lock()
        self._scratch = scratch_tensor(device)

    # ---- control socket ----

    def send(self, msg: Message) -> None:
        try:
            self.sock.sendall(encode(msg))
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
        with self.lock, self._torch.cuda.device(self.device):
            self.check_alive()
            try:
                self.comm = Comm.init(uid, 2, self.rank)
            except CannExtError as exc:
                raise self.fail(f"NCCL communicator with {self.label} failed: {exc}") from exc
        self.wait_ready(deadline, "NCCL communicator init")

    def comm_busy(self) -> bool:
        """True while NCCL still sets something up; TransportError on an async error."""
        with self.lock:
            self.check_alive()  # under the lock: `fail` clears comm and sets dead together
            assert self.comm is not None, "comm_busy before init_comm"
            try:
                return self.comm.in_progress()
            except CannExtError as exc:
                raise self.fail(f"NCCL error with {self.label}: {exc}") from exc

    def wait_ready(self, deadline: float, what: str) -> None:
        backoff = Backoff()
        while self.comm_busy():
            self.check_inbox()
            if time.monotonic() > deadline:
                raise self.fail(f"{what} with {self.label} timed out", timeout=True)
            self.pump(backoff.next())

    def post(self, recv: bool, base: int, offsets: np.ndarray, lengths: np.ndarray,
             deadline: float) -> Any:
        """Enqueues the ranges (groups of <= MAX_GROUP_OPS) on the transfer stream; returns a
        torch.cuda.Event recorded after them."""
        with self._post_lock, self._torch.cuda.device(self.device):
            for start in range(0, len(offsets), MAX_GROUP_OPS):
                part = slice(start, start + MAX_GROUP_OPS)
                with self.lock:
                    self.check_alive()
                    assert self.comm is not None, "post before init_comm"
                    try:
                        busy = self.comm.post(recv, base, offsets[part], lengths[part],
                                              self.peer_rank, self.stream.cuda_stream)
                    except CannExtError as exc:
                        raise self.fail(f"posting to {self.label} failed: {exc}") from exc
                if busy:  # non-blocking communicator: wait until it is really enqueued
                    self.wait_ready(deadline, "enqueueing a transfer")
            event = self._torch.cuda.Event()
            event.record(self.stream)
            return event

    def wait_event(self, event: Any, deadline: float, what: str) -> None:
        """Returns once `event` completed; TransportError (the pair aborted) on an NCCL error,
        an error from the other side or a closed socket; TransportTimeout after `deadline`."""
        backoff = Backoff()
        while not event.query():
            self.check_inbox()
            self.comm_busy()
            if time.monotonic() > deadline:
                raise self.fail(f"{what} with {self.label} timed out", timeout=True)
            self.pump(backoff.next())

    def transfer(self, recv: bool, tensor: Any, deadline: float, what: str) -> None:
        """One whole-tensor send or receive, blocking until it completed."""
        nbytes = tensor.numel() * tensor.element_size()
        one = np.zeros(1, np.int64)
        event = self.post(recv, tensor.data_ptr(), one, one + nbytes, deadline)
        self.wait_event(event, deadline, what)

    def warm_up(self, deadline: float) -> None:
        """Owner sends 64 bytes, reader receives them: NCCL connects point-to-point lazily."""
        self.transfer(self.rank == 1, self._scratch, deadline, "NCCL warm-up transfer")

    # ---- failure and teardown ----

    def check_alive(self) -> None:
        if self.dead is not None:
            raise TransportError(f"connection to {self.label} failed earlier: {self.dead}")

    def fail(self, reason: str, timeout: bool = False) -> TransportError:
        """Marks the pair dead (first reason wins), aborts the communicator, closes the socket;
        returns the error for the caller to raise."""
        with self.lock:
            if self.dead is None:
                self.dead = reason
                self._teardown()
        return TransportTimeout(reason) if timeout else TransportError(reason)

    def close(self) -> None:
        """Aborts the communicator and closes the socket (idempotent)."""
        with self.lock:
            if self.dead is None:
                self.dead = "closed"
                self._teardown()

    def _teardown(self) -> None:
        comm, self.comm = self.comm, None
        if comm is not None:
            try:
                with self._torch.cuda.device(self.device):
                    comm.abort()
            except CannExtError as exc:
                log.warning("aborting the NCCL communicator with %s: %s", self.label, exc)
        try:
            self.sock.close()
        except OSError:
            pass

