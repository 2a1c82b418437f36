"""tools/fetch_cann_headers.py on a synthetic torch-npu wheel: only the HCCL and ACL headers are
extracted, a second run downloads nothing, odd member paths and missing headers are refused, and
an unreachable index gives a clear error (no network is used here)."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_cann_headers",
                                                  ROOT / "tools" / "fetch_cann_headers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fetch = load_tool()
HEADERS = ["third_party/hccl/inc/hccl/hccl.h", "third_party/hccl/inc/hccl/hccl_types.h",
           "third_party/acl/inc/acl/acl.h", "third_party/acl/inc/acl/acl_rt.h",
           "third_party/acl/inc/acl/error_codes/rt_error_codes.h"]


def make_wheel(path: Path, members: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        for name in members:
            wheel.writestr(name, f"/* {name} */\n")
    return path


def test_extracts_only_the_headers_and_is_idempotent(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    members = [fetch.PREFIX + h for h in HEADERS] + [
        "torch_npu/lib/libtorch_npu.so", "torch_npu/include/torch_npu/csrc/npu.h",
        "torch_npu/include/third_party/acl/inc/graph/types.h"]
    wheel = make_wheel(tmp_path / "torch_npu-9.9.9-cp311-none-any.whl", members)
    dest = tmp_path / "build" / "cann_headers"
    dirs = fetch.fetch("9.9.9", dest, wheel)
    assert dirs == [dest / "include/third_party/hccl/inc", dest / "include",
                    dest / "include/third_party/acl/inc"]
    got = sorted(str(p.relative_to(dest / "include")) for p in dest.rglob("*.h"))
    assert got == sorted(HEADERS)  # no library, no framework or graph headers
    source = json.loads((dest / "SOURCE.json").read_text())
    assert source["version"] == "9.9.9" and source["files"] == sorted(HEADERS)

    def no_download(*args: object) -> Path:
        raise AssertionError("a second run must not download")

    monkeypatch.setattr(fetch, "download", no_download)
    assert fetch.fetch("9.9.9", dest, None) == dirs
    assert not list(tmp_path.glob("build/.cann_headers-*")), "temporary folder left behind"


def test_refuses_odd_paths_and_missing_headers(tmp_path: Path) -> None:
    odd = make_wheel(tmp_path / "odd.whl", [fetch.PREFIX + "third_party/hccl/inc/hccl/../../x.h"])
    with pytest.raises(fetch.FetchError, match="odd path"):
        fetch.fetch("1", tmp_path / "a", odd)
    partial = make_wheel(tmp_path / "partial.whl", [fetch.PREFIX + HEADERS[0]])
    with pytest.raises(fetch.FetchError, match="lacks .*hccl_types.h"):
        fetch.fetch("1", tmp_path / "b", partial)
    assert not (tmp_path / "b").exists()


def test_unreachable_index_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def offline(version: str, into: Path, target: object) -> tuple[str, bool]:
        calls.append(target)
        return "ERROR: No matching distribution found for torch-npu==2.14.0", True

    monkeypatch.setattr(fetch, "_pip_download", offline)
    assert fetch.main(["--dest", str(tmp_path / "c")]) == 1
    err = capsys.readouterr()
    assert err.out == "" and "cannot reach the package index" in err.err
    assert "--wheel PATH" in err.err and "CANN_EXT_HCCL_INCLUDE" in err.err
    assert calls == [None], "offline: no retry for other platforms"
