"""The HCCL transport where CANN is missing (libraries absent at run time, or a build without the
backend): clear errors, the other transports unaffected; plus its config, memory checks and wire
spec. Checks that depend on what this process loaded run in a fresh interpreter (the libraries
load at most once per process)."""

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

from pd_serve.config import PDConfig
from pd_serve.kv import hccl_config, hccl_lib, nccl_wire
from pd_serve.kv.hccl_config import HcclConfig, hccl_unavailable_reason
from pd_serve.kv.hccl_regions import DeviceMemory, check_memory
from pd_serve.kv.hccl_wire import HCCL_WIRE, ConnId, RegionDesc
from pd_serve.kv.p2p_wire import FrameReader, Hello, PeerInfo, WireError, encode
from pd_serve.kv.transport import TransportError

ROOT = Path(__file__).resolve().parents[2]
HCCL_SYMBOLS = ["cx_hccl_load", "cx_hccl_get_root_info", "cx_hccl_comm_init", "cx_hccl_comm_poll",
                "cx_hccl_comm_destroy", "cx_hccl_send", "cx_hccl_recv", "cx_hccl_post",
                "cx_hccl_stream_create", "cx_hccl_stream_sync", "cx_hccl_event_query"]
INFO = PeerInfo("127.0.0.1", 4242, 1, "NPU-00ff")


