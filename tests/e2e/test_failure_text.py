"""`gateway.failure_text`: a request whose decode instance dies after the first token ends with
the configured default text (finish reason `stop`) instead of an error, the gateway counts it
as failed, and the orchestrator's spare takes over for the next requests."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.orch_cluster import OrchCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
TEXT = " [the service is busy; please ask again]"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchCluster]:
    c = OrchCluster(tmp_path_factory.mktemp("failtext"), "embedded",
                    [{"scenario": "default", "prefill": 1, "decode": 1}],
                    gateway={"failure_text": TEXT})
    try:
        c.start(instances=3)
        yield c
    finally:
        c.stop()


def test_decode_death_mid_stream_ends_with_the_default_text(cluster: OrchCluster) -> None:
    assert cluster.gateway is not None
    client = openai.OpenAI(base_url=f"{cluster.gateway.url}/v1", api_key="none",
                           max_retries=0, timeout=60.0)
    decode = cluster.members("default", "decode")[0]
    chunks: list[Any] = []
    started = threading.Event()

    def ask() -> None:
        for chunk in client.completions.create(model="shakespeare-llama", prompt="ROMEO:\n",
                                               max_tokens=1500, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
            chunks.append(chunk)
            if len(chunks) == 5:
                started.set()

    asker = threading.Thread(target=ask)
    asker.start()
    assert started.wait(60)
    cluster.by_id(decode).stop(signal.SIGKILL)
    asker.join(60)
    assert not asker.is_alive()
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].text for c in chunks)
    assert text.endswith(TEXT) and len(text) > len(TEXT)
    stats = httpx.get(f"{cluster.gateway.url}/stats", timeout=10).json()
    assert stats["metrics"]["default"]["outcomes"].get("failed") == 1
    cluster.wait_status(lambda s: bool(s["scenarios"]["default"]["decode"])
                        and decode not in s["scenarios"]["default"]["decode"], 60,
                        "the spare took over")
    time.sleep(0.5)
    out = client.completions.create(model="shakespeare-llama", prompt="ROMEO:\n", max_tokens=8,
                                    temperature=0)
    assert out.choices[0].finish_reason == "length" and TEXT not in out.choices[0].text
