"""HCCL rank tables for an Ascend cluster (version 1.0 for Atlas A2, 1.2 for A3 SuperPoD) built
from a node list and each node's device RoCE IPs, read with `hccn_tool -i N -ip -g` (over ssh
for other nodes) or given in a YAML/JSON file; bad input is a ValueError naming the node.

Device file (YAML or JSON), one entry per node, IPs in device order (`hccn_tool -i N -ip -g`,
or `address_N` in the node's /etc/hccn.conf):
    10.0.0.1: [192.168.1.10, 192.168.1.11, ...]
    10.0.0.2:
      device_ips: [192.168.2.10, ...]
      device_ids: [0, 1, ...]       # physical ids (/dev/davinciN); default 0..n-1
      super_pod_id: "0"             # v1.2 only, both from `npu-smi info -t spod-info -i N -c C`
      super_device_ids: [8, 9, ...]

Usage:
    python tools/npu_ranktable.py --nodes 10.0.0.1,10.0.0.2 --device-ips ips.yaml \
        [--version 1.2] [--out rank_table.json]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

VERSIONS = ("1.0", "1.2")
HOSTNAME = re.compile(r"^(?=.{1,64}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
HCCN_IP = re.compile(r"ipaddr\s*:\s*(\S+)")
Runner = Callable[[list[str]], str]  # runs a command, returns its stdout, raises on failure


@dataclass(frozen=True)
class NodeDevices:
    """One server of the rank table: its host and its devices, in rank order."""

    host: str
    device_ips: tuple[str, ...]
    device_ids: tuple[int, ...]
    super_pod_id: str | None = None
    super_device_ids: tuple[int, ...] | None = None


def parse_nodes(csv: str) -> list[str]:
    hosts = [h.strip() for h in csv.split(",") if h.strip()]
    if not hosts:
        raise ValueError("--nodes: no node given")
    for h in hosts:
        if not (is_ip(h) or HOSTNAME.match(h)):
            raise ValueError(f"node {h!r}: not an IP address or host name (<= 64 characters)")
    dup = sorted({h for h in hosts if hosts.count(h) > 1})
    if dup:
        raise ValueError(f"--nodes lists {', '.join(dup)} more than once")
    return hosts


def parse_hccn_ip(output: str, where: str) -> str:
    """The address in `hccn_tool -i N -ip -g` output ("ipaddr:192.168.1.8" and a netmask)."""
    match = HCCN_IP.search(output)
    if match is None:
        raise ValueError(f"{where}: no 'ipaddr:' in hccn_tool output {output.strip()!r}")
    return match.group(1)


def remote(host: str, shell: str, local_node: str | None, ssh_user: str | None) -> list[str]:
    """argv running `shell` on `host`: bash here for the local node, else ssh."""
    if host == local_node:
        return ["bash", "-c", shell]
    target = f"{ssh_user}@{host}" if ssh_user else host
    return ["ssh", "-o", "BatchMode=yes", target, shell]


def probe_nodes(hosts: list[str], per_node: int, run: Runner, local_node: str | None = None,
                ssh_user: str | None = None) -> list[NodeDevices]:
    """Reads devices 0..per_node-1 of every node with hccn_tool (read-only)."""
    nodes = []
    for host in hosts:
        ips = []
        for d in range(per_node):
            argv = remote(host, f"hccn_tool -i {d} -ip -g", local_node, ssh_user)
            try:
                out = run(argv)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc} (where hccn_tool cannot run, give --device-ips "
                                   f"FILE)") from exc
            ips.append(parse_hccn_ip(out, f"node {host} device {d}"))
        nodes.append(NodeDevices(host, tuple(ips), tuple(range(per_node))))
    return nodes


def load_device_file(path: str | Path, hosts: list[str]) -> list[NodeDevices]:
    """The nodes of `hosts`, in that order, from a device file (see the module docstring)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping node -> device IPs")
    data = {str(k): v for k, v in data.items()}
    extra = sorted(set(data) - set(hosts))
    missing = [h for h in hosts if h not in data]
    if missing:
        raise ValueError(f"{path}: no entry for node(s) {missing}")
    if extra:
        raise ValueError(f"{path}: node(s) {extra} are not in --nodes")
    return [_node_entry(h, data[h], f"{path}: node {h}") for h in hosts]


