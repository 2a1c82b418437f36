"""Real P/D processes on loopback for end-to-end tests: decode and prefill instances and the
gateway (`python -m pd_serve instance|gateway`), each on a free port with its own log.

Lifecycle:
1. `PDCluster(tmp, backend, **pd)` writes one config; nothing runs yet;
2. `start(decodes)` launches one decode per entry of `decodes` (pd overrides of that decode,
   e.g. a fetch delay), prefill (peered with all of them) and, unless `frontend=False`, the
   front end, waiting for /health;
3. `add_decode(port, **pd)` starts one more decode instance; `proc.stop(SIGKILL)` kills one;
4. `stop()` SIGINTs everything still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.e2e.server_process import DEMO_MODEL, REPO, free_port


def write_pd_config(path: Path, backend: str, threads: int = 1, **pd: Any) -> Path:
    cfg = {"model": {"path": str(DEMO_MODEL), "backend": backend, "threads": threads},
           "cache": {"block_size": 16, "num_blocks": 256},
           "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 2048},
           "server": {"max_tokens_default": 32},
           "pd": {"handoff_timeout_s": 10.0, "attach_timeout_s": 10.0, **pd}}
    path.write_text(yaml.safe_dump(cfg))
    return path


class Proc:
    def __init__(self, name: str, args: list[str], log: Path, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        cmd = [sys.executable, "-m", "pd_serve", *args, "--port", str(self.port),
               "--log-level", "warning"]
        with log.open("wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_healthy(self, timeout: float = 300.0) -> Proc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not healthy:\n{self.log()}")

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/stats", timeout=10.0).json())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


class PDCluster:
    def __init__(self, tmp: Path, backend: str = "torch", threads: int = 1, **pd: Any) -> None:
        self.tmp = tmp
        self.backend, self.threads, self.pd = backend, threads, pd
        self.config = write_pd_config(tmp / "pd.yaml", backend, threads, **pd)
        self.decodes: list[Proc] = []
        self.prefill: Proc | None = None
        self.frontend: Proc | None = None

    def _common(self) -> list[str]:
        return ["--config", str(self.config)]

    def add_decode(self, port: int | None = None, **pd: Any) -> Proc:
        n = len(self.decodes)
        config = self.config
        if pd:
            config = write_pd_config(self.tmp / f"decode-{n}.yaml", self.backend, self.threads,
                                     **{**self.pd, **pd})
        p = Proc(f"decode-{n}", ["instance", "--role", "decode", "--config", str(config)],
                 self.tmp / f"decode-{n}.log", port)
        self.decodes.append(p)
        return p.wait_healthy()

    def start(self, decodes: Sequence[dict[str, Any]] = ({},),
              frontend: bool = True) -> PDCluster:
        for pd in decodes:
            self.add_decode(**pd)
        peers = ",".join(d.url for d in self.decodes)
        self.prefill = Proc("prefill", ["instance", "--role", "prefill", "--decode-peers",
                                        peers, *self._common()],
                            self.tmp / "prefill.log").wait_healthy()
        if not frontend:
            return self
        self.frontend = Proc("gateway", ["gateway", "--prefill", self.prefill.url,
                                          *self._common()], self.tmp / "frontend.log")
        self.frontend.wait_healthy()
        return self

    def logs(self) -> str:
        procs = [p for p in (self.frontend, self.prefill, *self.decodes) if p is not None]
        return "\n".join(f"--- {p.name}\n{p.log()}" for p in procs)

    def stop(self) -> list[int]:
        procs = [p for p in (self.frontend, self.prefill, *self.decodes) if p is not None]
        return [p.stop() for p in procs]


@contextmanager
def running_cluster(tmp: Path, backend: str = "torch", **pd: Any) -> Iterator[PDCluster]:
    """A started PDCluster (one decode, prefill, gateway) that prints its logs when the start
    or the body fails and stops everything on exit."""
    c = PDCluster(tmp, backend, **pd)
    try:
        yield c.start()
    except Exception:
        print(c.logs())
        raise
    finally:
        c.stop()
