"""The local disaggregated deployment behind `pd-serve up`: the orchestrator with its embedded
registry, stateless instances (one per instance its groups need, plus `orchestrator.spares`)
and the gateway, each a subprocess on loopback. The orchestrator forms the P/D group of every
scenario from the stateless instances; the gateway forwards as its meta info says.

Lifecycle:
1. `LocalDeployment(config_path, cfg, frontend_port, backend)` picks free ports; nothing runs;
2. `start()` spawns the orchestrator, the instances and the gateway; `wait_healthy()` polls each
   /health, then `wait_groups()` waits until every scenario has its target instances serving;
3. `stop()` sends SIGINT to the orchestrator, then to the gateway and the instances, waits for
   each (killing a process that does not exit within 15 s); safe to call twice.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pd_serve.config import ServeConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    url: str
    cmd: list[str]
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class LocalDeployment:
    config_path: Path
    cfg: ServeConfig
    frontend_port: int
    backend: str
    log_level: str = "warning"
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        host = "127.0.0.1"
        base = [sys.executable, "-m", "pd_serve"]
        common = ["--config", str(self.config_path), "--log-level", self.log_level]
        oport = self.cfg.orchestrator.port or free_port()
        self.orchestrator_url = f"http://{host}:{oport}"
        self.children.append(Child("orchestrator", self.orchestrator_url, [
            *base, "orchestrator", "--registry", "embedded", "--port",
            _port(self.orchestrator_url), *common]))
        reg = ["--registry", self.orchestrator_url, "--backend", self.backend]
        devices = instance_devices(self.cfg.model.device, self.instance_count)
        for i, device in enumerate(devices):
            url = f"http://{host}:{free_port()}"
            self.children.append(Child(f"instance-{i}", url, [
                *base, "instance", "--port", _port(url), "--id", f"instance-{i}", *reg,
                "--device", device, *common]))
        self.url = f"http://{host}:{self.frontend_port}"
        self.children.append(Child("gateway", self.url, [
            *base, "gateway", "--port", str(self.frontend_port), *reg, *common]))

    @property
    def instance_count(self) -> int:
        groups = self.cfg.orchestrator.groups
        return sum(g.prefill + g.decode for g in groups) + self.cfg.orchestrator.spares

    def start(self, timeout: float = 60.0) -> None:
        """The orchestrator first (its registry must answer), then everything else."""
        self.children[0].proc = subprocess.Popen(self.children[0].cmd)
        deadline = time.monotonic() + timeout
        while not _healthy(self.orchestrator_url):
            self._check_alive(self.children[0])
            if time.monotonic() > deadline:
                raise RuntimeError(f"the orchestrator did not answer within {timeout:.0f} s")
            time.sleep(0.2)
        for child in self.children[1:]:
            child.proc = subprocess.Popen(child.cmd)

    def wait_healthy(self, timeout: float) -> None:
        """RuntimeError naming the process that died or stayed unhealthy."""
        deadline = time.monotonic() + timeout
        for child in self.children:
            while not _healthy(child.url):
                self._check_alive(child)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} ({child.url}) not healthy after "
                                       f"{timeout:.0f} s")
                time.sleep(0.3)

    def wait_groups(self, timeout: float) -> dict[str, Any]:
        """Blocks until every scenario has its target prefill and decode instances serving;
        the orchestrator's status then. RuntimeError on a timeout or a dead process."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status is not None and _complete(status):
                return status
            for child in self.children:
                self._check_alive(child)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the P/D groups did not form within {timeout:.0f} s "
                                   f"(orchestrator status: {status and status['scenarios']})")
            time.sleep(0.3)

    def status(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.orchestrator_url}/status", timeout=5.0)
            return dict(r.json()) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _check_alive(self, child: Child) -> None:
        assert child.proc is not None
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}")

    def wait_any_exit(self) -> Child:
        """Blocks until the orchestrator or the gateway exits (the deployment is then broken;
        a lost instance is the orchestrator's to replace)."""
        while True:
            for child in (self.children[0], self.children[-1]):
                if child.proc is not None and child.proc.poll() is not None:
                    return child
            time.sleep(0.5)

    def stop(self) -> None:
        """The orchestrator first (so stopping instances is not taken for failures), then the
        gateway and the instances."""
        for batch in (self.children[:1], list(reversed(self.children[1:]))):
            for child in batch:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGINT)
            for child in batch:
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(15)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()


def instance_devices(device: str, count: int) -> list[str]:
    """The device of each of `count` instances: `cuda` (no index) spreads them over the visible
    GPUs, one each while they last (a P/D pair over NCCL needs two distinct GPUs); any other
    value is used as given."""
    if device != "cuda":
        return [device] * count
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError("model.device is cuda but no GPU is visible")
    return [f"cuda:{i % n}" for i in range(count)]


def _complete(status: dict[str, Any]) -> bool:
    return all(len(sc["prefill"]) >= sc["target"]["n_p"]
               and len(sc["decode"]) >= sc["target"]["n_d"] for sc in status["scenarios"].values())


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False
