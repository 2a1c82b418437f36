"""The disaggregated deployment on two GPUs with the NCCL transport (prefill on cuda:0, decode on
cuda:1, the demo model in bf16): the real `openai` client through the gateway gets the greedy
output of an aggregated server on the same GPU type token for token, in the bulk and per-layer
hand-off modes; a prefill killed while decode waits to fetch, and a decode killed with a
hand-off pending, each end their request with a clear error and leave the survivor leak-free.
Needs two CUDA devices (skipped otherwise)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml

from tests.e2e.pd_cluster import Proc
from tests.e2e.server_process import DEMO_MODEL
from tests.e2e.test_pd_local import PROMPTS, _client, greedy_outputs, wait_clean

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA devices (NCCL pairs one GPU per instance)"),
]
MODEL = "shakespeare-llama"


def write_config(path: Path, **pd: Any) -> Path:
    cfg = {"model": {"path": str(DEMO_MODEL), "backend": "torch", "dtype": "bfloat16",
                     "device": "cuda:0"},
           "cache": {"block_size": 16, "num_blocks": 512},
           "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 2048},
           "server": {"max_tokens_default": 32},
           "pd": {"transport": "nccl", "handoff_timeout_s": 20.0, "attach_timeout_s": 20.0,
                  "fetch_timeout_s": 10.0, **pd}}
    path.write_text(yaml.safe_dump(cfg))
    return path


class GpuPD:
    """Decode on cuda:1, prefill on cuda:0, gateway; `stop()` ends whatever still runs."""

    def __init__(self, tmp: Path, decode_pd: dict[str, Any] | None = None, **pd: Any) -> None:
        config = write_config(tmp / "pd.yaml", **pd)
        dconfig = write_config(tmp / "decode.yaml", **{**pd, **(decode_pd or {})})
        self.procs: list[Proc] = []
        self.decode = self._add(Proc("decode", ["instance", "--role", "decode", "--device",
                                                "cuda:1", "--config", str(dconfig)],
                                     tmp / "decode.log"))
        self.prefill = self._add(Proc("prefill", ["instance", "--role", "prefill", "--device",
                                                  "cuda:0", "--decode-peers", self.decode.url,
                                                  "--config", str(config)],
                                      tmp / "prefill.log"))
        self.gateway = self._add(Proc("gateway", ["gateway", "--prefill", self.prefill.url,
                                                  "--config", str(config)],
                                      tmp / "gateway.log"))

    def _add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        try:
            return proc.wait_healthy()
        except Exception:
            self.stop()
            raise

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()}" for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str | None, Any]]:
    tmp = tmp_path_factory.mktemp("gpu-agg")
    config = write_config(tmp / "agg.yaml")
    server = Proc("serve", ["serve", "--device", "cuda:0", "--config", str(config)],
                  tmp / "serve.log")
    try:
        server.wait_healthy()
        return greedy_outputs(_client(server.url))
    finally:
        server.stop()


@pytest.fixture()
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[GpuPD]:
    c = GpuPD(tmp_path, **dict(getattr(request, "param", {})))
    try:
        yield c
    except Exception:
        print(c.logs())
        raise
    finally:
        c.stop()


@pytest.mark.parametrize("cluster", [{"handoff_mode": "bulk"}, {"handoff_mode": "per_layer"},
                                     {"handoff_mode": "bulk", "device_checksum": "none"},
                                     {"handoff_layerwise": True}],
                         indirect=True, ids=["bulk", "per_layer", "no_checksum", "layerwise"])
def test_greedy_equals_aggregated_over_nccl(cluster: GpuPD,
                                            aggregated: list[tuple[str | None, Any]]) -> None:
    assert greedy_outputs(_client(cluster.gateway.url)) == aggregated
    for proc in (cluster.prefill, cluster.decode):
        wait_clean(proc)
    assert cluster.decode.stats()["engine"]["steps"] > 0


def _request_in_background(url: str) -> tuple[threading.Thread, list[BaseException | str]]:
    result: list[BaseException | str] = []

    def go() -> None:
        try:
            r = _client(url).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=64,
                                                temperature=0, extra_body={"ignore_eos": True})
            result.append(r.choices[0].text or "")
        except openai.APIError as exc:
            result.append(exc)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("cluster", [{"decode_pd": {"fetch_delay_s": 3.0}}], indirect=True)
def test_prefill_killed_before_the_fetch(cluster: GpuPD) -> None:
    thread, result = _request_in_background(cluster.gateway.url)
    time.sleep(1.5)  # first token out, decode accepted the hand-off and waits to fetch
    cluster.prefill.stop(signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive() and len(result) == 1
    assert isinstance(result[0], openai.APIError), "the request must end with an error"
    s = wait_clean(cluster.decode)
    assert s["engine"]["open_requests"] == 0


@pytest.mark.parametrize("cluster", [{"decode_pd": {"fetch_delay_s": 3.0},
                                      "peer_probe_interval_s": 0.2}], indirect=True)
def test_decode_killed_with_a_handoff_pending(cluster: GpuPD) -> None:
    thread, result = _request_in_background(cluster.gateway.url)
    time.sleep(1.5)
    cluster.decode.stop(signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive() and len(result) == 1
    assert isinstance(result[0], openai.APIError)
    wait_clean(cluster.prefill)
