"""cann_ext's mirror of NCCL's ABI (cann_ext/src/nccl_abi.h) against the real nccl.h: a small C
program asserts the ncclConfig_t prefix layout, the result codes, ncclUint8, the unique id size
and NCCL_CONFIG_INITIALIZER's magic. Skipped where no nccl.h (e.g. the nvidia-nccl wheel's
include directory) or no C compiler is found."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from pd_serve.kv.nccl_lib import find_libnccl

ROOT = Path(__file__).resolve().parents[2]

ABI_CHECK = r"""
#include <stddef.h>
#include <stdio.h>
#include <nccl.h>
#include "nccl_abi.h"
#define SAME(f) (offsetof(ncclConfig_t, f) == offsetof(cxn_config, f) && \
                 sizeof(((ncclConfig_t *)0)->f) == sizeof(((cxn_config *)0)->f))
_Static_assert(sizeof(ncclUniqueId) == sizeof(cxn_unique_id), "ncclUniqueId");
_Static_assert(NCCL_UNIQUE_ID_BYTES == CXN_UNIQUE_ID_BYTES, "NCCL_UNIQUE_ID_BYTES");
_Static_assert(SAME(size) && SAME(magic) && SAME(version) && SAME(blocking) &&
               SAME(cgaClusterSize) && SAME(minCTAs) && SAME(maxCTAs) && SAME(netName),
               "ncclConfig_t's leading fields");
_Static_assert(sizeof(ncclConfig_t) >= sizeof(cxn_config), "ncclConfig_t size");
_Static_assert(sizeof(ncclResult_t) == sizeof(cxn_result), "ncclResult_t size");
_Static_assert(ncclSuccess == CXN_SUCCESS && ncclUnhandledCudaError == CXN_UNHANDLED_CUDA_ERROR
               && ncclSystemError == CXN_SYSTEM_ERROR && ncclInternalError == CXN_INTERNAL_ERROR
               && ncclInvalidArgument == CXN_INVALID_ARGUMENT
               && ncclInvalidUsage == CXN_INVALID_USAGE && ncclRemoteError == CXN_REMOTE_ERROR
               && ncclInProgress == CXN_IN_PROGRESS, "ncclResult_t values");
_Static_assert(ncclUint8 == CXN_UINT8, "ncclUint8");
_Static_assert(NCCL_VERSION(2, 17, 0) == CXN_CONFIG_VERSION, "NCCL_VERSION");
int main(void) {
    ncclConfig_t c = NCCL_CONFIG_INITIALIZER;
    printf("nccl.h %d: magic %#x\n", NCCL_VERSION_CODE, c.magic);
    return !(c.magic == CXN_CONFIG_MAGIC && c.blocking == CXN_CONFIG_UNDEF_INT &&
             c.netName == NULL && NCCL_VERSION_CODE >= CXN_MIN_VERSION);
}
"""
CUDA_STUB = "#define CUDART_VERSION 13000\ntypedef struct CUstream_st *cudaStream_t;\n"


def find_nccl_include() -> Path | None:
    dirs: list[Path] = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        dirs += [Path(root) / sub / "include" for sub in ("nccl", "cu13", "cu12")]
    lib = find_libnccl()
    if lib:
        dirs.append(Path(lib).resolve().parent.parent / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent.parent / "include")
    dirs += [Path("/usr/include"), Path("/usr/local/cuda/include"), Path("/usr/local/include")]
    return next((d for d in dirs if (d / "nccl.h").is_file()), None)


def test_config_struct_matches_the_real_nccl_h(tmp_path: Path) -> None:
    include, cc = find_nccl_include(), shutil.which("cc") or shutil.which("gcc")
    if include is None or cc is None:
        pytest.skip(f"nccl.h ({include}) or a C compiler ({cc}) not found")
    (tmp_path / "check.c").write_text(ABI_CHECK)
    stubs = tmp_path / "stubs"  # nccl.h needs only cudaStream_t from the CUDA headers
    stubs.mkdir()
    for name in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        (stubs / name).write_text(CUDA_STUB if name == "cuda_runtime.h" else "")
    build = subprocess.run([cc, "-std=gnu11", "-I", str(stubs), "-I", str(include), "-I",
                            str(ROOT / "cann_ext" / "src"), str(tmp_path / "check.c"), "-o",
                            str(tmp_path / "check")], capture_output=True, text=True)
    assert build.returncode == 0, f"ABI check against {include}/nccl.h:\n{build.stderr}"
    run = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
