"""The orchestrator against a real ZooKeeper: P/D groups formed from stateless instances, the
console against the live deployment, kill -9 of a decode and of a prefill instance under load
(failed in-flight requests end with a clear error, the other scenario is not disturbed, a spare
or the next instance to register takes the role), and a ZooKeeper restart while serving."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from pd_serve.orchestrator.records import GroupMeta
from pd_serve.orchestrator.zk_registry import ZkRegistry
from tests.e2e.orch_cluster import OrchCluster, groups_complete
from tests.e2e.server_process import REPO
from tests.e2e.test_pd_local import wait_clean
from tests.zk_server import ZkServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
MODEL = "shakespeare-llama"
GROUPS = [{"scenario": "chat", "prefill": 1, "decode": 1},
          {"scenario": "batch", "prefill": 1, "decode": 1}]


@pytest.fixture(scope="module")
def zk_url(zk_server: ZkServer) -> str:
    return zk_server.url(f"/e2e{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, zk_url: str) -> Iterator[OrchCluster]:
    c = OrchCluster(tmp_path_factory.mktemp("orch"), zk_url, GROUPS)
    try:
        c.start(instances=5)  # 2 groups of 1P:1D and one stateless spare
        yield c
    finally:
        c.stop()


def client(c: OrchCluster) -> openai.OpenAI:
    assert c.gateway is not None
    return openai.OpenAI(base_url=f"{c.gateway.url}/v1", api_key="none", max_retries=0,
                         timeout=60.0)


def complete(c: OrchCluster, scenario: str, max_tokens: int = 8) -> str:
    out = client(c).completions.create(
        model=MODEL, prompt="ROMEO:\n", max_tokens=max_tokens, temperature=0,
        extra_headers={"X-PD-Scenario": scenario}, extra_body={"ignore_eos": True})
    return str(out.choices[0].text)


class Load:
    """Threads sending requests to one scenario in a loop; records successes and errors."""

    def __init__(self, c: OrchCluster, scenario: str, threads: int, max_tokens: int) -> None:
        self.c, self.scenario, self.max_tokens = c, scenario, max_tokens
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                complete(self.c, self.scenario, self.max_tokens)
                with self.lock:
                    self.ok += 1
            except openai.APIError as exc:
                with self.lock:
                    self.errors.append(str(exc))
                time.sleep(0.05)

    def finish(self) -> Load:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        return self


def meta_in_zk(zk_url: str, scenario: str) -> GroupMeta:
    reg = ZkRegistry(zk_url, session_timeout_s=3.0)
    try:
        meta = GroupMeta.parse(reg.get(f"/pd/meta/{scenario}"), scenario)
        assert meta is not None
        return meta
    finally:
        reg.close()


def test_groups_form_from_stateless_instances(cluster: OrchCluster, zk_url: str) -> None:
    s = cluster.status()
    assert s["registry"].startswith("zk://") and s["registry_ok"]
    assert len(s["instances"]) == 5 and len(s["spares"]) == 1
    for name in ("chat", "batch"):
        sc = s["scenarios"][name]
        assert sc["ratio"] == "1:1" and sc["target"] == {"n_p": 1, "n_d": 1}
        meta = meta_in_zk(zk_url, name)
        assert [m.id for m in meta.prefill] == sc["prefill"]
        assert [m.id for m in meta.decode] == sc["decode"]
    used = [i for name in ("chat", "batch") for role in ("prefill", "decode")
            for i in s["scenarios"][name][role]]
    assert len(set(used)) == 4  # groups are isolated: no instance serves two scenarios
    assert complete(cluster, "chat") and complete(cluster, "batch")
    assert cluster.gateway is not None
    recent = httpx.get(f"{cluster.gateway.url}/debug/requests?n=2", timeout=10).json()
    by_scenario = {r["scenario"]: r for r in recent["requests"]}
    for name in ("chat", "batch"):
        accepted = [o["instance"] for o in by_scenario[name]["offers"]
                    if o["answer"] == "accepted"]
        pid = s["scenarios"][name]["prefill"][0]
        assert accepted == [cluster.by_id(pid).url]


def console(c: OrchCluster, *args: str) -> subprocess.CompletedProcess[str]:
    assert c.orch is not None
    return subprocess.run([sys.executable, "-m", "pd_serve", "console", "--orchestrator",
                           c.orch.url, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_console_against_live_deployment(cluster: OrchCluster) -> None:
    out = console(cluster, "--json", "status")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)["scenarios"]) == {"chat", "batch"}
    table = console(cluster, "status")
    assert table.returncode == 0 and "chat" in table.stdout and "batch" in table.stdout
    decode = cluster.members("batch", "decode")[0]
    assert console(cluster, "drain", decode).returncode == 0
    cluster.wait_status(lambda s: s["scenarios"]["batch"]["decode"] == [], 30, "drained")
    assert console(cluster, "undrain", decode).returncode == 0
    cluster.wait_status(lambda s: s["scenarios"]["batch"]["decode"] == [decode], 30,
                        "undrained")
    bad = console(cluster, "set-ratio", "nope", "1", "1")
    assert bad.returncode == 2 and "nope" in bad.stderr
    assert complete(cluster, "batch")


def _recovered(s: dict[str, Any], failed: str) -> bool:
    return groups_complete(s) and any(r["failed"] == failed and r["recovery_s"] is not None
                                      for r in s["recoveries"])


def test_kill_decode_under_load(cluster: OrchCluster) -> None:
    spare = cluster.status()["spares"][0]
    victim = cluster.members("chat", "decode")[0]
    chat, batch = Load(cluster, "chat", 3, 48), Load(cluster, "batch", 1, 8)
    time.sleep(2.0)
    cluster.by_id(victim).stop(signal.SIGKILL)
    s = cluster.wait_status(lambda s: _recovered(s, victim), 120, "decode recovery")
    time.sleep(1.5)
    chat.finish(), batch.finish()
    event = next(r for r in s["recoveries"] if r["failed"] == victim)
    assert event["replacement"] == spare and event["role"] == "decode"
    assert s["scenarios"]["chat"]["decode"] == [spare]
    assert batch.errors == [] and batch.ok > 0  # the other scenario is not disturbed
    assert chat.ok > 0
    for err in chat.errors:  # in-flight requests of the lost decode end with a clear error
        assert "lost the instance" in err or "decode" in err, err
    assert complete(cluster, "chat")
    for iid in (cluster.members("chat", "prefill")[0], spare):
        wait_clean(cluster.by_id(iid))


def test_kill_prefill_then_next_instance_takes_the_role(cluster: OrchCluster) -> None:
    assert cluster.status()["spares"] == []
    victim = cluster.members("chat", "prefill")[0]
    chat, batch = Load(cluster, "chat", 2, 16), Load(cluster, "batch", 1, 8)
    time.sleep(2.0)
    cluster.by_id(victim).stop(signal.SIGKILL)
    cluster.wait_status(lambda s: s["scenarios"]["chat"]["prefill"] == []
                        and s["scenarios"]["chat"]["short"] == {"prefill": 1}, 60,
                        "prefill out of the meta info, group short")
    newcomer = cluster.add_instance()  # the next instance to register takes the role
    s = cluster.wait_status(lambda s: _recovered(s, victim), 120, "prefill recovery")
    chat.finish(), batch.finish()
    assert s["scenarios"]["chat"]["prefill"] == [newcomer.name]
    assert batch.errors == [] and batch.ok > 0
    for err in chat.errors:
        assert err.strip(), "an error without a message"
    assert complete(cluster, "chat")
    wait_clean(newcomer)


def _live_ids(s: dict[str, Any]) -> set[str]:
    return {i["id"] for i in s["instances"] if i["state"] != "failed"}


def test_zookeeper_restart_keeps_serving(cluster: OrchCluster, zk_server: ZkServer) -> None:
    before = cluster.status()
    zk_server.stop()
    try:
        assert complete(cluster, "chat") and complete(cluster, "batch")  # gateway: last table
        cluster.wait_status(lambda s: not s["registry_ok"], 30, "orchestrator notices")
        time.sleep(1.0)
    finally:
        zk_server.start()
    after = cluster.wait_status(lambda s: s["registry_ok"] and groups_complete(s), 60,
                               "registry back")
    assert len(after["recoveries"]) == len(before["recoveries"])  # sessions survived
    assert _live_ids(after) == _live_ids(before)  # a killed earlier victim may linger as failed
    for name in ("chat", "batch"):
        assert after["scenarios"][name]["prefill"] == before["scenarios"][name]["prefill"]
    assert complete(cluster, "chat") and complete(cluster, "batch")
