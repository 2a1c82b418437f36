"""ctypes bindings of cann_ext's HCCL backend (cx_hccl_*): libraries, communicators, streams.

libascendcl and libhccl are loaded by the C library (dlopen): the paths given to `load`, else
$PD_SERVE_ACL_LIB / $PD_SERVE_HCCL_LIB, else libascendcl.so / libhccl.so on the loader's path
(CANN's set_env.sh puts them there). A libcann_ext.so built without CANN's headers has no
cx_hccl_* symbols: `built()` is False and every call raises HcclNotBuilt saying how to get it.

Lifecycle of a `Comm` (one thread at a time):
1. `Comm.init(root_info, nranks, rank, device)` starts HcclCommInitRootInfo on a join thread of
   cann_ext and returns at once (the rank that made the root info with `root_info()` is 0);
2. poll `in_progress()` until False (it raises CannExtError for a failed join or an
   asynchronous error);
3. `post` HcclBatchSendRecv calls (or `send` / `recv`) on a `Stream`; `Event`s recorded after
   them tell when they completed;
4. `abort()`: HcclCommDestroy on a detached thread, never waiting for the peer (idempotent).
`Stream`, `Event` and `DeviceBuffer` wrap ACL objects of one device; events are destroyed when
collected, streams and buffers by their owner.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from typing import Any

import numpy as np

from pd_serve.kv._cx_lib import CannExtError, _check, _lib

__all__ = ["ACL_LIB_ENV", "HCCL_LIB_ENV", "ROOT_INFO_BYTES", "CannExtError", "Comm",
           "DeviceBuffer", "Event", "HcclNotBuilt", "Stream", "built", "device_count",
           "device_uuid", "load", "root_info"]

ACL_LIB_ENV = "PD_SERVE_ACL_LIB"
HCCL_LIB_ENV = "PD_SERVE_HCCL_LIB"
ROOT_INFO_BYTES = 4108  # sizeof(HcclRootInfo)
_INT, _I32, _U32, _VP, _SZ, _U64 = (ctypes.c_int, ctypes.c_int32, ctypes.c_uint32,
                                    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64)
_VPP, _INTP, _SZP = ctypes.POINTER(_VP), ctypes.POINTER(_INT), ctypes.POINTER(_SZ)
_U64P = ctypes.POINTER(_U64)
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "cx_hccl_load": (_INT, [ctypes.c_char_p, ctypes.c_char_p]),
    "cx_hccl_device_count": (_INT, [ctypes.POINTER(_U32)]),
    "cx_hccl_device_uuid": (_INT, [_I32, _VP, _SZ, _SZP]),
    "cx_hccl_get_root_info": (_INT, [_I32, _VP, _SZ, _SZP]),
    "cx_hccl_comm_init": (_INT, [ctypes.c_char_p, _SZ, _U32, _U32, _I32, _VPP]),
    "cx_hccl_comm_poll": (_INT, [_VP, _INTP]),
    "cx_hccl_comm_destroy": (_INT, [_VP, _INT]),
    "cx_hccl_send": (_INT, [_VP, _VP, _U64, _U32, _VP]),
    "cx_hccl_recv": (_INT, [_VP, _VP, _U64, _U32, _VP]),
    "cx_hccl_post": (_INT, [_VP, _INT, _U64, _U64P, _U64P, _SZ, _U32, _VP]),
    "cx_hccl_stream_create": (_INT, [_I32, _VPP]),
    "cx_hccl_stream_destroy": (_INT, [_I32, _VP]),
    "cx_hccl_stream_sync": (_INT, [_I32, _VP, _U32]),
    "cx_hccl_stream_wait_event": (_INT, [_I32, _VP, _VP]),
    "cx_hccl_event_create": (_INT, [_I32, _VPP]),
    "cx_hccl_event_record": (_INT, [_I32, _VP, _VP]),
    "cx_hccl_event_query": (_INT, [_I32, _VP, _INTP]),
    "cx_hccl_event_destroy": (_INT, [_I32, _VP]),
    "cx_hccl_malloc": (_INT, [_I32, _U64, _VPP]),
    "cx_hccl_free": (_INT, [_I32, _VP]),
}
NOT_BUILT = ("libcann_ext.so was built without the HCCL backend (CANN's headers were not found "
             "at build time): run `python tools/fetch_cann_headers.py`, then `pip install -e .` "
             "(or set CANN_EXT_HCCL_INCLUDE to a CANN toolkit's include/ folder)")


class HcclNotBuilt(RuntimeError):
    """This libcann_ext.so has no HCCL backend."""


def built() -> bool:
    """True when libcann_ext.so carries the HCCL backend."""
    return hasattr(_lib(), "cx_hccl_load")


@functools.cache
def _hccl() -> ctypes.CDLL:
    lib = _lib()
    if not built():
        raise HcclNotBuilt(NOT_BUILT)
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def load(acl_path: str | None = None, hccl_path: str | None = None) -> None:
    """Loads libascendcl and libhccl once per process (later calls do nothing). CannExtError
    (CX_ERR_NOT_FOUND) naming every file tried and why it failed; HcclNotBuilt."""
    acl = acl_path.encode() if acl_path else None
    hccl = hccl_path.encode() if hccl_path else None
    _check("cx_hccl_load", _hccl().cx_hccl_load(acl, hccl))


def device_count() -> int:
    count = ctypes.c_uint32()
    _check("cx_hccl_device_count", _hccl().cx_hccl_device_count(ctypes.byref(count)))
    return int(count.value)


def device_uuid(device: int) -> str:
    """The NPU's UUID as hex, or "" where this CANN cannot tell (no aclrtDeviceGetUuid)."""
    buf, n = ctypes.create_string_buffer(16), ctypes.c_size_t()
    try:
        _check("cx_hccl_device_uuid", _hccl().cx_hccl_device_uuid(device, buf, 16,
                                                                  ctypes.byref(n)))
    except CannExtError as exc:
        if exc.status_name == "CX_ERR_UNSUPPORTED":
            return ""
        raise
    return "NPU-" + buf.raw[:n.value].hex()


