"""cann_ext's HCCL backend (compiled against CANN's real headers) against a fake libascendcl and
libhccl built here (tests/fake_hccl.py): loading, optional symbols, root info, the join thread,
HcclBatchSendRecv items, send/recv, events and stream sync, error texts and the code map. Each
case runs in a fresh interpreter (the libraries are loaded at most once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pd_serve.kv import hccl_lib
from tests.fake_hccl import CC, build_fake_hccl

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.skipif(CC is None, reason="no C compiler to build the fake libraries"),
    pytest.mark.skipif(not hccl_lib.built(), reason=hccl_lib.NOT_BUILT),
]

PRELUDE = """
import ctypes, json, os, threading, time
import numpy as np
from pd_serve.kv import hccl_lib
from pd_serve.kv._cx_lib import _lib
acl = ctypes.CDLL(os.environ["PD_SERVE_ACL_LIB"], mode=ctypes.RTLD_GLOBAL)
fake = ctypes.CDLL(os.environ["PD_SERVE_HCCL_LIB"])
fake.fake_hccl_last_batch.restype = ctypes.c_char_p

def pair(devices=(0, 1)):
    uid = hccl_lib.root_info(devices[0])  # rank 0 made it: it is the root
    comms = [hccl_lib.Comm.init(uid, 2, r, devices[r]) for r in (0, 1)]
    deadline = time.monotonic() + 10
    while any(c.in_progress() for c in comms) and time.monotonic() < deadline:
        time.sleep(0.001)
    return uid, comms
"""


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("fake_hccl")
    return {v: build_fake_hccl(root / v, v) for v in ("full", "old", "no_batch")}


def run_case(code: str, libs: tuple[Path, Path] | None, **env: str) -> dict[str, Any]:
    paths = {} if libs is None else {"PD_SERVE_ACL_LIB": str(libs[0]),
                                     "PD_SERVE_HCCL_LIB": str(libs[1])}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
        capture_output=True, timeout=120, env={**os.environ, **paths, **env})
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_full_cycle_batches_send_recv_events(fakes: dict[str, tuple[Path, Path]]) -> None:
    out = run_case(PRELUDE + """
hccl_lib.load(); hccl_lib.load()  # once per process
r = {"avail": _lib().cx_backend_available(2), "count": hccl_lib.device_count(),
     "uuid": hccl_lib.device_uuid(1)}
uid, (c0, c1) = pair()
r["uid"] = [len(uid), uid[-1]]
s0, s1 = hccl_lib.Stream(0), hccl_lib.Stream(1)
src = np.arange(4096, dtype=np.uint8)  # [4096] the owner's "device memory"
dst = np.zeros(4096, dtype=np.uint8)  # [4096]
offs, lens = np.array([0, 1024, 3000]), np.array([1024, 1976, 1096])
c1.post(False, src.ctypes.data, offs, lens, 0, s1.handle)  # owner (rank 1) sends
r["send_batch"] = json.loads(fake.fake_hccl_last_batch())
ev = hccl_lib.Event(0)
c0.post(True, dst.ctypes.data, offs, lens, 1, s0.handle)  # reader (rank 0) receives
r["recv_batch"] = json.loads(fake.fake_hccl_last_batch())
ev.record(s0)
r["event"] = ev.query()
r["synced"] = [s0.sync(1.0), s1.sync(1.0)]
r["bytes_ok"] = bool((dst == src).all())
one = np.zeros(16, np.uint8)  # [16]
c0.recv(one.ctypes.data, 16, 1, s0.handle)
pending = hccl_lib.Event(0); pending.record(s0)
r["pending"] = [pending.query(), s0.sync(0.05)]
c1.send(src.ctypes.data + 100, 16, 0, s1.handle)
r["single"] = [s0.sync(1.0), bool((one == src[100:116]).all())]
s0.wait_event(ev)
buf = hccl_lib.DeviceBuffer(1, 64); buf.free()
for c in (c0, c1): c.abort(); c.abort()
time.sleep(0.2)  # the destroys run on detached threads
for s in (s0, s1): s.destroy()
del ev, pending
r["alive"] = [c0.alive, fake.fake_hccl_live(), acl.fake_acl_live()]
print(json.dumps(r))
""", fakes["full"])
    assert out["avail"] == 1 and out["count"] == 2
    assert out["uuid"] == "NPU-" + b"fake-npu-1".ljust(16, b"\0").hex()
    assert out["uid"] == [4108, 0x5a]  # the whole HcclRootInfo travelled
    # HcclSendRecvItem as CANN documents it: [type, buf - first buf, count, dataType, rank]
    assert out["send_batch"] == {"n": 3, "items": [[0, 0, 1024, 7, 0], [0, 1024, 1976, 7, 0],
                                                   [0, 3000, 1096, 7, 0]]}
    assert out["recv_batch"]["items"][2] == [1, 3000, 1096, 7, 1]
    assert out["event"] is True and out["synced"] == [True, True] and out["bytes_ok"]
    assert out["pending"] == [False, False]  # a recv nobody sent to yet: not done, sync times out
    assert out["single"] == [True, True]
    assert out["alive"] == [False, 0, 0]


def test_old_acl_without_optional_symbols(fakes: dict[str, tuple[Path, Path]]) -> None:
    out = run_case(PRELUDE + """
