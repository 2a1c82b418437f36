"""P/D-Device end to end: the device runtime (torch, one thread; MindSpore in a slow test) talks
to real cloud processes (gateway, prefill, decode; torch, demo model) through the link emulator
running as its own process (`python -m pd_device.link`, 20 ms RTT). With rho = 1 and greedy
sampling the user's stream equals cloud-only serving (the OpenAI completions endpoint and the
assist API with N = G - 1) and device-only serving token for token, at several hand-over points
and at the natural one; killing the link mid-stream leaves a continuous stream; an unreachable
cloud and a refused handshake fall back to the device. Every test ends with the cloud's leak
checks and the device engine's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pd_device import DeviceConfig, DeviceRuntime, RequestReport, Settings
from pd_serve.backends.base import ModelRunner, RunnerConfig
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer
from tests.e2e.pd_cluster import PDCluster, running_cluster
from tests.e2e.server_process import DEMO_MODEL, REPO, free_port
from tests.e2e.test_pd_local import MODEL, PROMPTS, check_clean

pytestmark = pytest.mark.e2e
N, G = 12, 24
GREEDY = SamplingParams(max_tokens=G, temperature=0.0, ignore_eos=True)
PROMPT = Tokenizer(DEMO_MODEL).encode(PROMPTS[2] * 2)


class LinkProcess:
    """`python -m pd_device.link` in front of `upstream_port`; `kill()` is a SIGKILL."""

    def __init__(self, upstream_port: int, rtt_ms: float = 20.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pd_device.link", "--listen", f"127.0.0.1:{self.port}",
             "--upstream", f"127.0.0.1:{upstream_port}", "--rtt-ms", str(rtt_ms),
             "--jitter-ms", "2", "--seed", "1"],
            cwd=REPO, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert b"link:" in line, line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDCluster]:
    with running_cluster(tmp_path_factory.mktemp("device")) as c:
        yield c


@pytest.fixture
def link(cluster: PDCluster) -> Iterator[LinkProcess]:
    assert cluster.frontend is not None
    proc = LinkProcess(cluster.frontend.port)
    yield proc
    proc.kill()
    check_clean(cluster)


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    from pd_serve.backends import create_runner

    r = create_runner(RunnerConfig(model_dir=str(DEMO_MODEL), backend="torch", num_blocks=128,
                                   threads=1))
    yield r
    r.close()


def device(runner: ModelRunner | None, url: str, **kw: Any) -> DeviceRuntime:
    kw.setdefault("backend", "torch")
    return DeviceRuntime(DeviceConfig(model_dir=str(DEMO_MODEL), threads=1, cloud_url=url,
                                      num_blocks=128, **kw), runner=runner)


def run(rt: DeviceRuntime, settings: Settings) -> RequestReport:
    r = rt.run(PROMPT, GREEDY, settings)
    rt.engine.leak_check()
    assert [e.index for e in r.events] == list(range(len(r.events)))
    assert "dc" not in "".join("c" if e.source == "cloud" else "d" for e in r.events)
    return r


@pytest.fixture(scope="module")
def reference(cluster: PDCluster, runner: ModelRunner) -> tuple[list[int], str]:
    """Cloud-only greedy tokens (assist with N = G - 1) and the completions endpoint's text."""
    assert cluster.frontend is not None
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": G, "temperature": 0.0,
            "ignore_eos": True}
    text = httpx.post(f"{cluster.frontend.url}/v1/completions", json=body,
                      timeout=120).json()["choices"][0]["text"]
    r = run(device(runner, cluster.frontend.url), Settings(mode="cloud_only"))
    assert r.text == text and len(r.events) == G
    return r.token_ids, text


def test_pd_device_equals_cloud_only_and_device_only(
        link: LinkProcess, runner: ModelRunner, reference: tuple[list[int], str]) -> None:
    rt = device(runner, link.url)
    alone = run(rt, Settings(mode="device_only"))
    both = run(rt, Settings(n_cloud=N, rho=1.0, pace_s=0.01))
    assert alone.token_ids == both.token_ids == reference[0]
    assert both.text == reference[1] and both.mode == "pd_device"
    slow = run(device(runner, link.url, slowdown=10.0), Settings(n_cloud=N, pace_s=0.02))
    assert slow.token_ids == reference[0] and slow.handover_index is not None


