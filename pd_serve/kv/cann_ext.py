"""The one Python bridge (ctypes) to the cann_ext C library: block gather/scatter, endpoints.

The library is looked up at $PD_SERVE_CANN_EXT_LIB if set, else at
pd_serve/kv/_lib/libcann_ext.so, where `pip install .` and `pip install -e .` put it (setup.py
runs CMake). It is loaded on first use, so importing this module never fails.

A paged KV cache here is a C-contiguous numpy array [num_layers, 2, num_blocks, *block_shape];
its contiguous hand-off form is [num_layers, 2, len(block_ids), *block_shape], i.e. the bytes
[layer0.K | layer0.V | layer1.K | ...] with each part the request's blocks in order.

Endpoints move bytes between registered numpy arrays of two processes over the host TCP
backend (real sockets; any host): see `Endpoint`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from pd_serve.kv._cx_lib import (
    _I64P,
    _SZ,
    _VP,
    ABI_VERSION,
    LIB_ENV,
    LIB_PATH,
    STATUS_NAMES,
    CannExtError,
    _check,
    _EndpointConfig,
    _Layout,
    _lib,
)

__all__ = [
    "ABI_VERSION",
    "LIB_ENV",
    "LIB_PATH",
    "STATUS_NAMES",
    "CannExtError",
    "Endpoint",
    "Xfer",
    "XFER_DTYPE",
    "gather_blocks",
    "make_xfers",
    "scatter_blocks",
    "version",
]

CX_OK = 0
CX_ERR_UNSUPPORTED = 4
TIMEOUT_INFINITE = 2**32 - 1  # CX_TIMEOUT_INFINITE
OPS = {"send": 0, "recv": 1, "write": 2, "read": 3}  # cx_op
_BACKEND_HOST_TCP = 0
_MEM_HOST = 0
_CONN_ID_MAX_BYTES = 4352
_MEM_DESC_MAX_BYTES = 1024

BlockIds = Sequence[int] | np.ndarray


class Xfer(NamedTuple):
    """One byte range of a batch (cx_xfer); remote fields for WRITE/READ, tag for SEND/RECV."""

    local: int
    local_offset: int
    length: int
    remote: int = 0
    remote_offset: int = 0
    tag: int = 0


# cx_xfer's C layout (u32 fields padded to 8 bytes): 48 bytes per entry.
XFER_DTYPE = np.dtype(
    [
        ("local", "<u4"),
        ("local_offset", "<u8"),
        ("length", "<u8"),
        ("remote", "<u4"),
        ("remote_offset", "<u8"),
        ("tag", "<u4"),
    ],
    align=True,
)


def version() -> str:
    """The C library's version string."""
    return str(_lib().cx_version().decode())


def _check_cache(cache: np.ndarray, writeable: bool) -> None:
    if not isinstance(cache, np.ndarray):
        raise TypeError(f"cache must be a numpy array, got {type(cache).__name__}")
    if cache.ndim < 4 or cache.shape[1] != 2:
        raise ValueError(f"cache must be [num_layers, 2, num_blocks, ...], got {cache.shape}")
    if cache.size == 0:
        raise ValueError(f"cache must not be empty, got {cache.shape}")
    if cache.dtype.hasobject:
        raise ValueError("cache must hold plain numbers, not Python objects")
    if not cache.flags.c_contiguous:
        raise ValueError("cache must be C-contiguous (a copy would not be updated in place)")
    if writeable and not cache.flags.writeable:
        raise ValueError("cache must be writeable")


def _block_ids(block_ids: BlockIds, num_blocks: int, unique: bool) -> np.ndarray:
    ids = np.asarray(block_ids)
    if ids.size == 0:
        return np.empty(0, dtype=np.int64)  # [0]
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"block_ids must be a 1-D list of ints, got {ids.dtype} {ids.shape}")
    bad = np.flatnonzero((ids < 0) | (ids >= num_blocks))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"block_ids[{i}] = {ids[i]} is outside [0, {num_blocks})")
    if unique and np.unique(ids).size != ids.size:
        values, counts = np.unique(ids, return_counts=True)
        raise ValueError(f"block_ids repeat block {int(values[counts > 1][0])}")
    return np.ascontiguousarray(ids, dtype=np.int64)  # [num_ids]


def _layout(cache: np.ndarray) -> _Layout:
    num_layers, _, num_blocks = cache.shape[:3]
    block_bytes = int(np.prod(cache.shape[3:])) * cache.itemsize
    # Strides follow from the shape (the cache is C-contiguous), not from cache.strides, which
    # numpy may leave arbitrary for axes of length 1.
    return _Layout(num_layers * 2, num_blocks, block_bytes, num_blocks * block_bytes, block_bytes)


