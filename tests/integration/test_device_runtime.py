"""DeviceRuntime against a real HTTP assist server (FakeAssistServer: the spec's SSE events from a
real torch engine) on loopback: the user's stream is continuous (every token once, in order)
and, with rho = 1 and greedy sampling, equal to cloud-only and device-only token for token,
whatever the hand-over point; failures fall back or continue locally without losing or
repeating a token. Every test ends with both engines' leak checks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from pd_device import DeviceConfig, DeviceRuntime, RequestReport, Settings
from pd_serve.backends.base import ModelRunner, RunnerConfig
from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer, tokenizer_hash
from tests.checkpoints import DEMO_MODEL
from tests.fake_assist import FakeAssistServer, FakeBehaviour

pytest.importorskip("pd_serve.backends.torch.runner")

N, G = 8, 14
GREEDY = SamplingParams(max_tokens=G, temperature=0.0, ignore_eos=True)
TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and "
        "Juliet is the sun. Arise, fair sun, and kill the envious moon, who is already sick "
        "and pale with grief, that thou her maid art far more fair than she.")


def _runner(blocks: int = 128) -> ModelRunner:
    from pd_serve.backends import create_runner

    return create_runner(RunnerConfig(model_dir=str(DEMO_MODEL), backend="torch",
                                      num_blocks=blocks, threads=1))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(DEMO_MODEL)


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(TEXT)


@pytest.fixture(scope="module")
def cloud(tokenizer: Tokenizer) -> Iterator[FakeAssistServer]:
    runner = _runner()
    engine = LLMEngine(runner, tokenizer, CacheConfig(16, 128, True),
                       SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=1024))
    server = FakeAssistServer(engine, tokenizer_hash(DEMO_MODEL), DEMO_MODEL.name).start()
    yield server
    server.stop()
    runner.close()


@pytest.fixture(scope="module")
def device_runner() -> Iterator[ModelRunner]:
    runner = _runner()
    yield runner
    runner.close()


@pytest.fixture
def fake(cloud: FakeAssistServer) -> Iterator[FakeAssistServer]:
    cloud.behaviour = FakeBehaviour(token_gap_s=0.005)
    yield cloud
    cloud.engine.leak_check()


def _device(runner: ModelRunner, url: str | None, **kw: Any) -> DeviceRuntime:
    return DeviceRuntime(DeviceConfig(model_dir=str(DEMO_MODEL), backend="torch", threads=1,
                                      cloud_url=url, num_blocks=128, **kw), runner=runner)


def _run(rt: DeviceRuntime, prompt: list[int], settings: Settings,
         params: SamplingParams = GREEDY) -> RequestReport:
    report = rt.run(prompt, params, settings)
    rt.engine.leak_check()
    _check_continuous(report, params.max_tokens)
    return report


def _check_continuous(r: RequestReport, budget: int) -> None:
    """One stream: indices 0..n-1 once each, display times monotone, cloud tokens first."""
    assert [e.index for e in r.events] == list(range(len(r.events)))
    assert len(r.events) <= budget
    times = [e.t_display for e in r.events]
    assert times == sorted(times)
    sources = "".join("c" if e.source == "cloud" else "d" for e in r.events)
    assert "dc" not in sources  # never back to the cloud after the hand-over
    assert sum(1 for e in r.events if e.finish_reason) <= 1


@pytest.fixture(scope="module")
def reference(device_runner: ModelRunner, cloud: FakeAssistServer,
              prompt: list[int]) -> list[int]:
    """Greedy output of the cloud alone (cloud-only through the assist API)."""
    cloud.behaviour = FakeBehaviour()
    r = _run(_device(device_runner, cloud.url), prompt, Settings(mode="cloud_only"))
    assert r.mode == "cloud_only" and len(r.events) == G
    return r.token_ids


def test_rho1_greedy_equals_cloud_only_and_device_only(
        device_runner: ModelRunner, fake: FakeAssistServer, prompt: list[int],
        reference: list[int]) -> None:
    rt = _device(device_runner, fake.url)
    alone = _run(rt, prompt, Settings(mode="device_only"))
    assert alone.token_ids == reference and alone.handover_index == 0
    both = _run(rt, prompt, Settings(n_cloud=N, rho=1.0, pace_s=0.0))
    assert both.mode == "pd_device" and both.token_ids == reference
    assert both.text == alone.text
    assert both.refined_tokens == len(prompt) and both.cloud_tokens_used >= 1


@pytest.mark.parametrize("k", range(N + 1))
def test_handover_at_every_point_keeps_the_stream(
        k: int, device_runner: ModelRunner, fake: FakeAssistServer, prompt: list[int],
        reference: list[int]) -> None:
    r = _run(_device(device_runner, fake.url, handover_after=k), prompt,
             Settings(n_cloud=N, rho=1.0, pace_s=0.0))
    assert r.token_ids == reference
    assert r.handover_index == k + 1 and r.cloud_tokens_used == k + 1
    assert [e.source for e in r.events] == ["cloud"] * (k + 1) + ["local"] * (G - k - 1)


def test_slow_device_hands_over_when_caught_up(device_runner: ModelRunner,
                                               fake: FakeAssistServer, prompt: list[int],
                                               reference: list[int]) -> None:
    fake.behaviour = FakeBehaviour(token_gap_s=0.01)
    r = _run(_device(device_runner, fake.url, slowdown=8.0), prompt,
             Settings(n_cloud=N, rho=1.0, pace_s=0.02))
    assert r.token_ids == reference
    assert r.handover_index is not None and r.local_prefill_tokens >= len(prompt)


def test_pace_holds_buffered_cloud_tokens(device_runner: ModelRunner, fake: FakeAssistServer,
                                          prompt: list[int], reference: list[int]) -> None:
    """Cloud tokens arrive at once; the device (slowed down) needs longer than N paced gaps
    for its hand-over, so every cloud token is held to the pace (never shown faster)."""
    fake.behaviour = FakeBehaviour(token_gap_s=0.0)
    pace = 0.02
    r = _run(_device(device_runner, fake.url, handover_after=N, slowdown=60.0), prompt,
             Settings(n_cloud=N, rho=1.0, pace_s=pace))
    assert r.token_ids == reference
    cloud_gaps = r.tpot_gaps_s[:N]  # between the N + 1 cloud tokens
    assert min(cloud_gaps) >= pace - 1e-3


def test_cloud_tokens_alone_complete_a_short_request(
        device_runner: ModelRunner, fake: FakeAssistServer, prompt: list[int],
        reference: list[int]) -> None:
    rt = _device(device_runner, fake.url, handover_after=N)
    r = _run(rt, prompt, Settings(n_cloud=N, rho=1.0, pace_s=0.0),
             replace(GREEDY, max_tokens=5))
    assert r.token_ids == reference[:5] and r.handover_index is None
    assert r.finish_reason == "length" and r.events[-1].finish_reason == "length"
    one = _run(rt, prompt, Settings(n_cloud=N), replace(GREEDY, max_tokens=1))
    assert one.token_ids == reference[:1] and one.cloud_tokens_used == 1


def test_unreachable_cloud_falls_back_to_the_device(
        device_runner: ModelRunner, prompt: list[int], reference: list[int]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = _run(_device(device_runner, dead), prompt, Settings(n_cloud=N))
    assert r.mode == "fallback_device_only" and r.token_ids == reference
    assert r.reason is not None and "unreachable" in r.reason
    assert r.cloud_tokens_used == 0 and r.handover_index == 0


def test_silent_cloud_past_the_ttft_target_falls_back(
        device_runner: ModelRunner, fake: FakeAssistServer, prompt: list[int],
        reference: list[int]) -> None:
    fake.behaviour = FakeBehaviour(first_delay_s=1.0)
    r = _run(_device(device_runner, fake.url, ttft_target_s=0.2), prompt, Settings(n_cloud=N))
    assert r.mode == "fallback_device_only" and r.token_ids == reference
    assert r.reason is not None and "TTFT target" in r.reason
    assert r.ttft_s is not None and r.ttft_s < 1.0  # not waiting for the late first token


@pytest.mark.parametrize("kw, code", [({"model_name": "other-model"}, "model_mismatch"),
                                      ({}, "tokenizer_mismatch")])
def test_refused_handshake_falls_back_with_the_reason(
        kw: dict[str, Any], code: str, device_runner: ModelRunner, fake: FakeAssistServer,
        prompt: list[int], reference: list[int]) -> None:
    rt = _device(device_runner, fake.url, **kw)
    if code == "tokenizer_mismatch":
        rt.tokenizer_hash = "0" * 64  # a device with another tokenizer build
    r = _run(rt, prompt, Settings(n_cloud=N))
    assert r.mode == "fallback_device_only" and r.token_ids == reference
    assert r.reason is not None and code in r.reason and "409" in r.reason


def test_disconnection_mid_stream_continues_from_what_was_received(
        device_runner: ModelRunner, fake: FakeAssistServer, prompt: list[int],
        reference: list[int]) -> None:
    fake.behaviour = FakeBehaviour(token_gap_s=0.005, drop_after_tokens=3)
    r = _run(_device(device_runner, fake.url, handover_after=N), prompt,
             Settings(n_cloud=N, rho=1.0, pace_s=0.01))
    assert r.mode == "pd_device" and r.token_ids == reference
    assert r.cloud_tokens_used == 4 and r.handover_index == 4  # first + 3 tokens
    assert r.reason is not None and "disconnected" in r.reason


def test_refined_prompt_continues_locally(device_runner: ModelRunner, fake: FakeAssistServer,
                                          prompt: list[int], reference: list[int]) -> None:
    k = 3
    rt = _device(device_runner, fake.url, handover_after=k, refine_window=8)
    r = _run(rt, prompt, Settings(n_cloud=N, rho=0.5, pace_s=0.0))
    assert r.refined_tokens is not None and r.refined_tokens < len(prompt)
    assert len(r.events) == G and r.token_ids[:k + 1] == reference[:k + 1]
    request = fake.requests[-1]
    assert request.refine_ratio == 0.5 and request.refine_window == 8
    # The device's continuation is its own greedy decode over refined prompt + cloud tokens.
    keep = sorted(set(range(len(prompt) - 8, len(prompt)))
                  | set(range(0, len(prompt), 2)[:max(-(-len(prompt) // 2) - 8, 0)]))
    local = rt.engine.generate([[prompt[i] for i in keep] + r.token_ids[:k + 1]],
                               replace(GREEDY, max_tokens=G - k - 1))[0]
    assert r.token_ids[k + 1:] == local.new_token_ids
    rt.engine.leak_check()


@pytest.mark.parametrize("where", ["cloud", "local"])
def test_stop_token_and_string_end_the_stream_as_device_only(
        where: str, device_runner: ModelRunner, fake: FakeAssistServer, prompt: list[int],
        reference: list[int], tokenizer: Tokenizer) -> None:
    k = 4
    rt = _device(device_runner, fake.url, handover_after=k)
    at = 2 if where == "cloud" else 9
    by_token = replace(GREEDY, stop_token_ids=(reference[at],))
    alone = _run(rt, prompt, Settings(mode="device_only"), by_token)
    both = _run(rt, prompt, Settings(n_cloud=N), by_token)
    assert both.token_ids == alone.token_ids and both.finish_reason == "stop"
    # A stop string across the seam between cloud token k and local token k + 1.
    seam = tokenizer.decode(reference[k:k + 2])
    if seam.strip():
        by_text = replace(GREEDY, stop=(seam,))
        alone = _run(rt, prompt, Settings(mode="device_only"), by_text)
        both = _run(rt, prompt, Settings(n_cloud=N), by_text)
        assert both.text == alone.text and both.token_ids == alone.token_ids


def test_closing_the_stream_early_cancels_cloud_and_device(
        device_runner: ModelRunner, fake: FakeAssistServer, prompt: list[int]) -> None:
    fake.behaviour = FakeBehaviour(token_gap_s=0.05)
    rt = _device(device_runner, fake.url, handover_after=N)
    before = fake.cancelled
    stream = rt.generate(prompt, GREEDY, Settings(n_cloud=N, pace_s=0.0))
    shown = [next(stream) for _ in range(2)]
    stream.close()  # type: ignore[attr-defined]
    assert rt.last_report is not None and rt.last_report.finish_reason == "abort"
    assert rt.last_report.token_ids == [e.token_id for e in shown]
    rt.engine.leak_check()
    _run(rt, prompt, Settings(mode="device_only"))  # the runtime is usable again
    with fake._lock:  # the fake saw the disconnect once its stream wrote again
        assert fake.cancelled == before + 1


def test_bad_requests_are_refused(device_runner: ModelRunner, prompt: list[int]) -> None:
    rt = _device(device_runner, None)
    with pytest.raises(ValueError, match="empty"):
        rt.generate([], GREEDY)
    with pytest.raises(ValueError, match="cloud_url"):
        rt.generate(prompt, GREEDY, Settings(mode="pd_device"))
    with pytest.raises(ValueError, match="rho"):
        Settings(rho=0.0)
    with pytest.raises(ValueError, match="model_dir"):
        DeviceConfig(model_dir="/nonexistent")
    busy = rt.generate(prompt, GREEDY, Settings(mode="device_only"))
    next(busy)
    with pytest.raises(ValueError, match="one request at a time"):
        rt.generate(prompt, GREEDY, Settings(mode="device_only"))
    busy.close()  # type: ignore[attr-defined]
    rt.engine.leak_check()


@pytest.mark.parametrize("reuse", [False, True])
def test_each_request_starts_cold_unless_asked(reuse: bool, device_runner: ModelRunner,
                                               prompt: list[int]) -> None:
    rt = _device(device_runner, None, reuse_prefix_cache=reuse)
    first = _run(rt, prompt, Settings(mode="device_only"))
    again = _run(rt, prompt, Settings(mode="device_only"))
    assert again.token_ids == first.token_ids
    assert first.local_prefill_tokens == len(prompt)
    assert (again.local_prefill_tokens < len(prompt)) == reuse
