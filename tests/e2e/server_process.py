"""A real `python -m pd_serve serve` process on a free loopback port, for end-to-end tests.

Lifecycle:
1. `ServerProcess(config_yaml, log_path)` picks a free port;
2. `start()` launches the server and waits until GET /health answers 200 (or the process dies);
3. `stop()` sends SIGINT (graceful uvicorn shutdown) and returns the exit code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "shakespeare-llama"


def write_config(path: Path, backend: str, num_blocks: int = 256, threads: int = 1,
                 **server: Any) -> Path:
    """A small ServeConfig YAML for the demo model on `backend`."""
    cfg = {"model": {"path": str(DEMO_MODEL), "backend": backend, "threads": threads},
           "cache": {"block_size": 16, "num_blocks": num_blocks},
           "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 2048},
           "server": {"max_tokens_default": 32, **server}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "pd_serve", "serve", "--config", str(self.config),
               "--port", str(self.port), "--log-level", "warning"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log()}")

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base}/stats", timeout=10.0).json())

    def wait_idle_and_leak_free(self, caller_aborts: int = 0,
                                timeout: float = 60.0) -> dict[str, Any]:
        """Waits until the engine has applied `caller_aborts` aborts in all, then for an idle
        leak check run after that (the engine thread re-runs it every second while idle)."""
        deadline = time.monotonic() + timeout
        since = None
        while True:
            stats = self.stats()
            if since is None and stats["caller_aborts"] >= caller_aborts:
                since = time.time()
            elif (since is not None and stats["leak_check_time"] > since
                  and stats["open_requests"] == 0):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not idle: {stats}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