def _check_contig(name: str, arr: np.ndarray, cache: np.ndarray, count: int) -> None:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != cache.dtype:
        raise ValueError(f"{name} dtype {arr.dtype} differs from the cache's {cache.dtype}")
    if arr.size != count:
        raise ValueError(f"{name} has {arr.size} elements, the blocks need {count}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if np.may_share_memory(arr, cache):
        raise ValueError(f"{name} must not share memory with the cache")


def gather_blocks(
    cache: np.ndarray, block_ids: BlockIds, out: np.ndarray | None = None
) -> np.ndarray:
    """Copies the given blocks of every (layer, K|V) plane into one contiguous array.

    Returns `out` if given (any shape with the right element count, C-contiguous, writeable,
    the cache's dtype), else a new [num_layers, 2, len(block_ids), *block_shape] array.
    """
    _check_cache(cache, writeable=False)
    ids = _block_ids(block_ids, cache.shape[2], unique=False)
    shape = (cache.shape[0], 2, ids.size, *cache.shape[3:])
    if out is None:
        out = np.empty(shape, dtype=cache.dtype)  # [num_layers, 2, num_ids, *block_shape]
    else:
        _check_contig("out", out, cache, int(np.prod(shape)))
        if not out.flags.writeable:
            raise ValueError("out must be writeable")
    status = _lib().cx_gather_blocks(
        cache.ctypes.data,
        cache.nbytes,
        ctypes.byref(_layout(cache)),
        ids.ctypes.data_as(_I64P),
        ids.size,
        out.ctypes.data,
        out.nbytes,
    )
    _check("cx_gather_blocks", status)
    return out


def scatter_blocks(cache: np.ndarray, block_ids: BlockIds, data: np.ndarray) -> None:
    """RecvScatter: writes `data`, laid out as gather_blocks returns it, into the given blocks.

    `data` may have any shape (e.g. 1-D from np.frombuffer) with the right element count and
    the cache's dtype; block ids must be distinct. Nothing is written when a check fails.
    """
    _check_cache(cache, writeable=True)
    ids = _block_ids(block_ids, cache.shape[2], unique=True)
    count = cache.shape[0] * 2 * ids.size * int(np.prod(cache.shape[3:]))
    _check_contig("data", data, cache, count)
    status = _lib().cx_scatter_blocks(
        cache.ctypes.data,
        cache.nbytes,
        ctypes.byref(_layout(cache)),
        ids.ctypes.data_as(_I64P),
        ids.size,
        data.ctypes.data,
        data.nbytes,
    )
    _check("cx_scatter_blocks", status)


def _uint(name: str, value: object, bits: int = 64) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= int(value) < 2**bits:
        raise ValueError(f"{name} = {value} is outside [0, 2**{bits})")
    return int(value)


def make_xfers(
    local: int,
    local_offsets: Any,
    lengths: Any,
    remote: int = 0,
    remote_offsets: Any = 0,
    tags: Any = 0,
) -> np.ndarray:
    """Builds a batch as an XFER_DTYPE array (broadcasting), the fast form `Endpoint.post` takes."""
    cols = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.int64) for v in (local_offsets, lengths, remote_offsets, tags))
    )
    if any((c < 0).any() for c in cols):
        raise ValueError("offsets, lengths and tags must be >= 0")
    xfers = np.zeros(cols[0].size, dtype=XFER_DTYPE)  # [num_xfers]
    xfers["local"], xfers["remote"] = _uint("local", local, 32), _uint("remote", remote, 32)
    for name, col in zip(("local_offset", "length", "remote_offset", "tag"), cols):
        xfers[name] = col.reshape(-1)
    return xfers


def _as_xfers(xfers: Sequence[Xfer | tuple[int, ...]] | np.ndarray) -> np.ndarray:
    if isinstance(xfers, np.ndarray):
        if xfers.dtype != XFER_DTYPE or xfers.ndim != 1 or not xfers.flags.c_contiguous:
            raise ValueError("an xfers array must be 1-D, C-contiguous, of XFER_DTYPE")
        out = xfers
    else:
        rows = []
        for i, x in enumerate(xfers):
            x = Xfer(*x)
            bits = (32, 64, 64, 32, 64, 32)
            rows.append(
                tuple(_uint(f"xfers[{i}].{f}", v, b) for f, v, b in zip(x._fields, x, bits))
            )
        out = np.array(rows, dtype=XFER_DTYPE)  # [num_xfers]
    if out.size == 0:
        raise ValueError("a batch needs at least one transfer")
    return out


