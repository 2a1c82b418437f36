"""cann_ext's NCCL backend against a fake libnccl built here: loading, the version and symbol
checks, the config it passes, in-progress answers and error texts. Each case runs in a fresh
interpreter (libnccl is loaded at most once per process). Needs a C compiler (CI has one: it
builds cann_ext)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler to build the fake libnccl")

# Results and layouts as nccl.h declares them; the config check mirrors what NCCL's
# parseCommConfig relies on (size, magic, version) plus our non-blocking request.
FAKE_NCCL = r"""
#include <stdlib.h>
#include <string.h>
typedef struct { char internal[128]; } ncclUniqueId;
typedef struct { size_t size; unsigned magic, version; int blocking, cga, min_ctas, max_ctas;
                 const char *net_name; } cfg;
static int polls;
int ncclGetVersion(int *v) { const char *e = getenv("FAKE_NCCL_VERSION");
                             *v = e ? atoi(e) : 22805; return 0; }
int ncclGetUniqueId(ncclUniqueId *id) { memset(id, 0x5a, sizeof *id); return 0; }
int ncclCommInitRankConfig(void **comm, int n, ncclUniqueId id, int rank, cfg *c) {
    if (c->size != 40 || c->magic != 0xcafebeefu || c->version != 21700 || c->blocking != 0 ||
        c->net_name != NULL || n != 2 || rank != 1 || id.internal[7] != 0x5a) return 4;
    *comm = malloc(8); return 7; }
int ncclCommGetAsyncError(void *comm, int *state) { (void)comm;
                                                   *state = polls++ < 2 ? 7 : 0; return 0; }
int ncclCommFinalize(void *c) { (void)c; return 7; }
int ncclCommDestroy(void *c) { free(c); return 0; }
int ncclCommAbort(void *c) { free(c); return 0; }
int ncclGroupStart(void) { return 0; }
int ncclGroupEnd(void) { return 7; }
int ncclSend(const void *b, size_t n, int t, int p, void *c, void *s) {
    (void)b; (void)t; (void)p; (void)c; (void)s; return n == 13 ? 6 : 0; }
int ncclRecv(void *b, size_t n, int t, int p, void *c, void *s) {
    (void)b; (void)n; (void)p; (void)c; (void)s; return t == 1 ? 0 : 4; }
const char *ncclGetErrorString(int r) { return r == 6 ? "remote process exited" : "other"; }
const char *ncclGetLastError(void *c) { (void)c; return "peer 0 vanished"; }
"""


@pytest.fixture(scope="module")
def fake_libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fake_nccl")
    (tmp / "full.c").write_text(FAKE_NCCL)
    (tmp / "partial.c").write_text("int ncclGetVersion(int *v) { *v = 22805; return 0; }\n")
    libs = {}
    assert CC is not None
    for name in ("full", "partial"):
        libs[name] = tmp / f"libfake_{name}.so"
        subprocess.run([CC, "-shared", "-fPIC", "-o", str(libs[name]), str(tmp / f"{name}.c")],
                       check=True)
    return libs


def run_case(code: str, lib: Path, **env: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
        capture_output=True, timeout=120,
        env={**os.environ, "PD_SERVE_NCCL_LIB": str(lib), **env})
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_full_cycle_against_the_fake(fake_libs: dict[str, Path]) -> None:
    out = run_case("""
        import json
        import numpy as np
        from pd_serve.kv import nccl_lib
        from pd_serve.kv._cx_lib import _lib
        r = {"version": nccl_lib.load(), "again": nccl_lib.load(),
             "avail": _lib().cx_backend_available(1)}
        uid = nccl_lib.unique_id()
        r["uid"] = uid == b"\\x5a" * 128
        comm = nccl_lib.Comm.init(uid, 2, 1)  # the fake checks the config we pass
        r["polls"] = [comm.in_progress() for _ in range(3)]
        one = np.ones(1, np.int64)
        r["recv_busy"] = comm.post(True, 4096, one * 0, one * 64, 0, 0)
        try:
            comm.post(False, 4096, np.array([0, 64]), np.array([64, 13]), 0, 0)
        except nccl_lib.CannExtError as exc:
            r["send_err"] = [exc.status_name, str(exc)]
        comm.abort()
        comm.abort()  # idempotent
        r["alive"] = comm.alive
        print(json.dumps(r))
    """, fake_libs["full"])
    assert out["version"] == 22805 and out["again"] == 22805 and out["avail"] == 1
    assert out["uid"] and out["polls"] == [True, True, False]
    assert out["recv_busy"] is True  # the fake's group end answers ncclInProgress
    status, msg = out["send_err"]
    assert status == "CX_ERR_CONNECTION"  # ncclRemoteError
    assert "ncclSend of range 1 failed: ncclResult_t 6" in msg
    assert "remote process exited" in msg and "peer 0 vanished" in msg
    assert out["alive"] is False


def test_old_nccl_is_refused_with_its_version(fake_libs: dict[str, Path]) -> None:
    out = run_case("""
        import json
        from pd_serve.kv import nccl_lib
        try:
            nccl_lib.load()
        except nccl_lib.CannExtError as exc:
            print(json.dumps({"msg": str(exc)}))
    """, fake_libs["full"], FAKE_NCCL_VERSION="21602")
    assert "version code 21602, need >= 21700" in out["msg"]


def test_library_without_nccl_symbols_is_refused(fake_libs: dict[str, Path]) -> None:
    out = run_case("""
        import json
        from pd_serve.kv import nccl_lib
        try:
            nccl_lib.load()
        except nccl_lib.CannExtError as exc:
            print(json.dumps({"status": exc.status_name, "msg": str(exc)}))
    """, fake_libs["partial"])
    assert out["status"] == "CX_ERR_NOT_FOUND"
    assert "not NCCL >= 2.17: no symbol ncclGetUniqueId" in out["msg"]


def test_unavailable_reason_is_only_cuda_once_libnccl_loads(fake_libs: dict[str, Path]) -> None:
    out = run_case("""
        import json
        import torch
        from pd_serve.kv.nccl import nccl_unavailable_reason
        print(json.dumps({"reason": nccl_unavailable_reason(),
                          "cuda": torch.cuda.is_available()}))
    """, fake_libs["full"])
    if out["cuda"]:
        pytest.skip("CUDA is present: the fake would be the only missing piece")
    assert out["reason"].startswith("CUDA is not available") and "libnccl" not in out["reason"]