def root_info(device: int) -> bytes:
    """A fresh HcclRootInfo (4108 bytes) made on `device`; this process hosts its root and
    joins as rank 0."""
    buf, n = ctypes.create_string_buffer(ROOT_INFO_BYTES), ctypes.c_size_t()
    _check("cx_hccl_get_root_info",
           _hccl().cx_hccl_get_root_info(device, buf, ROOT_INFO_BYTES, ctypes.byref(n)))
    return buf.raw[:n.value]


def _u64(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.uint64)  # [n]


def _handle(obj: Any) -> int | None:
    """The raw ACL handle of a Stream / Event, or an int handle given as is."""
    return obj.handle if isinstance(obj, Stream | Event) else obj


class Comm:
    """One HCCL communicator (see the module docstring for the lifecycle)."""

    def __init__(self, handle: int, rank: int, nranks: int, device: int) -> None:
        self._handle: int | None = handle
        self.rank, self.nranks, self.device = rank, nranks, device

    @classmethod
    def init(cls, uid: bytes, nranks: int, rank: int, device: int) -> Comm:
        if not isinstance(uid, bytes) or len(uid) != ROOT_INFO_BYTES:
            raise ValueError(f"uid must be the {ROOT_INFO_BYTES}-byte root info of root_info()")
        handle = ctypes.c_void_p()
        status = _hccl().cx_hccl_comm_init(uid, len(uid), nranks, rank, device,
                                           ctypes.byref(handle))
        _check("cx_hccl_comm_init", status)
        assert handle.value, "cx_hccl_comm_init returned CX_OK without a communicator"
        return cls(handle.value, rank, nranks, device)

    @property
    def alive(self) -> bool:
        return self._handle is not None

    def _live(self) -> int:
        if self._handle is None:
            raise CannExtError("hccl communicator", 4, "the communicator was destroyed")
        return self._handle

    def in_progress(self) -> bool:
        """True while the join runs; CannExtError for a failed join or an async error."""
        flag = ctypes.c_int()
        _check("cx_hccl_comm_poll", _hccl().cx_hccl_comm_poll(self._live(), ctypes.byref(flag)))
        return bool(flag.value)

    def post(self, recv: bool, base: int, offsets: np.ndarray, lengths: np.ndarray, peer: int,
             stream: int) -> bool:
        """One HcclBatchSendRecv of sends (or receives) of [base + offsets[i], + lengths[i])
        with rank `peer` on `stream`. False: HCCL enqueues before returning."""
        off, length = _u64(offsets), _u64(lengths)
        if off.shape != length.shape or off.ndim != 1:
            raise ValueError(f"offsets {off.shape} and lengths {length.shape} must be equal 1-D")
        status = _hccl().cx_hccl_post(self._live(), int(recv), base, off.ctypes.data_as(_U64P),
                                      length.ctypes.data_as(_U64P), off.size, peer, stream)
        _check("cx_hccl_post", status)
        return False

    def send(self, ptr: int, nbytes: int, peer: int, stream: int) -> None:
        """One HcclSend (the peer must post the matching recv before either posts again)."""
        _check("cx_hccl_send", _hccl().cx_hccl_send(self._live(), ptr, nbytes, peer, stream))

    def recv(self, ptr: int, nbytes: int, peer: int, stream: int) -> None:
        _check("cx_hccl_recv", _hccl().cx_hccl_recv(self._live(), ptr, nbytes, peer, stream))

    def abort(self) -> None:
        """HcclCommDestroy on a detached thread: never waits for the peer (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            _check("cx_hccl_comm_destroy", _hccl().cx_hccl_comm_destroy(handle, 0))


class Stream:
    """An aclrtStream of one device; `destroy()` it when done."""

    def __init__(self, device: int) -> None:
        handle = ctypes.c_void_p()
        _check("cx_hccl_stream_create",
               _hccl().cx_hccl_stream_create(device, ctypes.byref(handle)))
        self.device, self.handle = device, int(handle.value or 0)

    def sync(self, timeout_s: float) -> bool:
        """True once the stream's work finished; False if still running after timeout_s."""
        ms = max(0, min(int(timeout_s * 1000), 0xFFFFFFFE))
        try:
            _check("cx_hccl_stream_sync", _hccl().cx_hccl_stream_sync(self.device, self.handle,
                                                                      ms))
        except CannExtError as exc:
            if exc.status_name == "CX_ERR_TIMEOUT":
                return False
            raise
        return True

    def wait_event(self, event: Event | int) -> None:
        """Work enqueued after this waits for `event` (an Event or a raw aclrtEvent)."""
        _check("cx_hccl_stream_wait_event",
               _hccl().cx_hccl_stream_wait_event(self.device, self.handle, _handle(event)))

    def destroy(self) -> None:
        handle, self.handle = self.handle, 0
        if handle:
            _check("cx_hccl_stream_destroy", _hccl().cx_hccl_stream_destroy(self.device, handle))


