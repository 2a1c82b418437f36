"""The local disaggregated deployment behind `pd-serve up`: decode instances, prefill instances
(pointed at every decode instance) and the gateway, each a subprocess on loopback. The
gateway knows the prefill instances by name (`prefill-0`, ...), so a config's scenarios may
name them; without scenarios it serves one, "default", over all of them.

Lifecycle:
1. `LocalDeployment(config_path, cfg, ...)` picks free ports; nothing runs yet;
2. `start()` spawns every process (decode first), `wait_healthy()` polls each /health;
3. `stop()` sends SIGINT to the gateway, then prefill, then decode, waits for each (killing a
   process that does not exit within 15 s); safe to call twice.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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
        common = ["--config", str(self.config_path), "--backend", self.backend,
                  "--log-level", self.log_level]
        decodes = [f"http://{host}:{free_port()}" for _ in range(self.cfg.pd.num_decode)]
        for i, url in enumerate(decodes):
            self.children.append(Child(f"decode-{i}", url, [
                *base, "instance", "--role", "decode", "--port", _port(url), *common]))
        for i in range(self.cfg.pd.num_prefill):
            url = f"http://{host}:{free_port()}"
            self.children.append(Child(f"prefill-{i}", url, [
                *base, "instance", "--role", "prefill", "--port", _port(url),
                "--decode-peers", ",".join(decodes), *common]))
        prefills = [f"{c.name}={c.url}" for c in self.children if c.name.startswith("prefill")]
        self.url = f"http://{host}:{self.frontend_port}"
        self.children.append(Child("gateway", self.url, [
            *base, "gateway", "--port", str(self.frontend_port),
            "--prefill", ",".join(prefills), *common]))

    def start(self) -> None:
        for child in self.children:
            child.proc = subprocess.Popen(child.cmd)

    def wait_healthy(self, timeout: float) -> None:
        """RuntimeError naming the process that died or stayed unhealthy."""
        deadline = time.monotonic() + timeout
        for child in self.children:
            while not _healthy(child.url):
                assert child.proc is not None
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} ({child.url}) not healthy after "
                                       f"{timeout:.0f} s")
                time.sleep(0.3)

    def wait_any_exit(self) -> Child:
        """Blocks until one process exits (the deployment is then broken)."""
        while True:
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    return child
            time.sleep(0.5)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGINT)
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(15)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False
