"""The NCCL transport where NCCL or CUDA is missing: clear errors, argument checks, host TCP
unaffected. Checks that depend on what this process loaded run in a fresh subprocess (libnccl
is loaded at most once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pd_serve.kv import nccl_lib, nccl_regions
from pd_serve.kv._cx_lib import _lib
from pd_serve.kv.nccl import NcclConfig, NcclTransport, nccl_unavailable_reason
from pd_serve.kv.nccl_regions import Regions
from pd_serve.kv.transport import CannExtTransport, Read, TransportError

ROOT = Path(__file__).resolve().parents[2]
NCCL_SYMBOLS = ["cx_nccl_load", "cx_nccl_get_unique_id", "cx_nccl_comm_init", "cx_nccl_comm_poll",
                "cx_nccl_comm_finalize", "cx_nccl_comm_destroy", "cx_nccl_comm_abort",
                "cx_nccl_group_start", "cx_nccl_group_end", "cx_nccl_send", "cx_nccl_recv",
                "cx_nccl_post"]


def run_py(code: str, **env: str) -> dict[str, Any]:
    """Runs `code` in a fresh interpreter at the repo root; returns the JSON it printed last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def cuda_and_nccl_present() -> bool:
    return nccl_unavailable_reason() is None


def test_library_exports_the_nccl_backend() -> None:
    lib = _lib()
    missing = [name for name in NCCL_SYMBOLS if not hasattr(lib, name)]
    assert not missing, f"libcann_ext.so lacks {missing}: the NCCL backend was not built"


def test_missing_libnccl_gives_a_clear_error() -> None:
    out = run_py("""
        import json
        from pd_serve.kv import nccl_lib
        try:
            nccl_lib.load()
            print(json.dumps({"loaded": True}))
        except nccl_lib.CannExtError as exc:
            print(json.dumps({"status": exc.status_name, "msg": str(exc)}))
    """, PD_SERVE_NCCL_LIB="/nonexistent/dir/libnccl.so.2")
    assert out["status"] == "CX_ERR_NOT_FOUND"
    msg = out["msg"]
    assert "/nonexistent/dir/libnccl.so.2" in msg and "No such file" in msg
    assert "PD_SERVE_NCCL_LIB" in msg and "nvidia-nccl-cu12" in msg
    assert "libnccl.so (" not in msg, "a path set on purpose must not fall back to the soname"


def test_calls_before_load_are_refused() -> None:
    out = run_py("""
        import ctypes, json
        from pd_serve.kv._cx_lib import _lib
        from pd_serve.kv import nccl_lib
        nccl_lib._nccl()  # signatures only, nothing loaded
        lib = _lib()
        buf = ctypes.create_string_buffer(128)
        st = lib.cx_nccl_get_unique_id(buf, 128)
        flag = ctypes.c_int()
        st2 = lib.cx_nccl_comm_poll(None, ctypes.byref(flag))
        print(json.dumps({"st": st, "err": lib.cx_last_error().decode(), "st2": st2,
                          "avail": lib.cx_backend_available(1)}))
    """)
    assert out["st"] == 4 and "libnccl is not loaded" in out["err"]  # CX_ERR_UNSUPPORTED
    assert out["st2"] == 4 and out["avail"] == 0


@pytest.mark.skipif(cuda_and_nccl_present(), reason="CUDA and libnccl are present here")
def test_transport_construction_fails_cleanly_and_host_tcp_still_works() -> None:
    reason = nccl_unavailable_reason()
    assert reason and ("CUDA is not available" in reason or "libnccl" in reason)
    with pytest.raises(TransportError, match="NCCL transport unavailable: .*(CUDA|libnccl)"):
        NcclTransport()
    owner, reader = CannExtTransport(), CannExtTransport()
    try:
        src = np.arange(256, dtype=np.uint8)  # [256]
        dst = np.zeros(256, dtype=np.uint8)  # [256]
        hs, hd = owner.register(src), reader.register(dst)
        peer = reader.connect(owner.conn_id(), 5.0)
        remote = reader.import_(peer, owner.export(hs))
        reader.read_batch(peer, hd, remote, [Read(0, 0, 256)], 5.0)
        np.testing.assert_array_equal(dst, src)
        owner.deregister(hs)
        reader.deregister(hd)
        assert owner.num_registered == 0 and reader.num_registered == 0
    finally:
        reader.close()
        owner.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"device": -1}, "nccl.device"),
    ({"device": True}, "nccl.device"),
    ({"bind_host": ""}, "nccl.bind_host"),
    ({"bind_host": "0.0.0.0"}, "advertise_host is required"),
    ({"port": 70000}, "nccl.port"),
    ({"connect_timeout_s": 0}, "nccl.connect_timeout_s"),
    ({"max_serve_s": float("inf")}, "nccl.max_serve_s"),
])
def test_config_validation_names_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NcclConfig(**kwargs)


def test_comm_init_checks_the_unique_id() -> None:
    with pytest.raises(ValueError, match="128 bytes"):
        nccl_lib.Comm.init(b"short", 2, 0)


def test_version_string() -> None:
    assert nccl_lib.version_string(22805) == "2.28.5"


def test_find_libnccl_prefers_the_env_then_the_wheel(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lib_dir = tmp_path / "nvidia" / "nccl" / "lib"
    lib_dir.mkdir(parents=True)
    (lib_dir / "libnccl.so.2").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = nccl_lib._wheel_libnccl()
    assert found is not None and found.endswith("nccl/lib/libnccl.so.2")
    monkeypatch.setenv(nccl_lib.NCCL_LIB_ENV, "/some/libnccl.so.2")
    assert nccl_lib.find_libnccl() is None  # the C side reads the variable itself


def test_register_rejects_host_memory_with_a_hint() -> None:
    torch = pytest.importorskip("torch")
    regions = Regions(0)
    with pytest.raises(TransportError, match="CUDA tensors, got numpy.ndarray .*CannExtTransport"):
        regions.add(np.zeros(8, np.uint8))
    with pytest.raises(TransportError, match="cannot register a tensor on cpu"):
        regions.add(torch.zeros(8))


def test_region_bookkeeping_overlap_pins_and_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    # CPU tensors stand in for CUDA ones: the bookkeeping is what is under test here.
    monkeypatch.setattr(nccl_regions, "check_tensor", lambda t, device: (
        int(t.data_ptr()), t.numel() * t.element_size()))
    regions = Regions(0)
    base = torch.zeros(1024, dtype=torch.uint8)  # [1024]
    h = regions.add(base[:512])
    with pytest.raises(TransportError, match=f"overlaps registration {h}"):
        regions.add(base[256:768])
    h2 = regions.add(base[512:])
    assert len(regions) == 2 and regions.get(h2).nbytes == 512
    regions.pin(h)
    with pytest.raises(TransportError, match=f"registration {h} is busy: 1 transfer"):
        regions.remove(h, wait_s=0.05)
    regions.unpin(h)
    regions.remove(h, wait_s=0.05)
    regions.remove(h2, wait_s=0.05)
    with pytest.raises(TransportError, match="unknown registration handle"):
        regions.get(h)
    assert len(regions) == 0