def _destroy_event(device: int, handle: int) -> None:
    _hccl().cx_hccl_event_destroy(device, handle)  # at collection: nobody to report to


class Event:
    """An aclrtEvent of one device, destroyed when collected."""

    def __init__(self, device: int) -> None:
        handle = ctypes.c_void_p()
        _check("cx_hccl_event_create", _hccl().cx_hccl_event_create(device, ctypes.byref(handle)))
        self.device, self.handle = device, int(handle.value or 0)
        weakref.finalize(self, _destroy_event, device, self.handle)

    def record(self, stream: Stream) -> None:
        _check("cx_hccl_event_record",
               _hccl().cx_hccl_event_record(self.device, self.handle, stream.handle))

    def query(self) -> bool:
        """True once the work recorded before it completed (never blocks)."""
        done = ctypes.c_int()
        _check("cx_hccl_event_query",
               _hccl().cx_hccl_event_query(self.device, self.handle, ctypes.byref(done)))
        return bool(done.value)


class DeviceBuffer:
    """`nbytes` of device memory (aclrtMalloc); `free()` it when done."""

    def __init__(self, device: int, nbytes: int) -> None:
        ptr = ctypes.c_void_p()
        _check("cx_hccl_malloc", _hccl().cx_hccl_malloc(device, nbytes, ctypes.byref(ptr)))
        self.device, self.ptr, self.nbytes = device, int(ptr.value or 0), nbytes

    def free(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            _check("cx_hccl_free", _hccl().cx_hccl_free(self.device, ptr))