def _node_entry(host: str, entry: Any, where: str) -> NodeDevices:
    if isinstance(entry, list):
        entry = {"device_ips": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("device_ips"), list):
        raise ValueError(f"{where}: expected a list of device IPs or a mapping with device_ips")
    unknown = sorted(set(entry) - {"device_ips", "device_ids", "super_pod_id",
                                   "super_device_ids"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}")
    ips = tuple(str(ip) for ip in entry["device_ips"])
    ids = _int_list(entry.get("device_ids", list(range(len(ips)))), where, "device_ids")
    sdids = entry.get("super_device_ids")
    pod = entry.get("super_pod_id")
    return NodeDevices(host, ips, ids, None if pod is None else str(pod),
                       None if sdids is None else _int_list(sdids, where, "super_device_ids"))


def _int_list(value: Any, where: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"{where}: {key} must be a list of non-negative integers")
    return tuple(value)


def validate(nodes: list[NodeDevices], per_node: int, version: str) -> None:
    """Device counts, IP syntax, duplicates and the v1.2 super-pod fields, across the cluster."""
    if version not in VERSIONS:
        raise ValueError(f"rank table version must be one of {VERSIONS}, got {version!r}")
    seen: dict[str, str] = {}
    for node in nodes:
        where = f"node {node.host}"
        if len(node.device_ips) != per_node:
            raise ValueError(f"{where} has {len(node.device_ips)} device IPs, expected "
                             f"{per_node} (--devices-per-node)")
        if len(node.device_ids) != per_node or len(set(node.device_ids)) != per_node:
            raise ValueError(f"{where}: device_ids must be {per_node} distinct ids")
        for dev, ip in zip(node.device_ids, node.device_ips):
            if not is_ip(ip):
                raise ValueError(f"{where} device {dev}: {ip!r} is not an IP address")
            if ip in seen:
                raise ValueError(f"device IP {ip} appears twice: {seen[ip]} and {where} "
                                 f"device {dev}")
            seen[ip] = f"{where} device {dev}"
        _check_super(node, per_node, version)
    pods = {n.super_pod_id is None for n in nodes}
    if len(pods) > 1:
        raise ValueError("super_pod_id is given for some nodes but not others")


def _check_super(node: NodeDevices, per_node: int, version: str) -> None:
    given = node.super_pod_id is not None or node.super_device_ids is not None
    if given and version != "1.2":
        raise ValueError(f"node {node.host}: super_pod_id/super_device_ids need --version 1.2")
    if given and (node.super_pod_id is None or node.super_device_ids is None
                  or len(node.super_device_ids) != per_node):
        raise ValueError(f"node {node.host}: give super_pod_id and {per_node} super_device_ids "
                         f"together")


def build_rank_table(nodes: list[NodeDevices], version: str,
                     device_port: int | None = None) -> dict[str, Any]:
    """The rank table (every value a string, as HCCL expects); rank ids run node by node."""
    servers, rank = [], 0
    for node in nodes:
        devices = []
        for i, (dev, ip) in enumerate(zip(node.device_ids, node.device_ips)):
            entry = {"device_id": str(dev)}
            if node.super_device_ids is not None:
                entry["super_device_id"] = str(node.super_device_ids[i])
            entry["device_ip"] = ip
            if device_port is not None:
                entry["device_port"] = str(device_port)
            entry["rank_id"] = str(rank)
            devices.append(entry)
            rank += 1
        server: dict[str, Any] = {"server_id": node.host}
        if version == "1.2" and is_ip(node.host):
            server["host_ip"] = node.host
        servers.append({**server, "device": devices})
    table: dict[str, Any] = {"status": "completed", "version": version,
                             "server_count": str(len(nodes)), "server_list": servers}
    pods: dict[str, list[dict[str, str]]] = {}
    for node in nodes:
        if node.super_pod_id is not None:
            pods.setdefault(node.super_pod_id, []).append({"server_id": node.host})
    if pods:
        table["super_pod_list"] = [{"super_pod_id": p, "server_list": s} for p, s in pods.items()]
    return table


def dumps(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=2) + "\n"


def run_command(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{' '.join(argv)}: {exc}") from exc
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", required=True, help="comma-separated host IPs/names, rank order")
    p.add_argument("--device-ips", help="YAML/JSON node -> device IPs (default: hccn_tool)")
    p.add_argument("--devices-per-node", type=int, default=8)
    p.add_argument("--version", choices=VERSIONS, default="1.0", help="rank table version")
    p.add_argument("--device-port", type=int, help="device NIC port in the table (optional)")
    p.add_argument("--local-node", help="the node that is this machine (no ssh)")
    p.add_argument("--ssh-user", help="user for ssh/scp (default: ssh's own)")


def cluster_from_args(args: argparse.Namespace, run: Runner = run_command) -> list[NodeDevices]:
    """Validated nodes from --nodes and --device-ips (or hccn_tool when no file is given)."""
    hosts = parse_nodes(args.nodes)
    if args.devices_per_node <= 0:
        raise ValueError(f"--devices-per-node must be positive, got {args.devices_per_node}")
    if args.device_port is not None and not 0 < args.device_port < 65536:
        raise ValueError(f"--device-port must be 1..65535, got {args.device_port}")
    nodes = (load_device_file(args.device_ips, hosts) if args.device_ips else
             probe_nodes(hosts, args.devices_per_node, run, args.local_node, args.ssh_user))
    validate(nodes, args.devices_per_node, args.version)
    return nodes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cluster_args(p)
    p.add_argument("--out", help="write the table here (default: print it)")
    args = p.parse_args(argv)
    try:
        text = dumps(build_rank_table(cluster_from_args(args), args.version, args.device_port))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