def run_py(code: str, **env: str) -> dict[str, Any]:
    """Runs `code` in a fresh interpreter at the repo root; returns the JSON it printed last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_build_has_the_backend_where_it_was_required() -> None:
    """CI sets CANN_EXT_WITH_HCCL=1 (the build fails without CANN's headers); then every
    cx_hccl_* entry point must be in the library."""
    if os.environ.get("CANN_EXT_WITH_HCCL") != "1" and not hccl_lib.built():
        pytest.skip(hccl_lib.NOT_BUILT)
    from pd_serve.kv._cx_lib import _lib

    missing = [name for name in HCCL_SYMBOLS if not hasattr(_lib(), name)]
    assert not missing, f"libcann_ext.so lacks {missing}: the HCCL backend was not built"


@pytest.mark.skipif(not hccl_lib.built(), reason=hccl_lib.NOT_BUILT)
def test_absent_libraries_fail_clearly_and_the_others_keep_working() -> None:
    out = run_py("""
        import json
        import numpy as np
        from pd_serve.config import ModelSpec, PDConfig, ServeConfig
        from pd_serve.instance.runtime import make_transport
        from pd_serve.kv.hccl import HcclTransport
        from pd_serve.kv.transport import CannExtTransport, Read, TransportError
        r = {}
        try:
            HcclTransport()
        except TransportError as exc:
            r["direct"] = str(exc)
        cfg = ServeConfig(model=ModelSpec(backend="mindspore", device="ascend"),
                          pd=PDConfig(transport="hccl"))
        try:
            make_transport(cfg)
        except TransportError as exc:
            r["runtime"] = str(exc)
        owner, reader = CannExtTransport(), CannExtTransport()
        src = np.arange(256, dtype=np.uint8)  # [256]
        dst = np.zeros(256, dtype=np.uint8)  # [256]
        hs, hd = owner.register(src), reader.register(dst)
        peer = reader.connect(owner.conn_id(), 5.0)
        reader.read_batch(peer, hd, reader.import_(peer, owner.export(hs)), [Read(0, 0, 256)], 5.0)
        r["tcp_ok"] = bool((dst == src).all())
        owner.deregister(hs); reader.deregister(hd)
        r["leaks"] = owner.num_registered + reader.num_registered
        reader.close(); owner.close()
        print(json.dumps(r))
    """, PD_SERVE_ACL_LIB="/nonexistent/libascendcl.so")
    for msg in (out["direct"], out["runtime"]):
        assert msg.startswith("HCCL transport unavailable: libascendcl/libhccl cannot be loaded")
        assert "/nonexistent/libascendcl.so" in msg and "PD_SERVE_ACL_LIB" in msg
    assert out["tcp_ok"] is True and out["leaks"] == 0


def test_a_build_without_the_backend_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hccl_lib, "built", lambda: False)
    reason = hccl_unavailable_reason()
    assert reason is not None and "built without the HCCL backend" in reason
    assert "tools/fetch_cann_headers.py" in reason
    from pd_serve.kv.hccl import HcclTransport

    with pytest.raises(TransportError, match="HCCL transport unavailable: libcann_ext.so was "
                                             "built without the HCCL backend"):
        HcclTransport()


def test_missing_npu_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hccl_lib, "built", lambda: True)
    monkeypatch.setattr(hccl_lib, "load", lambda: None)
    monkeypatch.setattr(hccl_lib, "device_count", lambda: 2)
    assert hccl_config.hccl_unavailable_reason(3) == "NPU device 3 does not exist (2 visible)"
    assert hccl_config.hccl_unavailable_reason(1) is None


def test_pd_transport_accepts_hccl_and_says_what_is_missing_end_to_end() -> None:
    from pd_serve.config import ModelSpec, ServeConfig
    from pd_serve.instance.runtime import make_receiver, make_sender

    assert PDConfig(transport="hccl").transport == "hccl"
    with pytest.raises(ValueError, match="pd.transport must be one of"):
        PDConfig(transport="rdma")
    cfg = ServeConfig(model=ModelSpec(backend="mindspore", device="ascend"),
                      pd=PDConfig(transport="hccl"))
    for make in (make_sender, make_receiver):
        with pytest.raises(ValueError, match="hccl needs hand-off buffers in NPU memory"):
            make(cfg, None, None, 16)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, match", [
    ({"device": -1}, "hccl.device must be an NPU device index"),
    ({"device": True}, "hccl.device"),
    ({"bind_host": "0.0.0.0"}, "hccl.advertise_host is required"),
    ({"port": 70000}, "hccl.port"),
    ({"connect_timeout_s": 0}, "hccl.connect_timeout_s"),
])
def test_config_validation_names_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HcclConfig(**kwargs)


def test_registrable_memory() -> None:
    arr = np.zeros(64, np.uint8)  # [64]
    assert check_memory(DeviceMemory(arr.ctypes.data, 64, arr), 0) == (arr.ctypes.data, 64)
    with pytest.raises(TransportError, match="Ascend device memory .*got numpy.ndarray .*"
                                             "CannExtTransport"):
        check_memory(arr, 0)
    with pytest.raises(TransportError, match="DeviceMemory.nbytes must be > 0"):
        check_memory(DeviceMemory(arr.ctypes.data, 0), 0)
    with pytest.raises(TransportError, match="DeviceMemory.ptr must be a device address"):
        check_memory(DeviceMemory(0, 8), 0)
    torch = pytest.importorskip("torch")
    with pytest.raises(TransportError, match="on npu:0 cannot register a tensor on cpu"):
        check_memory(torch.zeros(8), 0)


def test_wire_spec_carries_the_whole_root_info_and_refuses_nccl_frames() -> None:
    uid = bytes(range(256)) * 16 + bytes(12)  # 4108 bytes, like an HcclRootInfo
    reader = FrameReader(HCCL_WIRE)
    assert reader.feed(encode(Hello(uid, INFO, 5000), HCCL_WIRE)) == [Hello(uid, INFO, 5000)]
    with pytest.raises(WireError, match="holds 128 bytes, expected 4108"):
        FrameReader(HCCL_WIRE).feed(encode(Hello(bytes(128), INFO, 5000), HCCL_WIRE))
    with pytest.raises(WireError, match="bad frame magic b'PDN1' .*b'PDH1'"):
        FrameReader(HCCL_WIRE).feed(nccl_wire.encode(Hello(bytes(128), INFO, 5000)))
    cid = ConnId("10.0.0.2", 40000, INFO, "ab12")
    assert ConnId.parse(cid.encode()) == cid and b'"pd-hccl/1"' in cid.encode()
    desc = RegionDesc("ab12", 5, 1 << 30)
    assert RegionDesc.parse(desc.encode()) == desc
    with pytest.raises(WireError, match="not an HCCL region descriptor"):
        RegionDesc.parse(nccl_wire.RegionDesc("ab12", 5, 8).encode())
    with pytest.raises(WireError, match="not an NCCL connection id .*'pd-hccl/1'"):
        nccl_wire.ConnId.parse(cid.encode())
