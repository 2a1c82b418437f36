"""ctypes bindings of cann_ext's NCCL backend (cx_nccl_*): finding libnccl and communicators.

libnccl itself is loaded by the C library (dlopen); this module picks which file: an explicit
$PD_SERVE_NCCL_LIB (left to the C side, which then tries only that file), else the libnccl this
process already mapped (torch's, so one copy serves both), else the nvidia-nccl-cu12/-cu13
wheel's site-packages/nvidia/nccl/lib/libnccl.so.2, else the loader's search path.

Lifecycle of a `Comm` (non-blocking NCCL communicator; one thread at a time):
1. `Comm.init(uid, nranks, rank)` starts joining on the calling thread's current CUDA device;
2. poll `in_progress()` until False (it raises CannExtError on an asynchronous error);
3. `post` groups of sends or receives on a stream; after one answers True (still being
   enqueued) poll `in_progress()` again before recording events or posting more;
4. `abort()`: frees the communicator without waiting for the peer (idempotent).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from pd_serve.kv._cx_lib import CannExtError, _check, _lib

__all__ = ["NCCL_LIB_ENV", "CannExtError", "Comm", "find_libnccl", "load", "unique_id",
           "version_string"]

NCCL_LIB_ENV = "PD_SERVE_NCCL_LIB"
UNIQUE_ID_BYTES = 128
_INT, _INTP, _VP, _SZ, _U64 = (ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                               ctypes.c_size_t, ctypes.c_uint64)
_U64P = ctypes.POINTER(ctypes.c_uint64)
_XFER = [_VP, _VP, _U64, _INT, _VP, _INTP]
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "cx_nccl_load": (_INT, [ctypes.c_char_p, _INTP]),
    "cx_nccl_get_unique_id": (_INT, [_VP, _SZ]),
    "cx_nccl_comm_init": (_INT, [ctypes.c_char_p, _SZ, _INT, _INT, ctypes.POINTER(_VP)]),
    "cx_nccl_comm_poll": (_INT, [_VP, _INTP]),
    "cx_nccl_comm_finalize": (_INT, [_VP, _INTP]),
    "cx_nccl_comm_destroy": (_INT, [_VP]),
    "cx_nccl_comm_abort": (_INT, [_VP]),
    "cx_nccl_group_start": (_INT, []),
    "cx_nccl_group_end": (_INT, [_INTP]),
    "cx_nccl_send": (_INT, _XFER),
    "cx_nccl_recv": (_INT, _XFER),
    "cx_nccl_post": (_INT, [_VP, _INT, _U64, _U64P, _U64P, _SZ, _INT, _VP, _INTP]),
}


@functools.cache
def _nccl() -> ctypes.CDLL:
    lib = _lib()
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            raise RuntimeError(f"libcann_ext.so has no {name}: it predates the NCCL backend; "
                               f"rebuild it with `pip install -e .`")
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _mapped_libnccl() -> str | None:
    """A libnccl this process already mapped (torch's), so one copy serves both."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if "/libnccl.so" in path and Path(path).is_file():
                    return path
    except OSError:
        return None
    return None


def _wheel_libnccl() -> str | None:
    """site-packages/nvidia/nccl/lib/libnccl.so.2 of an nvidia-nccl-cu12/-cu13 wheel."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("nccl/lib", "cu13/lib", "cu12/lib"):
            for name in ("libnccl.so.2", "libnccl.so"):
                path = Path(root) / sub / name
                if path.is_file():
                    return str(path)
    return None


def find_libnccl() -> str | None:
    """The libnccl file to load, or None (when $PD_SERVE_NCCL_LIB is set, the C side reads it
    itself; when nothing is found, it tries libnccl.so.2 / libnccl.so on the search path)."""
    if os.environ.get(NCCL_LIB_ENV):
        return None
    return _mapped_libnccl() or _wheel_libnccl()


def load() -> int:
    """Loads libnccl once per process; returns its version code (e.g. 22805 for 2.28.5).
    CannExtError (CX_ERR_NOT_FOUND) naming every file tried and why it failed."""
    version = ctypes.c_int()
    path = find_libnccl()
    status = _nccl().cx_nccl_load(path.encode() if path else None, ctypes.byref(version))
    _check("cx_nccl_load", status)
    return version.value


def version_string(code: int) -> str:
    """'2.28.5' for 22805 (NCCL_VERSION_CODE of a release >= 2.9)."""
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


def unique_id() -> bytes:
    """A fresh ncclUniqueId (128 bytes); this process hosts the bootstrap root for it."""
    buf = ctypes.create_string_buffer(UNIQUE_ID_BYTES)
    _check("cx_nccl_get_unique_id", _nccl().cx_nccl_get_unique_id(buf, UNIQUE_ID_BYTES))
    return buf.raw


def _u64(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.uint64)  # [n]


class Comm:
    """One non-blocking NCCL communicator (see the module docstring for the lifecycle)."""

    def __init__(self, handle: int, rank: int, nranks: int) -> None:
        self._handle: int | None = handle
        self.rank, self.nranks = rank, nranks

    @classmethod
    def init(cls, uid: bytes, nranks: int, rank: int) -> Comm:
        if not isinstance(uid, bytes) or len(uid) != UNIQUE_ID_BYTES:
            raise ValueError(f"uid must be {UNIQUE_ID_BYTES} bytes from unique_id()")
        handle = ctypes.c_void_p()
        status = _nccl().cx_nccl_comm_init(uid, len(uid), nranks, rank, ctypes.byref(handle))
        _check("cx_nccl_comm_init", status)
        assert handle.value, "cx_nccl_comm_init returned CX_OK without a communicator"
        return cls(handle.value, rank, nranks)

    @property
    def alive(self) -> bool:
        return self._handle is not None

    def _live(self) -> int:
        if self._handle is None:
            raise CannExtError("nccl communicator", 4, "the communicator was aborted")
        return self._handle

    def in_progress(self) -> bool:
        """True while an init or a posted group is still being set up in the background."""
        flag = ctypes.c_int()
        _check("cx_nccl_comm_poll", _nccl().cx_nccl_comm_poll(self._live(), ctypes.byref(flag)))
        return bool(flag.value)

    def post(self, recv: bool, base: int, offsets: np.ndarray, lengths: np.ndarray, peer: int,
             stream: int) -> bool:
        """One group of sends (or receives) of [base + offsets[i], + lengths[i]) with rank
        `peer`, enqueued on `stream`; True while NCCL still enqueues it in the background."""
        off, length = _u64(offsets), _u64(lengths)
        if off.shape != length.shape or off.ndim != 1:
            raise ValueError(f"offsets {off.shape} and lengths {length.shape} must be equal 1-D")
        flag = ctypes.c_int()
        status = _nccl().cx_nccl_post(self._live(), int(recv), base, off.ctypes.data_as(_U64P),
                                      length.ctypes.data_as(_U64P), off.size, peer, stream,
                                      ctypes.byref(flag))
        _check("cx_nccl_post", status)
        return bool(flag.value)

    def abort(self) -> None:
        """Frees the communicator and stops its kernels without waiting for the peer."""
        handle, self._handle = self._handle, None
        if handle is not None:
            _check("cx_nccl_comm_abort", _nccl().cx_nccl_comm_abort(handle))
