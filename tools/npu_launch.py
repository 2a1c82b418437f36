"""Starts (or stops) pd-serve instances on an Ascend cluster: each node's NPUs split into device
groups, one stateless instance per group registered in ZooKeeper, with the HCCL rank table, a
per-node config and a per-group environment copied to the nodes over ssh. `--dry-run` prints
every file and command and touches nothing; the orchestrator and gateway start separately
(docs/operations.md).

Usage:
    python tools/npu_launch.py --nodes 10.0.0.1,10.0.0.2 --device-ips ips.yaml --group-size 1 \
        --registry zk://10.0.0.100:2181/pd-serve --config configs/deploy/ascend-pd.yaml \
        [--remote-dir /opt/pd-serve] [--base-port 9000] [--dry-run] [--stop]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
if str(TOOLS.parent) not in sys.path:
    sys.path.insert(0, str(TOOLS.parent))

from npu_ranktable import (  # noqa: E402
    NodeDevices,
    add_cluster_args,
    build_rank_table,
    cluster_from_args,
    dumps,
    is_ip,
    remote,
)

from pd_serve.config import ServeConfig, from_dict  # noqa: E402

RUN_DIR = "run/npu"  # under --remote-dir on every node
CANN_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"


@dataclass(frozen=True)
class Group:
    """One instance: `devices` (physical ids) of `node`, their rank ids, its port and name."""

    node: str
    index: int
    devices: tuple[int, ...]
    ranks: tuple[int, ...]
    port: int

    @property
    def name(self) -> str:
        return f"{self.node}-g{self.index}"


@dataclass(frozen=True)
class FileOut:
    local: str  # path under --out-dir
    node: str | None  # None: every node
    remote: str  # path under --remote-dir
    content: str


@dataclass(frozen=True)
class Plan:
    header: list[str]
    files: list[FileOut]
    commands: list[list[str]]


def split_groups(nodes: list[NodeDevices], size: int, base_port: int) -> list[Group]:
    """Each node's devices in order, `size` per group; ranks follow the rank table."""
    per_node = len(nodes[0].device_ids)
    if size <= 0 or per_node % size:
        raise ValueError(f"--group-size {size} does not divide {per_node} devices per node")
    groups, rank = [], 0
    for node in nodes:
        for k in range(per_node // size):
            ids = node.device_ids[k * size:(k + 1) * size]
            groups.append(Group(node.host, k, ids, tuple(range(rank, rank + size)),
                                base_port + k))
            rank += size
    if groups[-1].port > 65535:
        raise ValueError(f"--base-port {base_port} leaves ports above 65535")
    return groups


def node_config(base: dict[str, Any], host: str, registry: str) -> str:
    """The base config for one node: device ascend, its host for HTTP and the KV transport,
    the ZooKeeper registry; validated as the instance will load it."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    model = raw.setdefault("model", {})
    if model.get("backend", "mindspore") != "mindspore":
        raise ValueError(f"--config: model.backend must be mindspore on Ascend, "
                         f"got {model['backend']!r}")
    model["device"] = "ascend"
    raw.setdefault("server", {})["host"] = host
    raw.setdefault("pd", {})["transport_host"] = host
    raw.setdefault("orchestrator", {})["registry"] = registry
    from_dict(ServeConfig, raw)
    return yaml.safe_dump(raw, sort_keys=False)


def group_env(g: Group, rank_size: int, remote_dir: str) -> str:
    rt = f"{remote_dir}/{RUN_DIR}/rank_table.json"
    lines = [f"# pd-serve instance {g.name}: NPUs {','.join(map(str, g.devices))} of {g.node}",
             f"ASCEND_RT_VISIBLE_DEVICES={','.join(map(str, g.devices))}",
             f"RANK_TABLE_FILE={rt}", f"RANK_ID={g.ranks[0]}", f"RANK_SIZE={rank_size}"]
    if is_ip(g.node):  # the host NIC HCCL bootstraps over
        lines.append(f"HCCL_IF_IP={g.node}")
    return "\n".join(lines) + "\n"


def start_shell(g: Group, args: argparse.Namespace) -> str:
    run = RUN_DIR
    cmd = [args.python, "-m", "pd_serve", "instance", "--config", f"{run}/{g.node}.yaml",
           "--registry", args.registry, "--device", "ascend", "--host", g.node,
           "--port", str(g.port), "--id", g.name]
    return (f"cd {shlex.quote(args.remote_dir)} && . {shlex.quote(args.cann_env)} && "
            f"set -a && . {run}/{g.name}.env && set +a && "
            f"nohup {shlex.join(cmd)} > {run}/logs/{g.name}.log 2>&1 < /dev/null & "
            f"echo $! > {run}/{g.name}.pid")


def preflight_shell(args: argparse.Namespace) -> str:
    """Fails (naming what is missing) on a node without NPU, CANN or MindSpore's Ascend plugin,
    before any instance starts there."""
    return (f"cd {shlex.quote(args.remote_dir)} && . {shlex.quote(args.cann_env)} && "
            f"{shlex.quote(args.python)} -m pd_serve.backends.mindspore.attention")


def stop_shell(g: Group, remote_dir: str) -> str:
    pid = f"{RUN_DIR}/{g.name}.pid"
    return f"cd {shlex.quote(remote_dir)} && kill -TERM $(cat {pid}) && rm -f {pid}"


def copy_argv(sources: list[str], node: str, dest: str, args: argparse.Namespace) -> list[str]:
    if node == args.local_node:
        return ["cp", *sources, dest + "/"]
    host = f"[{node}]" if ":" in node else node
    target = f"{args.ssh_user}@{host}" if args.ssh_user else host
    return ["scp", "-q", "-o", "BatchMode=yes", *sources, f"{target}:{dest}/"]


def build_plan(nodes: list[NodeDevices], base: dict[str, Any], args: argparse.Namespace) -> Plan:
    groups = split_groups(nodes, args.group_size, args.base_port)
    ranks = sum(len(n.device_ids) for n in nodes)
    header = [f"# pd-serve on Ascend: {len(nodes)} node(s) x {len(nodes[0].device_ids)} NPU(s),"
              f" groups of {args.group_size} -> {len(groups)} instance(s); registry "
              f"{args.registry}", f"# rank table {args.version}: {ranks} rank(s)"]
    if args.group_size > 1:
        header.append("# note: the MindSpore runner drives the first NPU of its group; the "
                      "others are reserved (no tensor parallelism yet)")
    out, remote_dir = args.out_dir, args.remote_dir
    table = build_rank_table(nodes, args.version, args.device_port)
    files = [FileOut(f"{out}/rank_table.json", None, f"{RUN_DIR}/rank_table.json", dumps(table))]
    for node in nodes:
        files.append(FileOut(f"{out}/{node.host}/{node.host}.yaml", node.host,
                             f"{RUN_DIR}/{node.host}.yaml",
                             node_config(base, node.host, args.registry)))
        files += [FileOut(f"{out}/{g.node}/{g.name}.env", g.node, f"{RUN_DIR}/{g.name}.env",
                          group_env(g, ranks, remote_dir)) for g in groups if g.node == node.host]
    commands = []
    for node in nodes:
        mine = [g for g in groups if g.node == node.host]
        if args.stop:
            commands += [remote(node.host, stop_shell(g, remote_dir), args.local_node,
                                args.ssh_user) for g in mine]
            continue
        dest = f"{remote_dir}/{RUN_DIR}"
        commands.append(remote(node.host, f"mkdir -p {shlex.quote(dest)}/logs", args.local_node,
                               args.ssh_user))
        sources = [f.local for f in files if f.node in (None, node.host)]
        commands.append(copy_argv(sources, node.host, dest, args))
        commands.append(remote(node.host, preflight_shell(args), args.local_node, args.ssh_user))
        commands += [remote(node.host, start_shell(g, args), args.local_node, args.ssh_user)
                     for g in mine]
    return Plan(header, [] if args.stop else files, commands)


def render(plan: Plan, remote_dir: str) -> str:
    """Everything the plan writes and runs, in order, as text (the --dry-run output)."""
    parts = [line + "\n" for line in plan.header]
    for f in plan.files:
        where = "every node" if f.node is None else f.node
        parts.append(f"--- file {f.local} -> {where}:{remote_dir}/{f.remote}\n{f.content}")
    parts.append("--- commands\n")
    parts += [f"$ {shlex.join(argv)}\n" for argv in plan.commands]
    return "".join(parts)


def execute(plan: Plan) -> None:
    for f in plan.files:
        Path(f.local).parent.mkdir(parents=True, exist_ok=True)
        Path(f.local).write_text(f.content)
    for line in plan.header:
        print(line)
    for argv in plan.commands:
        print(f"$ {shlex.join(argv)}", flush=True)
        subprocess.run(argv, check=True, timeout=120)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cluster_args(p)
    p.add_argument("--group-size", type=int, default=1, help="NPUs per instance")
    p.add_argument("--registry", required=True, help="zk://HOST:PORT[,HOST:PORT][/chroot]")
    p.add_argument("--config", required=True, help="ServeConfig YAML (model, cache, pd, ...)")
    p.add_argument("--base-port", type=int, default=9000, help="group k listens on base + k")
    p.add_argument("--remote-dir", default="/opt/pd-serve", help="pd-serve checkout on nodes")
    p.add_argument("--python", default=".venv/bin/python", help="interpreter, in --remote-dir")
    p.add_argument("--cann-env", default=CANN_ENV, help="CANN set_env.sh on the nodes")
    p.add_argument("--out-dir", default="build/npu-launch", help="generated files, locally")
    p.add_argument("--dry-run", action="store_true", help="print files and commands only")
    p.add_argument("--stop", action="store_true", help="stop the instances instead")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.registry.startswith("zk://"):
            raise ValueError(f"--registry must be zk://HOST:PORT[/chroot], got {args.registry!r}")
        base = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(base, dict):
            raise ValueError(f"{args.config}: expected a mapping")
        plan = build_plan(cluster_from_args(args), base, args)
    except (OSError, ValueError, RuntimeError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(render(plan, args.remote_dir))
        return 0
    try:
        execute(plan)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
