"""Loads libcann_ext.so for pd_serve.kv.cann_ext: ctypes signatures, the ABI check, errors."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

LIB_ENV = "PD_SERVE_CANN_EXT_LIB"
LIB_PATH = Path(__file__).resolve().parent / "_lib" / "libcann_ext.so"
ABI_VERSION = 1  # must match CX_ABI_VERSION in cann_ext/include/cann_ext.h

STATUS_NAMES = (
    "CX_OK",
    "CX_ERR_INVALID_ARG",
    "CX_ERR_OUT_OF_RANGE",
    "CX_ERR_NO_MEMORY",
    "CX_ERR_UNSUPPORTED",
    "CX_ERR_NOT_FOUND",
    "CX_ERR_EXISTS",
    "CX_ERR_BUSY",
    "CX_ERR_TIMEOUT",
    "CX_ERR_CONNECTION",
    "CX_ERR_BACKEND",
    "CX_ERR_INTERNAL",
)


class CannExtError(RuntimeError):
    """A cann_ext call failed; `status` is its cx_status code, `status_name` e.g. CX_ERR_TIMEOUT."""

    def __init__(self, function: str, status: int, detail: str) -> None:
        name = STATUS_NAMES[status] if 0 <= status < len(STATUS_NAMES) else f"status {status}"
        super().__init__(f"{function} failed ({name}): {detail}")
        self.status = status
        self.status_name = name
        self.detail = detail


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


_U32, _U64, _VP, _SZ = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
_U32P, _SZP = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_size_t)
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
    "cx_endpoint_conn_id": (ctypes.c_int, [_VP, _VP, _SZ, _SZP]),
    "cx_endpoint_connect": (ctypes.c_int, [_VP, ctypes.c_char_p, _SZ, _U32, _U32P]),
    "cx_endpoint_accept": (ctypes.c_int, [_VP, _U32, _U32P]),
    "cx_mem_register": (ctypes.c_int, [_VP, _VP, _U64, ctypes.c_int, _U32P]),
    "cx_mem_deregister": (ctypes.c_int, [_VP, _U32]),
    "cx_mem_count": (ctypes.c_int, [_VP, _SZP]),
    "cx_mem_export": (ctypes.c_int, [_VP, _U32, _VP, _SZ, _SZP]),
    "cx_mem_import": (ctypes.c_int, [_VP, _U32, ctypes.c_char_p, _SZ, _U32P]),
    "cx_post": (ctypes.c_int, [_VP, _U32, ctypes.c_int, _VP, _SZ, ctypes.POINTER(_U64)]),
    "cx_test": (ctypes.c_int, [_VP, _U64, ctypes.POINTER(ctypes.c_int)]),
    "cx_wait": (ctypes.c_int, [_VP, _U64, _U32]),
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
    if status != 0:  # CX_OK
        lib = _lib()
        detail = lib.cx_last_error().decode() or lib.cx_status_string(status).decode()
        raise CannExtError(function, status, detail)
