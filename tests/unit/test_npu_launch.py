"""tools/npu_ranktable.py and tools/npu_launch.py on CPU: rank tables (1.0 and 1.2) and the
launcher's --dry-run output compared byte for byte with fixtures in tests/unit/data/npu/,
hccn_tool parsing and probing through a fake runner, every validation error, and a real run
with subprocess replaced (files written, commands issued). Nothing here touches an NPU.

Fixtures are regenerated with PD_SERVE_REGEN_FIXTURES=1 (review the diff before committing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data" / "npu"
NODES = "192.0.2.11,192.0.2.12"
ZK = "zk://192.0.2.100:2181,192.0.2.101:2181,192.0.2.102:2181/pd-serve"
REGEN = os.environ.get("PD_SERVE_REGEN_FIXTURES") == "1"


def _tool(name: str) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


rt = _tool("npu_ranktable")
launch = _tool("npu_launch")


def _expect(name: str, text: str) -> None:
    path = DATA / name
    if REGEN:
        path.write_text(text)
    assert text == path.read_text(), f"output differs from {path}"


def _launch_args(*extra: str) -> list[str]:
    """Launcher arguments for the test cluster; a later option in `extra` overrides."""
    return ["--nodes", NODES, "--device-ips", str(DATA / "device_ips.yaml"), "--registry", ZK,
            "--config", str(DATA / "base.yaml"), "--out-dir", "build/npu", *extra]


def _cluster(*extra: str) -> list[Any]:
    p = argparse.ArgumentParser()
    rt.add_cluster_args(p)
    return list(rt.cluster_from_args(p.parse_args(["--nodes", NODES, *extra])))


@pytest.mark.parametrize("version,ips", [("1.0", "device_ips.yaml"),
                                         ("1.2", "device_ips_a3.yaml")])
def test_rank_table_matches_fixture(version: str, ips: str, tmp_path: Path) -> None:
    out = tmp_path / "rank_table.json"
    assert rt.main(["--nodes", NODES, "--device-ips", str(DATA / ips), "--version", version,
                    "--out", str(out)]) == 0
    _expect(f"rank_table_v{version}.json", out.read_text())


@pytest.mark.parametrize("name,extra", [
    ("launch_g4.txt", ["--group-size", "4"]),
    ("launch_g8_local_v1.2.txt", ["--group-size", "8", "--local-node", "192.0.2.11",
                                  "--ssh-user", "hw", "--version", "1.2", "--device-ips",
                                  str(DATA / "device_ips_a3.yaml")]),
    ("stop_g4.txt", ["--group-size", "4", "--stop"]),
])
def test_dry_run_matches_fixture(name: str, extra: list[str],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(_launch_args("--dry-run", *extra)) == 0
    out = capsys.readouterr().out
    assert str(ROOT) not in out and str(DATA) not in out  # nothing of this machine
    _expect(name, out)


def test_one_npu_per_instance(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(_launch_args("--dry-run", "--group-size", "1", "--base-port", "9100")) == 0
    out = capsys.readouterr().out
    starts = [line for line in out.splitlines() if "pd_serve instance" in line]
    assert len(starts) == 16 and "--port 9107 --id 192.0.2.12-g7" in starts[-1]
    assert "ASCEND_RT_VISIBLE_DEVICES=7\nRANK_TABLE_FILE" in out and "RANK_ID=15" in out
    assert "# note:" not in out


def test_hccn_tool_output_and_probe() -> None:
    assert rt.parse_hccn_ip((DATA / "hccn_ip.txt").read_text(), "x") == "198.51.100.10"
    assert rt.parse_hccn_ip("ipaddr:10.0.0.5 netmask:255.255.255.0", "x") == "10.0.0.5"
    with pytest.raises(ValueError, match="no 'ipaddr:'"):
        rt.parse_hccn_ip("hccn_tool: device 9 not found", "node a device 9")
    seen: list[list[str]] = []

    def fake(argv: list[str]) -> str:
        seen.append(argv)
        node = 1 if argv[0] == "bash" else 2  # 192.0.2.11 is local, the other over ssh
        dev = int(argv[-1].split()[2])
        return f"ipaddr:198.51.100.{node * 10 + dev}\nnetmask:255.255.255.0\n"

    p = argparse.ArgumentParser()
    rt.add_cluster_args(p)
    args = p.parse_args(["--nodes", NODES, "--local-node", "192.0.2.11"])
    probed = rt.cluster_from_args(args, run=fake)
    assert probed == _cluster("--device-ips", str(DATA / "device_ips.yaml"))
    assert seen[0] == ["bash", "-c", "hccn_tool -i 0 -ip -g"]
    assert seen[8] == ["ssh", "-o", "BatchMode=yes", "192.0.2.12", "hccn_tool -i 0 -ip -g"]


def test_probe_failure_points_at_the_file_option() -> None:
    def broken(argv: list[str]) -> str:
        raise RuntimeError("bash: hccn_tool: command not found")

    with pytest.raises(RuntimeError, match="--device-ips FILE"):
        rt.probe_nodes(["192.0.2.11"], 8, broken, local_node="192.0.2.11")


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ips.yaml"
    path.write_text(text)
    return str(path)


def _ips(base: int, n: int = 8) -> str:
    return "[" + ", ".join(f"198.51.100.{base + i}" for i in range(n)) + "]"


@pytest.mark.parametrize("text,extra,match", [
    (f"192.0.2.11: {_ips(10)}\n192.0.2.12: {_ips(10)}\n", [], "appears twice"),
    (f"192.0.2.11: {_ips(10, 7)}\n192.0.2.12: {_ips(20)}\n", [], "has 7 device IPs, expected 8"),
    (f"192.0.2.11: [300.1.1.1, {_ips(11, 7)[1:]}\n192.0.2.12: {_ips(20)}\n", [],
     "'300.1.1.1' is not an IP address"),
    (f"192.0.2.11: {_ips(10)}\n", [], r"no entry for node\(s\) \['192.0.2.12'\]"),
    (f"192.0.2.11: {_ips(10)}\n192.0.2.12: {_ips(20)}\n192.0.2.13: {_ips(30)}\n", [],
     r"\['192.0.2.13'\] are not in --nodes"),
    (f"192.0.2.11: {{device_ips: {_ips(10)}, super_pod_id: '0', super_device_ids: "
     f"[0,1,2,3,4,5,6,7]}}\n192.0.2.12: {_ips(20)}\n", [], "need --version 1.2"),
    (f"192.0.2.11: {{device_ips: {_ips(10)}, super_pod_id: '0', super_device_ids: "
     f"[0,1,2,3,4,5,6,7]}}\n192.0.2.12: {_ips(20)}\n", ["--version", "1.2"], "some nodes"),
    (f"192.0.2.11: {{device_ips: {_ips(10)}, device_ids: [0,0,1,2,3,4,5,6]}}\n"
     f"192.0.2.12: {_ips(20)}\n", [], "8 distinct ids"),
    (f"192.0.2.11: {{device_ips: {_ips(10)}, port: 1}}\n192.0.2.12: {_ips(20)}\n", [],
     r"unknown key\(s\) \['port'\]"),
    ("- 1\n", [], "expected a mapping"),
])
def test_bad_cluster_input(text: str, extra: list[str], match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        _cluster("--device-ips", _write(tmp_path, text), *extra)


@pytest.mark.parametrize("nodes,match", [
    ("192.0.2.11,192.0.2.11", "more than once"), ("node one", "not an IP address or host"),
    (",", "no node given")])
def test_bad_node_lists(nodes: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rt.parse_nodes(nodes)


@pytest.mark.parametrize("extra,match", [
    (["--group-size", "3"], "does not divide 8"),
    (["--registry", "http://192.0.2.100:8500"], "must be zk://"),
    (["--base-port", "65530"], "above 65535"),
    (["--config", str(ROOT / "configs/deploy/gpu-pd.yaml")], "backend must be mindspore"),
    (["--devices-per-node", "4"], "expected 4"),
    (["--device-port", "70000"], "1..65535"),
])
def test_bad_launch_arguments(extra: list[str], match: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(_launch_args("--dry-run", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(match, err), err


def test_shipped_ascend_config_plans(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(ROOT / "configs/deploy/ascend-pd.yaml")
    assert launch.main(_launch_args("--dry-run", "--config", config)) == 0
    out = capsys.readouterr().out
    assert "transport_host: 192.0.2.12" in out and f"registry: {ZK}" in out


def test_real_run_writes_files_and_runs_the_plan(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[list[str]] = []

    def fake_run(argv: list[str], check: bool, timeout: float) -> None:
        ran.append(argv)

    monkeypatch.setattr(subprocess, "run", fake_run)
    out_dir = tmp_path / "npu"
    assert launch.main(_launch_args("--group-size", "4", "--out-dir", str(out_dir))) == 0
    assert len(ran) == 2 * (1 + 1 + 1 + 2)  # per node: mkdir, copy, pre-flight, two instances
    assert ran[1][0] == "scp" and ran[1][-1] == "192.0.2.11:/opt/pd-serve/run/npu/"
    written = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    assert written == ["192.0.2.11/192.0.2.11-g0.env", "192.0.2.11/192.0.2.11-g1.env",
                       "192.0.2.11/192.0.2.11.yaml", "192.0.2.12/192.0.2.12-g0.env",
                       "192.0.2.12/192.0.2.12-g1.env", "192.0.2.12/192.0.2.12.yaml",
                       "rank_table.json"]
    assert (out_dir / "rank_table.json").read_text() == (DATA / "rank_table_v1.0.json").read_text()
    assert "$ ssh -o BatchMode=yes 192.0.2.12" in capsys.readouterr().out