@pytest.mark.parametrize("k", [0, 1, N // 2, N])
def test_handover_points_through_the_link(
        k: int, link: LinkProcess, runner: ModelRunner,
        reference: tuple[list[int], str]) -> None:
    r = run(device(runner, link.url, handover_after=k), Settings(n_cloud=N, pace_s=0.0))
    assert r.token_ids == reference[0] and r.handover_index == k + 1


def test_killing_the_link_mid_stream_continues_on_the_device(
        cluster: PDCluster, link: LinkProcess, runner: ModelRunner,
        reference: tuple[list[int], str]) -> None:
    rt = device(runner, link.url, handover_after=G - 1)
    stream = rt.generate(PROMPT, GREEDY, Settings(n_cloud=G - 1, pace_s=0.02))
    first = next(stream)  # shown as soon as it arrives; the cloud is still decoding
    link.kill()
    rest = list(stream)
    r = rt.last_report
    assert r is not None and r.mode == "pd_device"
    assert [first.token_id, *[e.token_id for e in rest]] == reference[0]
    assert r.cloud_tokens_used == r.cloud_tokens_received >= 1
    if r.cloud_tokens_received < G:
        assert r.reason is not None and "disconnected" in r.reason
        assert r.handover_index == r.cloud_tokens_used
    rt.engine.leak_check()


def test_unreachable_cloud_and_refused_handshake_fall_back(
        link: LinkProcess, runner: ModelRunner, reference: tuple[list[int], str]) -> None:
    rt = device(runner, link.url, model_name="not-served")
    refused = run(rt, Settings(n_cloud=N))
    assert refused.mode == "fallback_device_only" and refused.token_ids == reference[0]
    assert refused.reason is not None and "model_mismatch" in refused.reason
    link.kill()
    t0 = time.monotonic()
    gone = run(device(runner, link.url), Settings(n_cloud=N))
    assert gone.mode == "fallback_device_only" and gone.token_ids == reference[0]
    assert gone.reason is not None and "unreachable" in gone.reason
    assert time.monotonic() - t0 < 60


def test_refined_prompt_from_the_cloud(link: LinkProcess, runner: ModelRunner,
                                       reference: tuple[list[int], str]) -> None:
    r = run(device(runner, link.url, handover_after=2, refine_window=8),
            Settings(n_cloud=N, rho=0.5, pace_s=0.0))
    assert r.refined_tokens is not None and r.refined_tokens < len(PROMPT)
    assert len(r.events) == G and r.token_ids[:3] == reference[0][:3]


@pytest.mark.slow
def test_mindspore_device_equals_cloud_only(link: LinkProcess,
                                            reference: tuple[list[int], str]) -> None:
    """The default device backend (MindSpore CPU, one thread) against the torch cloud."""
    pytest.importorskip("mindspore")
    from pd_serve.backends import create_runner

    ms = create_runner(RunnerConfig(model_dir=str(DEMO_MODEL), backend="mindspore",
                                    num_blocks=128, threads=1))
    try:
        for k in (None, 0, N):
            rt = device(ms, link.url, backend="mindspore", handover_after=k)
            r = run(rt, Settings(n_cloud=N, rho=1.0, pace_s=0.0))
            assert r.token_ids == reference[0], k
        assert run(rt, Settings(mode="device_only")).token_ids == reference[0]
    finally:
        ms.close()


def test_command_line_streams_one_prompt(link: LinkProcess,
                                         reference: tuple[list[int], str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pd_device", "run", "--model", str(DEMO_MODEL), "--cloud",
         link.url, "--backend", "torch", "--threads", "1", "--prompt", PROMPTS[2] * 2,
         "--n-cloud", str(N), "--max-tokens", str(G), "--pace-ms", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "mode=pd_device" in out.stderr and "ttft=" in out.stderr
    assert out.stdout.endswith("\n") and reference[1].startswith(out.stdout[:-1])  # EOS may cut
    bad = subprocess.run([sys.executable, "-m", "pd_device", "run", "--prompt", "x", "--rho",
                          "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error: rho" in bad.stderr
