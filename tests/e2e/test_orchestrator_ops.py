"""Operator actions on a live deployment with the embedded registry (instances and the gateway
reach it over the orchestrator's /registry routes), under load, with no request dropped:
group scale-out from spares, a rolling model update one instance at a time, replacing an
instance, and scale-in that returns instances to stateless spares."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.orch_cluster import OrchCluster
from tests.e2e.pd_cluster import Proc
from tests.e2e.server_process import DEMO_MODEL
from tests.e2e.test_orchestrator_zk import Load

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchCluster]:
    c = OrchCluster(tmp_path_factory.mktemp("ops"), "embedded",
                    [{"scenario": "default", "prefill": 1, "decode": 1}])
    try:
        c.start(instances=4)  # 1P:1D and two spares
        yield c
    finally:
        c.stop()


def post(c: OrchCluster, route: str, body: dict[str, object] | None = None) -> httpx.Response:
    assert c.orch is not None
    return httpx.post(f"{c.orch.url}{route}", json=body or {}, timeout=30.0)


def serving(c: OrchCluster, n_p: int, n_d: int, timeout: float = 120.0) -> dict[str, object]:
    return c.wait_status(lambda s: (len(s["scenarios"]["default"]["prefill"]),
                                    len(s["scenarios"]["default"]["decode"])) == (n_p, n_d),
                         timeout, f"{n_p}P:{n_d}D serving")


def test_scale_out_takes_spares(cluster: OrchCluster) -> None:
    assert len(cluster.status()["spares"]) == 2
    load = Load(cluster, "default", 2, 16)
    try:
        r = post(cluster, "/scenarios/default/scale", {"instances": 4})
        assert r.status_code == 200 and r.json()["target"] == {"n_p": 2, "n_d": 2}
        s = serving(cluster, 2, 2)
        assert s["spares"] == []
        time.sleep(1.0)
    finally:
        load.finish()
    assert load.errors == [] and load.ok > 0


def test_rolling_update_one_instance_at_a_time(cluster: OrchCluster, tmp_path: Path) -> None:
    new_model = tmp_path / "model-v2"
    shutil.copytree(DEMO_MODEL, new_model)
    load = Load(cluster, "default", 2, 16)
    try:
        assert post(cluster, "/rollout", {"model_path": str(new_model)}).json()["started"]
        s = cluster.wait_status(lambda s: (s["rollout"] or {}).get("done") is not None, 240,
                                "rollout done")
        assert s["rollout"]["error"] is None and len(s["rollout"]["updated"]) == 4
        serving(cluster, 2, 2)
        time.sleep(1.0)
    finally:
        load.finish()
    assert load.errors == [] and load.ok > 0  # never fewer than one instance per role down
    for iid in s["rollout"]["updated"]:
        assert cluster.by_id(iid).stats()["model_path"] == str(new_model)
    busy = post(cluster, "/rollout", {"model_path": ""})
    assert busy.status_code == 400 and "model_path" in busy.json()["error"]["message"]


def test_replace_hands_the_role_to_a_spare(cluster: OrchCluster) -> None:
    post(cluster, "/scenarios/default/ratio", {"n_p": 2, "n_d": 1})  # frees one spare
    serving(cluster, 2, 1)
    spare = cluster.wait_status(lambda s: len(s["spares"]) == 1, 60, "a spare")["spares"][0]
    victim = cluster.members("default", "decode")[0]
    load = Load(cluster, "default", 2, 16)
    try:
        r = post(cluster, f"/instances/{victim}/replace")
        assert r.status_code == 200 and r.json() == {"id": victim, "replacement": spare}
        s = cluster.wait_status(lambda s: s["scenarios"]["default"]["decode"] == [spare]
                                and victim in s["spares"], 120, "replaced, victim spare")
        event = next(e for e in s["recoveries"] if e["failed"] == victim)
        assert event["reason"] == "replaced by the operator" and event["recovery_s"] > 0
    finally:
        load.finish()
    assert load.errors == [] and load.ok > 0  # the replaced instance drained first
    assert post(cluster, "/instances/nope/replace").status_code == 404


def test_scale_in_releases_to_stateless(cluster: OrchCluster) -> None:
    load = Load(cluster, "default", 2, 16)
    try:
        assert post(cluster, "/scenarios/default/ratio", {"n_p": 1, "n_d": 1}).status_code == 200
        s = cluster.wait_status(lambda s: len(s["spares"]) == 2 and
                                len(s["scenarios"]["default"]["prefill"]) == 1, 120,
                                "scale-in done")
        time.sleep(1.0)
    finally:
        load.finish()
    assert load.errors == [] and load.ok > 0
    for iid in s["spares"]:
        st = cluster.by_id(iid).stats()
        assert st["role"] is None and st["state"] == "stateless"
    bad = post(cluster, "/scenarios/default/ratio", {"n_p": 0, "n_d": 1})
    assert bad.status_code == 400


def test_rollout_with_a_spare_is_make_before_break(cluster: OrchCluster, tmp_path: Path) -> None:
    """1P:1D: every role has a single instance, so only a spare taking over first (the old
    instance leaving afterwards) keeps requests from failing."""
    assert len(cluster.status()["spares"]) == 2
    new_model = tmp_path / "model-v3"
    shutil.copytree(DEMO_MODEL, new_model)
    load = Load(cluster, "default", 2, 16)
    try:
        assert post(cluster, "/rollout", {"model_path": str(new_model)}).json()["started"]
        s = cluster.wait_status(lambda s: (s["rollout"] or {}).get("done") is not None
                                and s["rollout"]["model_path"] == str(new_model), 240,
                                "rollout done")
        assert s["rollout"]["error"] is None
        s = serving(cluster, 1, 1)
        time.sleep(1.0)
    finally:
        load.finish()
    assert load.errors == [] and load.ok > 0
    sc = s["scenarios"]["default"]  # type: ignore[index]
    for iid in (*sc["prefill"], *sc["decode"]):
        assert cluster.by_id(iid).stats()["model_path"] == str(new_model)


def test_profile_route_measures_and_plans(cluster: OrchCluster) -> None:
    r = post(cluster, "/scenarios/default/profile",
             {"prompt_tokens": 32, "output_tokens": 4, "b_p": 2, "b_d": 2, "repeats": 1,
              "budget": 4, "apply": False})
    assert r.status_code == 200, r.text
    body = r.json()
    plan, profile = body["plan"], body["profile"]
    assert plan["n_p"] + plan["n_d"] == 4 and min(plan["n_p"], plan["n_d"]) >= 1
    assert profile["xi"] >= 0 and profile["G"] == 3 and isinstance(body["notes"], list)
    assert cluster.status()["scenarios"]["default"]["plan"]["n_p"] == plan["n_p"]
    bad = post(cluster, "/scenarios/default/profile", {"prompt_tokens": -1})
    assert bad.status_code == 400
    assert post(cluster, "/scenarios/nope/profile").status_code == 404


def test_orchestrator_restart_adopts_the_serving_instances(cluster: OrchCluster) -> None:
    """The embedded registry starts empty after a restart: instances renew their sessions and
    re-register, the orchestrator adopts their roles, nothing is re-roled or dropped."""
    assert cluster.orch is not None
    before = cluster.status()
    sc = before["scenarios"]["default"]
    serving_ids = [*sc["prefill"], *sc["decode"]]
    switches = {i: cluster.by_id(i).stats()["role_switches"] for i in serving_ids}
    load = Load(cluster, "default", 2, 16)
    try:
        port = cluster.orch.port
        cluster.orch.stop()
        time.sleep(1.0)  # the gateway keeps forwarding on its last table meanwhile
        cluster.orch = Proc("orchestrator", ["orchestrator", "--config", str(cluster.config)],
                            cluster.tmp / "orchestrator-2.log", port).wait_healthy()
        after = cluster.wait_status(
            lambda s: s["scenarios"]["default"]["prefill"] == sc["prefill"]
            and s["scenarios"]["default"]["decode"] == sc["decode"]
            and len(s["instances"]) == len(before["instances"]), 60, "adopted")
        time.sleep(1.0)
    finally:
        load.finish()
    assert load.errors == [] and load.ok > 0
    assert after["recoveries"] == []  # a fresh orchestrator: nothing was lost
    for iid in serving_ids:
        assert cluster.by_id(iid).stats()["role_switches"] == switches[iid]