hccl_lib.load()
uid, (c0, c1) = pair()
s0 = hccl_lib.Stream(0)
dst = np.zeros(8, np.uint8)
c0.recv(dst.ctypes.data, 8, 1, s0.handle)
r = {"uuid": hccl_lib.device_uuid(0), "timeout": s0.sync(0.05)}  # event-polling fallback
c1.send(np.ones(8, np.uint8).ctypes.data, 8, 0, hccl_lib.Stream(1).handle)
r["done"] = s0.sync(1.0)
print(json.dumps(r))
""", fakes["old"])
    assert out == {"uuid": "", "timeout": False, "done": True}


@pytest.mark.parametrize("code, status, text", [
    (1, "CX_ERR_INVALID_ARG", "HcclResult 1, invalid parameter"),
    (3, "CX_ERR_NO_MEMORY", "memory error"),
    (5, "CX_ERR_UNSUPPORTED", "not supported"),
    (6, "CX_ERR_NOT_FOUND", "resource not found"),
    (9, "CX_ERR_TIMEOUT", "timed out (HCCL_CONNECT_TIMEOUT / HCCL_EXEC_TIMEOUT) (EI0006"),
    (11, "CX_ERR_CONNECTION", "TCP connect to the root failed (check HCCL_IF_IP) (EI0001"),
    (12, "CX_ERR_CONNECTION", "RoCE connect failed"),
    (20, "CX_ERR_BUSY", "try again"),
    (21, "CX_ERR_CONNECTION", "the peer failed (error completion) (EI0015: error CQE)"),
    (24, "CX_ERR_NO_MEMORY", "out of device memory"),
    (4, "CX_ERR_BACKEND", "internal HCCL error"),
    (99, "CX_ERR_BACKEND", "unknown HcclResult"),
])
def test_init_failures_map_to_clear_errors(fakes: dict[str, tuple[Path, Path]], code: int,
                                           status: str, text: str) -> None:
    out = run_case(PRELUDE + """
hccl_lib.load()
comm = hccl_lib.Comm.init(hccl_lib.root_info(0), 2, 0, 0)
try:
    while comm.in_progress():
        time.sleep(0.001)
except hccl_lib.CannExtError as exc:
    print(json.dumps({"status": exc.status_name, "msg": str(exc)}))
comm.abort()
""", fakes["full"], FAKE_HCCL_INIT_FAIL=str(code))
    assert out["status"] == status
    assert f"HcclCommInitRootInfo failed: HcclResult {code}" in out["msg"] and text in out["msg"]
    assert "recent ACL error: EI9999: fake init failure" in out["msg"]


def test_async_error_and_misuse_are_refused(fakes: dict[str, tuple[Path, Path]]) -> None:
    out = run_case(PRELUDE + """
hccl_lib.load()
r = {}
def err(fn):
    try:
        fn()
    except (hccl_lib.CannExtError, ValueError) as exc:
        return [getattr(exc, "status_name", "ValueError"), str(exc)]
