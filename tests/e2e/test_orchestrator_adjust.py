"""The online adjuster on a real deployment (ZooKeeper registry, real engine): a workload that
shifts from prefill-heavy (long prompts, two output tokens) to decode-heavy (short prompts,
long outputs) raises E2E while the T_p/E2E share falls, so the adjuster adds decode by
re-roling one prefill instance in place (drain, switch, rejoin); no request is dropped."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.orch_cluster import OrchCluster
from tests.zk_server import ZkServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
ADJUST = {"adjust": True, "adjust_interval_s": 1.0, "adjust_window_s": 4.0,
          "adjust_min_samples": 3, "adjust_hysteresis": 2, "adjust_e2e_rise": 0.25,
          "adjust_share_delta": 0.08, "adjust_cooldown_s": 120.0, "min_per_role": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory,
            zk_server: ZkServer) -> Iterator[OrchCluster]:
    c = OrchCluster(tmp_path_factory.mktemp("adjust"),
                    zk_server.url(f"/adj{uuid.uuid4().hex[:8]}"),
                    [{"scenario": "default", "prefill": 2, "decode": 1}], orchestrator=ADJUST)
    try:
        c.start(instances=3)
        yield c
    finally:
        c.stop()


class Workload:
    """Two client threads; the shape (prompt tokens, output tokens) can change while running."""

    def __init__(self, c: OrchCluster, prompt_tokens: int, max_tokens: int) -> None:
        assert c.gateway is not None
        self.client = openai.OpenAI(base_url=f"{c.gateway.url}/v1", api_key="none",
                                    max_retries=0, timeout=120.0)
        self.shape = (prompt_tokens, max_tokens)
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(2)]
        for t in self.threads:
            t.start()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            n, max_tokens = self.shape
            prompt = [rng.randrange(1, 1000) for _ in range(n)]  # no prefix sharing
            try:
                self.client.completions.create(model="shakespeare-llama", prompt=prompt,
                                               max_tokens=max_tokens, temperature=0,
                                               extra_body={"ignore_eos": True})
                self.ok += 1
            except openai.APIError as exc:
                self.errors.append(str(exc))

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def test_decode_heavy_shift_adds_decode_by_reroling(cluster: OrchCluster) -> None:
    before = cluster.status()["scenarios"]["default"]
    assert (len(before["prefill"]), len(before["decode"])) == (2, 1)
    load = Workload(cluster, prompt_tokens=384, max_tokens=2)  # prefill-heavy baseline
    try:
        time.sleep(14.0)  # > 3 adjuster windows: a baseline forms, nothing triggers
        assert cluster.status()["adjustments"] == []
        load.shape = (8, 96)  # decode-heavy: E2E up, T_p/E2E down
        s = cluster.wait_status(lambda s: bool(s["adjustments"]), 120, "an adjustment")
        adj = s["adjustments"][0]
        assert adj["action"] == "add_decode" and adj["source"] == "reassign", adj
        assert adj["current_share"] < adj["baseline_share"]
        assert adj["current_e2e"] > adj["baseline_e2e"]
        after = cluster.wait_status(
            lambda s: (len(s["scenarios"]["default"]["prefill"]),
                       len(s["scenarios"]["default"]["decode"])) == (1, 2), 120,
            "1P:2D serving")["scenarios"]["default"]
        time.sleep(3.0)  # traffic keeps flowing over the new ratio
    finally:
        load.finish()
    assert load.errors == [] and load.ok > 0  # nothing dropped during the re-role
    moved = (set(after["decode"]) & set(before["prefill"])).pop()
    stats = cluster.by_id(moved).stats()
    assert stats["role"] == "decode" and stats["role_switches"] == 1
    assert after["target"] == {"n_p": 1, "n_d": 2}
