"""The one Python bridge (ctypes) to the cann_ext C library: block gather/scatter, endpoints.

The library is looked up at $PD_SERVE_CANN_EXT_LIB if set, else at
pd_serve/kv/_lib/libcann_ext.so, where `pip install .` and `pip install -e .` put it (setup.py
runs CMake). It is loaded on first use, so importing this module never fails.

A paged KV cache here is a C-contiguous numpy array [num_layers, 2, num_blocks, *block_shape];
its contiguous hand-off form is [num_layers, 2, len(block_ids), *block_shape], i.e. the bytes
[layer0.K | layer0.V | layer1.K | ...] with each part the request's blocks in order.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LIB_ENV = "PD_SERVE_CANN_EXT_LIB"
LIB_PATH = Path(__file__).resolve().parent / "_lib" / "libcann_ext.so"
ABI_VERSION = 1  # must match CX_ABI_VERSION in cann_ext/include/cann_ext.h

CX_OK = 0
CX_ERR_UNSUPPORTED = 4
_BACKEND_HOST_TCP = 0
_MEM_HOST = 0

BlockIds = Sequence[int] | np.ndarray


class CannExtError(RuntimeError):
    """A cann_ext call failed; `status` is its cx_status code (CX_ERR_UNSUPPORTED: not built)."""

    def __init__(self, function: str, status: int, detail: str) -> None:
        super().__init__(f"{function} failed ({status}): {detail}")
        self.status = status


class _Layout(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("num_planes", "num_blocks", "block_bytes", "plane_stride", "block_stride")
    ]


class _EndpointConfig(ctypes.Structure):
    _fields_ = [
        ("backend", ctypes.c_int),
        ("device_id", ctypes.c_int32),
        ("bind_address", ctypes.c_char_p),
        ("timeout_ms", ctypes.c_uint32),
        ("max_inflight", ctypes.c_uint32),
    ]


_U64, _VP, _SZ = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
_I64P = ctypes.POINTER(ctypes.c_int64)
_BLOCK_ARGS = [_VP, _U64, ctypes.POINTER(_Layout), _I64P, _U64, _VP, _U64]
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "cx_version": (ctypes.c_char_p, []),
    "cx_abi_version": (ctypes.c_int, []),
    "cx_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "cx_last_error": (ctypes.c_char_p, []),
    "cx_gather_blocks": (ctypes.c_int, _BLOCK_ARGS),
    "cx_scatter_blocks": (ctypes.c_int, _BLOCK_ARGS),
    "cx_endpoint_create": (ctypes.c_int, [ctypes.POINTER(_EndpointConfig), ctypes.POINTER(_VP)]),
    "cx_endpoint_destroy": (ctypes.c_int, [_VP]),
    "cx_endpoint_conn_id": (ctypes.c_int, [_VP, _VP, _SZ, ctypes.POINTER(_SZ)]),
    "cx_mem_register": (
        ctypes.c_int,
        [_VP, _VP, _U64, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)],
    ),
    "cx_mem_deregister": (ctypes.c_int, [_VP, ctypes.c_uint32]),
    "cx_mem_count": (ctypes.c_int, [_VP, ctypes.POINTER(_SZ)]),
}


@functools.cache
def _lib() -> ctypes.CDLL:
    path = Path(os.environ.get(LIB_ENV) or LIB_PATH)
    if not path.is_file():
        raise RuntimeError(
            f"cann_ext library not found at {path}; build it with `pip install -e .` "
            f"(runs CMake) or point {LIB_ENV} at a built libcann_ext.so"
        )
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.cx_abi_version() != ABI_VERSION:
        raise RuntimeError(
            f"{path} has ABI {lib.cx_abi_version()}, this module needs {ABI_VERSION}: rebuild it"
        )
    return lib


def _check(function: str, status: int) -> None:
    if status != CX_OK:
        lib = _lib()
        detail = lib.cx_last_error().decode() or lib.cx_status_string(status).decode()
        raise CannExtError(function, status, detail)


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


class Endpoint:
    """A host-TCP transport endpoint; this build keeps registrations only (no transfers yet).

    Lifecycle:
    1. Endpoint() allocates it in C (no I/O).
    2. register(array) records the array's memory and returns a handle; the endpoint holds a
       reference to the array so it stays alive until deregister(handle).
    3. conn_id() and the transfers raise CannExtError(status=CX_ERR_UNSUPPORTED): not built yet.
    4. close() (or leaving a `with` block) deregisters what is left and frees the endpoint.
    """

    def __init__(self) -> None:
        lib = _lib()
        config = _EndpointConfig(_BACKEND_HOST_TCP, -1, b"127.0.0.1:0", 10_000, 0)
        handle = _VP()
        _check(
            "cx_endpoint_create", lib.cx_endpoint_create(ctypes.byref(config), ctypes.byref(handle))
        )
        self._ep: int | None = handle.value
        self._arrays: dict[int, np.ndarray] = {}

    def _handle(self) -> int:
        if self._ep is None:
            raise RuntimeError("endpoint is closed")
        return self._ep

    def register(self, array: np.ndarray) -> int:
        """Registers a C-contiguous, non-empty host array for transfers; returns its handle."""
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or array.nbytes == 0:
            raise ValueError("register needs a non-empty C-contiguous numpy array")
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
        _check("cx_mem_deregister", _lib().cx_mem_deregister(self._handle(), handle))
        del self._arrays[handle]

    @property
    def num_registered(self) -> int:
        """Live registrations as the C side counts them (for leak checks)."""
        count = _SZ()
        _check("cx_mem_count", _lib().cx_mem_count(self._handle(), ctypes.byref(count)))
        return count.value

    def conn_id(self) -> bytes:
        """The connection id blob to publish to peers (raises: not built yet)."""
        buf = ctypes.create_string_buffer(4352)  # CX_CONN_ID_MAX_BYTES
        length = _SZ()
        _check(
            "cx_endpoint_conn_id",
            _lib().cx_endpoint_conn_id(self._handle(), buf, len(buf), ctypes.byref(length)),
        )
        return buf.raw[: length.value]

    def close(self) -> None:
        """Deregisters every remaining array and frees the endpoint; closing twice is a no-op."""
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
