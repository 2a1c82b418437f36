"""The `aggregated` instance role behind the same gateway (the equal-hardware baseline of the
GPU benchmark): the gateway relays the deltas an aggregated instance streams after `first`, the
greedy output equals the aggregated server's token for token, a client cancel mid-stream frees
everything, and the instance ends leak-free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.pd_cluster import Proc, write_pd_config
from tests.e2e.server_process import ServerProcess, write_config
from tests.e2e.test_pd_local import _client, greedy_outputs, wait_clean

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    tmp = tmp_path_factory.mktemp("aggrole")
    config = write_pd_config(tmp / "pd.yaml", "torch", b_p=2)
    inst = Proc("aggregated", ["instance", "--role", "aggregated", "--config", str(config)],
                tmp / "instance.log")
    gateway = None
    try:
        inst.wait_healthy()
        gateway = Proc("gateway", ["gateway", "--prefill", inst.url, "--config", str(config)],
                       tmp / "gateway.log").wait_healthy()
        yield inst, gateway
    except Exception:
        print(inst.log(), gateway.log() if gateway else "")
        raise
    finally:
        for p in (gateway, inst):
            if p is not None:
                p.stop()


def test_greedy_equals_aggregated_server(procs: tuple[Proc, Proc], tmp_path: Path) -> None:
    inst, gateway = procs
    server = ServerProcess(write_config(tmp_path / "serve.yaml", "torch"), tmp_path / "log")
    server.start()
    try:
        expected = greedy_outputs(_client(server.base))
    finally:
        server.stop()
    assert greedy_outputs(_client(gateway.url)) == expected
    s = wait_clean(inst)
    assert s["role"] == "aggregated" and s["waiting_handoffs"] == 0


def test_cancel_mid_stream_frees_everything(procs: tuple[Proc, Proc]) -> None:
    inst, gateway = procs
    body: dict[str, Any] = {"model": "shakespeare-llama", "prompt": "ROMEO:\n",
                            "max_tokens": 200, "temperature": 0, "stream": True,
                            "ignore_eos": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data:")
            if chunks >= 3:
                break  # the client goes away after a few tokens
    s = wait_clean(inst)
    assert s["slots_busy"] == 0
