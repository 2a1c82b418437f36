"""The transport interface the KV sender and receiver use, with its cann_ext and fake forms.

Caller: the hand-off code of one instance, one thread at a time per transport; every call
blocks until done. Lifecycle of a transport:
1. constructed (cann_ext: an endpoint bound to an address); `conn_id()` is published;
2. `register(array)` buffers that transfers touch (slot buffers, staging buffers); the caller
   keeps the array alive until `deregister(handle)`; `export(handle)` describes one for peers;
3. a reader `connect(conn_id)`s to a peer, `import_`s an exported descriptor and runs
   `read_batch` (one-sided READs from the peer's region into a local registered region);
4. `deregister` every handle, then `close()`. `num_registered` is for leak checks.
Failures raise TransportError (TransportTimeout when `timeout_s` passed).

`FakeTransport` is for unit tests only: endpoints of one process, memcpy between registered
numpy buffers, plus injected stalls for timeout tests.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import numpy as np


class TransportError(RuntimeError):
    """A transfer, connection or registration failed."""


class TransportTimeout(TransportError):
    """A transfer did not complete within its timeout."""


class Read(NamedTuple):
    """One byte range of a read batch: remote region bytes -> local region bytes."""

    local_offset: int
    remote_offset: int
    length: int


class Transport(ABC):
    """One endpoint of a KV transport (see the module docstring for the lifecycle)."""

    @abstractmethod
    def conn_id(self) -> bytes:
        """The blob peers pass to `connect`."""

    @abstractmethod
    def register(self, array: np.ndarray) -> int:
        """Registers a C-contiguous host array; returns its handle."""

    @abstractmethod
    def export(self, handle: int) -> bytes:
        """Descriptor of a registered region for a peer's `import_`."""

    @abstractmethod
    def deregister(self, handle: int) -> None:
        """Forgets a registration."""

    @property
    @abstractmethod
    def num_registered(self) -> int:
        """Live registrations (leak checks)."""

    @abstractmethod
    def connect(self, conn_id: bytes, timeout_s: float) -> Any:
        """Connects to a peer; returns an opaque peer."""

    @abstractmethod
    def import_(self, peer: Any, desc: bytes) -> Any:
        """Imports a peer's exported region; returns an opaque remote region."""

    @abstractmethod
    def read_batch(self, peer: Any, local: int, remote: Any, reads: list[Read],
                   timeout_s: float) -> None:
        """Reads every range of `remote` into `local` as one posted batch; blocks until all
        completed (TransportTimeout after `timeout_s`)."""

    @abstractmethod
    def close(self) -> None:
        """Releases the endpoint (registrations should be gone by then)."""


_FAKE_ENDPOINTS: dict[bytes, FakeTransport] = {}
_FAKE_LOCK = threading.Lock()
_FAKE_IDS = itertools.count()