# The pair joins first: joins are serialised per device (HCCL's rule), so a pair made after the
# lonely join would wait on device 0 until that one timed out, while its rank 1 timed out too.
uid, (c0, c1) = pair()
lonely = hccl_lib.Comm.init(hccl_lib.root_info(0), 2, 0, 0)  # nobody joins
s = hccl_lib.Stream(0)
r["joining"] = err(lambda: lonely.post(True, 4096, np.zeros(1), np.ones(1), 1, s.handle))
lonely.abort()  # abandoned: the join thread frees it when the join times out
r["short_uid"] = err(lambda: hccl_lib.Comm.init(b"x" * 128, 2, 0, 0))
r["rank"] = err(lambda: hccl_lib.Comm.init(hccl_lib.root_info(0), 2, 2, 0))
r["empty"] = err(lambda: c0.post(True, 4096, np.zeros(1), np.zeros(1), 1, s.handle))
r["bad_peer"] = err(lambda: c0.post(True, 4096, np.zeros(1), np.ones(1), 0, s.handle))
r["bad_device"] = err(lambda: hccl_lib.Stream(7))
fake.fake_hccl_set_async_error(21)
r["async"] = err(c0.in_progress)
for c in (c0, c1): c.abort()
r["destroyed"] = err(c0.in_progress)
time.sleep(1.5)  # FAKE_HCCL_JOIN_S=1: the abandoned join ends, frees its record
r["live"] = fake.fake_hccl_live()
print(json.dumps(r))
""", fakes["full"], FAKE_HCCL_JOIN_S="1")
    assert out["joining"][0] == "CX_ERR_INVALID_ARG" and "still joining" in out["joining"][1]
    assert out["short_uid"][0] == "ValueError" and "4108-byte root info" in out["short_uid"][1]
    assert out["rank"][0] == "CX_ERR_INVALID_ARG" and "rank 2 outside [0, 2)" in out["rank"][1]
    assert out["empty"][0] == "CX_ERR_OUT_OF_RANGE" and "range 0" in out["empty"][1]
    assert out["bad_peer"][0] == "CX_ERR_INVALID_ARG"
    assert "HcclBatchSendRecv failed: HcclResult 1" in out["bad_peer"][1]
    assert out["bad_device"][0] == "CX_ERR_INVALID_ARG"
    assert "aclrtSetDevice failed: aclError 107001" in out["bad_device"][1]
    assert "EE1001: no device 7" in out["bad_device"][1]
    assert out["async"][0] == "CX_ERR_CONNECTION"
    assert "the communicator failed: HcclResult 21" in out["async"][1]
    assert "was destroyed" in out["destroyed"][1]
    assert out["live"] == 0


def test_calls_before_load_are_refused(fakes: dict[str, tuple[Path, Path]]) -> None:
    out = run_case("""
        import ctypes, json
        from pd_serve.kv import hccl_lib
        from pd_serve.kv._cx_lib import _lib
        lib = hccl_lib._hccl()  # signatures only, nothing loaded
        buf, n = ctypes.create_string_buffer(4108), ctypes.c_size_t()
        st = lib.cx_hccl_get_root_info(0, buf, 4108, ctypes.byref(n))
        print(json.dumps({"st": st, "err": lib.cx_last_error().decode(),
                          "avail": _lib().cx_backend_available(2)}))
    """, fakes["full"])
    assert out["st"] == 4 and "libhccl is not loaded" in out["err"]  # CX_ERR_UNSUPPORTED
    assert out["avail"] == 0


@pytest.mark.parametrize("which, match", [
    ("acl", ["cannot load libascendcl: tried /nonexistent/libascendcl.so (", "No such file",
             "PD_SERVE_ACL_LIB"]),
    ("hccl", ["cannot load libhccl: tried /nonexistent/libhccl.so (", "PD_SERVE_HCCL_LIB"]),
    ("no_batch", ["cannot load libhccl: tried ", "no symbol HcclBatchSendRecv"]),
])
def test_missing_libraries_give_clear_errors(fakes: dict[str, tuple[Path, Path]], which: str,
                                             match: list[str]) -> None:
    acl, hccl = fakes["no_batch" if which == "no_batch" else "full"]
    env = {"PD_SERVE_ACL_LIB": "/nonexistent/libascendcl.so" if which == "acl" else str(acl),
           "PD_SERVE_HCCL_LIB": "/nonexistent/libhccl.so" if which == "hccl" else str(hccl)}
    out = run_case("""
        import json
        from pd_serve.kv import hccl_lib
        try:
            hccl_lib.load()
        except hccl_lib.CannExtError as exc:
            print(json.dumps({"status": exc.status_name, "msg": str(exc)}))
    """, None, **env)
    assert out["status"] == "CX_ERR_NOT_FOUND"
    for text in match:
        assert text in out["msg"]
    assert "; libascendcl.so (" not in out["msg"] and "; libhccl.so (" not in out["msg"], \
        "a path set on purpose must not fall back to the soname"
