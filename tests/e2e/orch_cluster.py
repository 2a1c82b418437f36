"""A real orchestrated deployment on loopback for end-to-end tests: the orchestrator (ZooKeeper
or embedded registry), stateless instances that register and get their roles from it, and the
gateway following its meta info; each a `python -m pd_serve` process with its own log.

Lifecycle:
1. `OrchCluster(tmp, registry, groups, ...)` writes one config; nothing runs yet;
2. `start(instances)` launches the orchestrator, `instances` stateless instances and the gateway
   and waits until every scenario's group is serving (`wait_groups`);
3. `add_instance()` starts one more stateless instance; `instances[i].stop(SIGKILL)` kills one;
4. `stop()` SIGINTs the orchestrator first, then everything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.e2e.pd_cluster import Proc
from tests.e2e.server_process import DEMO_MODEL

T = dict[str, Any]


def write_orch_config(path: Path, registry: str, groups: Sequence[T], scenarios: Sequence[str],
                      orchestrator: T | None = None, pd: T | None = None,
                      gateway: T | None = None) -> Path:
    cfg = {"model": {"path": str(DEMO_MODEL), "backend": "torch", "threads": 1},
           "cache": {"block_size": 16, "num_blocks": 256},
           "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 2048},
           "server": {"max_tokens_default": 32},
           "pd": {"b_p": 2, "handoff_timeout_s": 10.0, "attach_timeout_s": 10.0,
                  "forward_deadline_s": 30.0, **(pd or {})},
           "gateway": {"default_scenario": scenarios[0], "scenarios": [
               {"name": s, "ttft_slo": [{"max_prompt_tokens": None, "deadline_s": 30.0}]}
               for s in scenarios], **(gateway or {})},
           "orchestrator": {"registry": registry, "port": 0, "groups": list(groups),
                            "session_timeout_s": 3.0, "report_interval_s": 0.5,
                            "health_interval_s": 0.3, "health_failures": 2,
                            **(orchestrator or {})}}
    path.write_text(yaml.safe_dump(cfg))
    return path


class OrchCluster:
    def __init__(self, tmp: Path, registry: str, groups: Sequence[T],
                 orchestrator: T | None = None, pd: T | None = None,
                 gateway: T | None = None) -> None:
        self.tmp = tmp
        self.registry = registry
        scenarios = [g["scenario"] for g in groups]
        self.config = write_orch_config(tmp / "orch.yaml", registry, groups, scenarios,
                                        orchestrator, pd, gateway)
        self.orch: Proc | None = None
        self.gateway: Proc | None = None
        self.instances: list[Proc] = []

    def _reg(self) -> str:
        assert self.orch is not None
        return self.orch.url if self.registry == "embedded" else self.registry

    def start(self, instances: int, timeout: float = 240.0) -> OrchCluster:
        self.orch = Proc("orchestrator", ["orchestrator", "--config", str(self.config)],
                         self.tmp / "orchestrator.log").wait_healthy()
        for _ in range(instances):
            self.add_instance(wait=False)
        self.gateway = Proc("gateway", ["gateway", "--registry", self._reg(), "--config",
                                        str(self.config)], self.tmp / "gateway.log")
        self.gateway.wait_healthy()
        for p in self.instances:
            p.wait_healthy()
        self.wait_groups(timeout)
        return self

    def add_instance(self, wait: bool = True) -> Proc:
        n = len(self.instances)
        p = Proc(f"instance-{n}", ["instance", "--registry", self._reg(), "--id",
                                   f"instance-{n}", "--config", str(self.config)],
                 self.tmp / f"instance-{n}.log")
        self.instances.append(p)
        return p.wait_healthy() if wait else p

    def status(self) -> T:
        assert self.orch is not None
        return dict(httpx.get(f"{self.orch.url}/status", timeout=10.0).json())

    def wait_status(self, ok: Callable[[T], bool], timeout: float = 120.0,
                    what: str = "condition") -> T:
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = self.status()
                if ok(s):
                    return s
            except httpx.HTTPError:
                s = {}
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout} s; status: {s}\n"
                                     f"{self.logs()}")
            time.sleep(0.2)

    def wait_groups(self, timeout: float = 240.0) -> T:
        return self.wait_status(groups_complete, timeout, "every group serving")

    def by_id(self, iid: str) -> Proc:
        return next(p for p in self.instances if p.name == iid)

    def members(self, scenario: str, role: str) -> list[str]:
        return list(self.status()["scenarios"][scenario][role])

    def logs(self) -> str:
        procs = [p for p in (self.orch, self.gateway, *self.instances) if p is not None]
        return "\n".join(f"--- {p.name}\n{p.log()[-1500:]}" for p in procs)

    def stop(self) -> None:
        if self.orch is not None:
            self.orch.stop()
        for p in [self.gateway, *self.instances]:
            if p is not None:
                p.stop()


def groups_complete(s: T) -> bool:
    return bool(s.get("scenarios")) and all(
        len(sc["prefill"]) >= sc["target"]["n_p"] and len(sc["decode"]) >= sc["target"]["n_d"]
        for sc in s["scenarios"].values())