class FakeTransport(Transport):
    """In-process transport for unit tests: READs are memcpy between registered buffers.

    `stall_s` makes every read wait that long first (a read whose stall exceeds its timeout
    raises TransportTimeout after the timeout, nothing copied)."""

    def __init__(self) -> None:
        self._id = f"fake:{next(_FAKE_IDS)}".encode()
        self._buffers: dict[int, np.ndarray] = {}  # handle -> flat uint8 view
        self._handles = itertools.count(1)
        self.stall_s = 0.0
        self.num_reads = 0  # ranges read through this endpoint (block-fixed counts each)
        with _FAKE_LOCK:
            _FAKE_ENDPOINTS[self._id] = self

    def conn_id(self) -> bytes:
        return self._id

    def register(self, array: np.ndarray) -> int:
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or not array.nbytes:
            raise TransportError("register needs a non-empty C-contiguous numpy array")
        handle = next(self._handles)
        self._buffers[handle] = array.reshape(-1).view(np.uint8)
        return handle

    def export(self, handle: int) -> bytes:
        self._buffer(handle)
        return json.dumps({"endpoint": self._id.decode(), "handle": handle}).encode()

    def deregister(self, handle: int) -> None:
        self._buffer(handle)
        del self._buffers[handle]

    @property
    def num_registered(self) -> int:
        return len(self._buffers)

    def connect(self, conn_id: bytes, timeout_s: float) -> FakeTransport:
        with _FAKE_LOCK:
            peer = _FAKE_ENDPOINTS.get(conn_id)
        if peer is None:
            raise TransportError(f"no endpoint {conn_id!r} to connect to")
        return peer

    def import_(self, peer: Any, desc: bytes) -> tuple[FakeTransport, int]:
        try:
            data = json.loads(desc)
            endpoint, handle = data["endpoint"].encode(), int(data["handle"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TransportError(f"bad region descriptor: {exc}") from exc
        if not isinstance(peer, FakeTransport) or peer._id != endpoint:
            raise TransportError("region descriptor belongs to another peer")
        return peer, handle

    def read_batch(self, peer: Any, local: int, remote: Any, reads: list[Read],
                   timeout_s: float) -> None:
        if self.stall_s > timeout_s:
            time.sleep(timeout_s)
            raise TransportTimeout(f"read of {len(reads)} ranges timed out after {timeout_s} s")
        time.sleep(self.stall_s)
        dst = self._buffer(local)
        owner: FakeTransport = remote[0]
        handle: int = remote[1]
        if owner._id not in _FAKE_ENDPOINTS:
            raise TransportError("peer endpoint is closed")
        src = owner._buffer(handle)
        for r in reads:  # every range is checked before anything moves
            if r.length <= 0 or r.remote_offset < 0 or r.local_offset < 0 \
                    or r.remote_offset + r.length > src.size \
                    or r.local_offset + r.length > dst.size:
                raise TransportError(f"read {r} is outside the regions ({src.size} remote, "
                                     f"{dst.size} local bytes)")
        for r in reads:
            dst[r.local_offset:r.local_offset + r.length] = \
                src[r.remote_offset:r.remote_offset + r.length]
        self.num_reads += len(reads)

    def close(self) -> None:
        with _FAKE_LOCK:
            _FAKE_ENDPOINTS.pop(self._id, None)

    def _buffer(self, handle: int) -> np.ndarray:
        buf = self._buffers.get(handle)
        if buf is None:
            raise TransportError(f"unknown registration handle {handle}")
        return buf


class CannExtTransport(Transport):
    """The real transport: a cann_ext host-TCP endpoint (NCCL/HCCL later, same calls).

    The endpoint's progress threads serve peers' READs of our registered regions, so the
    prefill side never calls anything per hand-off; the decode side connects and reads.
    A read batch that timed out stays in flight in C (it may still land in the local region),
    so it is kept and reaped before the next batch starts: a new batch never runs while an
    old one can still write the same buffer, and `close` waits for stragglers.
    """

    def __init__(self, bind: str = "127.0.0.1:0") -> None:
        from pd_serve.kv import cann_ext

        self._cx = cann_ext
        self._pending: list[int] = []  # timed-out requests not yet reaped
        try:
            self._ep: Any = cann_ext.Endpoint(bind)
        except cann_ext.CannExtError as exc:
            raise TransportError(str(exc)) from exc

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._cx.CannExtError as exc:
            if getattr(exc, "status", None) == _CX_ERR_TIMEOUT:
                raise TransportTimeout(str(exc)) from exc
            raise TransportError(str(exc)) from exc

    def conn_id(self) -> bytes:
        return bytes(self._call(self._ep.conn_id))

    def register(self, array: np.ndarray) -> int:
        return int(self._call(self._ep.register, array))

    def export(self, handle: int) -> bytes:
        return bytes(self._call(self._ep.export, handle))

    def deregister(self, handle: int) -> None:
        self._call(self._ep.deregister, handle)

    @property
    def num_registered(self) -> int:
        return int(self._ep.num_registered)

    def connect(self, conn_id: bytes, timeout_s: float) -> Any:
        return self._call(self._ep.connect, conn_id, _ms(timeout_s))

    def import_(self, peer: Any, desc: bytes) -> Any:
        return self._call(self._ep.import_, peer, desc)

    def read_batch(self, peer: Any, local: int, remote: Any, reads: list[Read],
                   timeout_s: float) -> None:
        self._reap(timeout_s)
        # One XFER_DTYPE array built column-wise: per-range Python checks cost more than the
        # transfer itself for block-fixed batches of thousands of small reads.
        cols = np.array([(r.local_offset, r.length, r.remote_offset) for r in reads],
                        dtype=np.int64).reshape(-1, 3)  # [num_reads, 3]
        xfers = self._cx.make_xfers(local, cols[:, 0], cols[:, 1], remote, cols[:, 2])
        request = self._call(self._ep.post, peer, "read", xfers)
        try:
            self._call(self._ep.wait, request, _ms(timeout_s))
        except TransportTimeout:
            self._pending.append(request)
            raise

    def _reap(self, timeout_s: float) -> None:
        """Waits for timed-out batches; TransportTimeout if one is still in flight."""
        while self._pending:
            try:
                self._call(self._ep.wait, self._pending[0], _ms(timeout_s))
            except TransportTimeout as exc:
                raise TransportTimeout(f"an earlier timed-out read is still in flight: "
                                       f"{exc}") from exc
            except TransportError:
                pass  # it finished with an error: it is freed all the same
            self._pending.pop(0)

    def close(self) -> None:
        try:
            self._reap(10.0)
        finally:
            self._call(self._ep.close)


_CX_ERR_TIMEOUT = 8


def _ms(timeout_s: float) -> int:
    return max(1, int(timeout_s * 1000))


def cann_ext_unavailable_reason() -> str | None:
    """None when the cann_ext host-TCP transport works in this build, else why not."""
    try:
        transport = CannExtTransport()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"cann_ext endpoint cannot be created: {exc}"
    try:
        transport.conn_id()
    except TransportError as exc:
        return f"cann_ext host TCP transport is not built: {exc}"
    finally:
        transport.close()
    return None