class Endpoint:
    """A host-TCP transport endpoint: registered numpy arrays, peers, batched transfers.

    Lifecycle:
    1. Endpoint(bind, timeout_ms) allocates it in C (no I/O); timeout_ms is the default for
       connect/accept/wait and the blocking helpers.
    2. register(array) records an array's memory and returns a handle; the endpoint holds a
       reference so the memory stays alive until deregister(handle).
    3. Listener: conn_id() starts listening (bytes to publish); accept() returns a peer.
       Connector: connect(conn_id) returns a peer.
    4. export(handle) -> bytes for the peer, which import_(peer, desc)s them -> a remote handle.
    5. post(peer, op, xfers) -> request; test(request) / wait(request) finish it. read/write/
       send/recv post one range and wait.
    6. close() (or leaving a `with` block) deregisters what is left and frees the endpoint;
       it raises CX_ERR_BUSY while requests are not finished.
    Calls may come from several threads; wait/accept release the GIL while they block.
    """

    def __init__(
        self, bind: str = "127.0.0.1:0", timeout_ms: int = 10_000, max_inflight: int = 0
    ) -> None:
        if not isinstance(bind, str):
            raise TypeError(f"bind must be a str like '127.0.0.1:0', got {type(bind).__name__}")
        self.timeout_ms = _uint("timeout_ms", timeout_ms, 32)
        config = _EndpointConfig(
            _BACKEND_HOST_TCP,
            -1,
            bind.encode(),
            self.timeout_ms,
            _uint("max_inflight", max_inflight, 32),
        )
        handle = _VP()
        _check(
            "cx_endpoint_create",
            _lib().cx_endpoint_create(ctypes.byref(config), ctypes.byref(handle)),
        )
        self._ep: int | None = handle.value
        self._arrays: dict[int, np.ndarray] = {}

    def _handle(self) -> int:
        if self._ep is None:
            raise RuntimeError("endpoint is closed")
        return self._ep

    def _timeout(self, timeout_ms: int | None) -> int:
        return self.timeout_ms if timeout_ms is None else _uint("timeout_ms", timeout_ms, 32)

    def register(self, array: np.ndarray) -> int:
        """Registers a C-contiguous, non-empty host array (any dtype); returns its handle."""
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or array.nbytes == 0:
            raise ValueError("register needs a non-empty C-contiguous numpy array")
        if array.dtype.hasobject:
            raise ValueError("register needs an array of plain numbers, not Python objects")
        handle = ctypes.c_uint32()
        _check(
            "cx_mem_register",
            _lib().cx_mem_register(
                self._handle(), array.ctypes.data, array.nbytes, _MEM_HOST, ctypes.byref(handle)
            ),
        )
        self._arrays[handle.value] = array
        return handle.value

    def deregister(self, handle: int) -> None:
        """Forgets a registration and drops the endpoint's reference to its array."""
        _check(
            "cx_mem_deregister",
            _lib().cx_mem_deregister(self._handle(), _uint("handle", handle, 32)),
        )
        del self._arrays[handle]

    @property
    def num_registered(self) -> int:
        """Live registrations as the C side counts them (for leak checks)."""
        count = _SZ()
        _check("cx_mem_count", _lib().cx_mem_count(self._handle(), ctypes.byref(count)))
        return count.value

    def conn_id(self) -> bytes:
        """Starts listening (first call) and returns the connection id blob to publish."""
        buf = ctypes.create_string_buffer(_CONN_ID_MAX_BYTES)
        length = _SZ()
        _check(
            "cx_endpoint_conn_id",
            _lib().cx_endpoint_conn_id(self._handle(), buf, len(buf), ctypes.byref(length)),
        )
        return buf.raw[: length.value]

    def connect(self, conn_id: bytes, timeout_ms: int | None = None) -> int:
        """Connects to the endpoint that published `conn_id`; returns the peer."""
        if not isinstance(conn_id, bytes) or not conn_id:
            raise TypeError("conn_id must be the non-empty bytes that conn_id() returned")
        peer = ctypes.c_uint32()
        status = _lib().cx_endpoint_connect(
            self._handle(), conn_id, len(conn_id), self._timeout(timeout_ms), ctypes.byref(peer)
        )
        _check("cx_endpoint_connect", status)
        return peer.value

    def accept(self, timeout_ms: int | None = None) -> int:
        """Returns the next peer that connected (call conn_id() first)."""
        peer = ctypes.c_uint32()
        status = _lib().cx_endpoint_accept(
            self._handle(), self._timeout(timeout_ms), ctypes.byref(peer)
        )
        _check("cx_endpoint_accept", status)
        return peer.value

    def export(self, handle: int) -> bytes:
        """A descriptor of registration `handle` for a peer's import_ (one-sided READ/WRITE)."""
        buf = ctypes.create_string_buffer(_MEM_DESC_MAX_BYTES)
        length = _SZ()
        status = _lib().cx_mem_export(
            self._handle(), _uint("handle", handle, 32), buf, len(buf), ctypes.byref(length)
        )
        _check("cx_mem_export", status)
        return buf.raw[: length.value]

    def import_(self, peer: int, desc: bytes) -> int:
        """Imports a peer's exported descriptor; returns the remote handle for transfers."""
        if not isinstance(desc, bytes) or not desc:
            raise TypeError("desc must be the non-empty bytes that the peer's export() returned")
        remote = ctypes.c_uint32()
        status = _lib().cx_mem_import(
            self._handle(), _uint("peer", peer, 32), desc, len(desc), ctypes.byref(remote)
        )
        _check("cx_mem_import", status)
        return remote.value

    def post(self, peer: int, op: str, xfers: Sequence[Xfer | tuple[int, ...]] | np.ndarray) -> int:
        """Posts a batch of one op ("send", "recv", "write", "read") to a peer; returns at once.

        `xfers` is a list of Xfer (or tuples in its field order) or an XFER_DTYPE array
        (make_xfers). The C side checks every range before anything moves.
        """
        if op not in OPS:
            raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
        batch = _as_xfers(xfers)
        request = ctypes.c_uint64()
        status = _lib().cx_post(
            self._handle(),
            _uint("peer", peer, 32),
            OPS[op],
            batch.ctypes.data,
            batch.size,
            ctypes.byref(request),
        )
        _check("cx_post", status)
        return request.value

    def test(self, request: int) -> bool:
        """True once the request finished (it is then freed); raises if it failed."""
        done = ctypes.c_int()
        status = _lib().cx_test(self._handle(), _uint("request", request), ctypes.byref(done))
        _check("cx_test", status)
        return bool(done.value)

    def wait(self, request: int, timeout_ms: int | None = None) -> None:
        """Blocks until the request finishes; CX_ERR_TIMEOUT leaves it live for another wait."""
        status = _lib().cx_wait(
            self._handle(), _uint("request", request), self._timeout(timeout_ms)
        )
        _check("cx_wait", status)

    def _one(self, peer: int, op: str, xfer: Xfer, timeout_ms: int | None) -> None:
        self.wait(self.post(peer, op, [xfer]), timeout_ms)

    def read(
        self,
        peer: int,
        local: int,
        local_offset: int,
        remote: int,
        remote_offset: int,
        length: int,
        timeout_ms: int | None = None,
    ) -> None:
        """Copies `length` bytes of an imported remote region into a local one; blocks."""
        self._one(
            peer, "read", Xfer(local, local_offset, length, remote, remote_offset), timeout_ms
        )

    def write(
        self,
        peer: int,
        local: int,
        local_offset: int,
        remote: int,
        remote_offset: int,
        length: int,
        timeout_ms: int | None = None,
    ) -> None:
        """Copies `length` bytes of a local region into an imported remote one; blocks."""
        self._one(
            peer, "write", Xfer(local, local_offset, length, remote, remote_offset), timeout_ms
        )

    def send(
        self,
        peer: int,
        local: int,
        offset: int,
        length: int,
        tag: int,
        timeout_ms: int | None = None,
    ) -> None:
        """Sends a local range to the peer's recv with the same tag; blocks until it is sent."""
        self._one(peer, "send", Xfer(local, offset, length, tag=tag), timeout_ms)

    def recv(
        self,
        peer: int,
        local: int,
        offset: int,
        length: int,
        tag: int,
        timeout_ms: int | None = None,
    ) -> None:
        """Receives the peer's send with the same tag (same length) into a local range; blocks."""
        self._one(peer, "recv", Xfer(local, offset, length, tag=tag), timeout_ms)

    def close(self) -> None:
        """Deregisters every remaining array, closes peers and frees the endpoint (idempotent)."""
        if self._ep is None:
            return
        for handle in list(self._arrays):
            self.deregister(handle)
        _check("cx_endpoint_destroy", _lib().cx_endpoint_destroy(self._ep))
        self._ep = None

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
