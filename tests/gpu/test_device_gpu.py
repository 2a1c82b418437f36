"""P/D-Device with the cloud on a GPU and the device on the CPU: the gateway, prefill and decode
processes on cuda:0 (torch, float32, TCP hand-off) serve the assist API; the device runtime
(torch CPU, two threads) shows one continuous stream whose cloud part is the cloud's greedy
output and whose local part is the device's own greedy continuation of prompt + those tokens, at
several hand-over points and at the natural one; rho < 1 uses the CUDA importance scores.
(GPU and CPU float32 may disagree on a near tie, so cloud-only equality is reported, not
asserted.) Needs one CUDA device (skipped otherwise)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pd_device import DeviceConfig, DeviceRuntime, RequestReport, Settings
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer
from tests.e2e.pd_cluster import Proc
from tests.e2e.server_process import DEMO_MODEL
from tests.e2e.test_pd_local import PROMPTS, wait_clean

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
N, G = 12, 32
GREEDY = SamplingParams(max_tokens=G, temperature=0.0, ignore_eos=True)
PROMPT = Tokenizer(DEMO_MODEL).encode(PROMPTS[2] * 3)


def _config(path: Path) -> Path:
    cfg: dict[str, Any] = {
        "model": {"path": str(DEMO_MODEL), "backend": "torch", "dtype": "float32",
                  "device": "cuda:0"},
        "cache": {"block_size": 16, "num_blocks": 512},
        "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 2048},
        "pd": {"transport": "tcp", "handoff_timeout_s": 20.0, "attach_timeout_s": 20.0}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    tmp = tmp_path_factory.mktemp("device-gpu")
    config = str(_config(tmp / "pd.yaml"))
    procs: list[Proc] = []
    try:
        decode = Proc("decode", ["instance", "--role", "decode", "--config", config],
                      tmp / "decode.log")
        procs.append(decode.wait_healthy())
        prefill = Proc("prefill", ["instance", "--role", "prefill", "--decode-peers",
                                   decode.url, "--config", config], tmp / "prefill.log")
        procs.append(prefill.wait_healthy())
        gateway = Proc("gateway", ["gateway", "--prefill", prefill.url, "--config", config],
                       tmp / "gateway.log")
        procs.append(gateway.wait_healthy())
        yield procs
    except Exception:
        print("\n".join(f"--- {p.name}\n{p.log()}" for p in procs))
        raise
    finally:
        for p in reversed(procs):
            p.stop()


def _device(url: str, **kw: Any) -> DeviceRuntime:
    return DeviceRuntime(DeviceConfig(model_dir=str(DEMO_MODEL), backend="torch", threads=2,
                                      cloud_url=url, **kw))


def _check(rt: DeviceRuntime, r: RequestReport, cloud_only: list[int]) -> None:
    """Continuous; cloud part = the cloud's greedy tokens; local part = the device's greedy
    continuation of its prompt + the cloud part."""
    rt.engine.leak_check()
    assert [e.index for e in r.events] == list(range(G))
    cut = r.cloud_tokens_used
    assert [e.source for e in r.events] == ["cloud"] * cut + ["local"] * (G - cut)
    assert r.token_ids[:cut] == cloud_only[:cut]
    if cut < G:
        local = rt.engine.generate([PROMPT + r.token_ids[:cut]],
                                   replace(GREEDY, max_tokens=G - cut))[0]
        assert r.token_ids[cut:] == local.new_token_ids


def test_cpu_device_with_a_gpu_cloud(cloud: list[Proc]) -> None:
    url = cloud[-1].url
    rt = _device(url)
    cloud_only = rt.run(PROMPT, GREEDY, Settings(mode="cloud_only")).token_ids
    device_only = rt.run(PROMPT, GREEDY, Settings(mode="device_only")).token_ids
    agree = sum(a == b for a, b in zip(cloud_only, device_only))
    print(f"GPU cloud vs CPU device greedy agreement: {agree}/{G}")
    for k in (0, N // 2, N):
        with _device(url, handover_after=k, warmup=False) as hooked:
            r = hooked.run(PROMPT, GREEDY, Settings(n_cloud=N, rho=1.0, pace_s=0.0))
            assert r.handover_index == k + 1
            _check(hooked, r, cloud_only)
    natural = rt.run(PROMPT, GREEDY, Settings(n_cloud=N, rho=1.0, pace_s=0.02))
    _check(rt, natural, cloud_only)
    refined = rt.run(PROMPT, GREEDY, Settings(n_cloud=N, rho=0.5, pace_s=0.0))
    assert refined.refined_tokens is not None and refined.refined_tokens < len(PROMPT)
    assert refined.token_ids[:refined.cloud_tokens_used] == cloud_only[
        :refined.cloud_tokens_used]
    rt.close()
    for proc in cloud[:2]:
        wait_clean(proc)
