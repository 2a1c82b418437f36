"""The aggregated server on the MindSpore backend as a real process, driven by the `openai`
client; its greedy output must equal the torch backend's on the same weights. Slow: MindSpore
compiles a graph per shape bucket on first use."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from pd_serve.backends import create_runner
from pd_serve.backends.base import RunnerConfig
from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer
from tests.e2e.server_process import DEMO_MODEL, ServerProcess, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL = "shakespeare-llama"
PROMPT = "ROMEO:\n"
GREEDY_TOKENS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("serve-mindspore")
    proc = ServerProcess(write_config(tmp / "serve.yaml", "mindspore", threads=2), tmp / "log")
    proc.start(timeout=600)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0,
                         timeout=600)


def torch_greedy_text() -> str:
    """The same request on the torch backend, in process."""
    tok = Tokenizer(DEMO_MODEL)
    runner = create_runner(RunnerConfig(model_dir=str(DEMO_MODEL), backend="torch",
                                        num_blocks=32, threads=1))
    try:
        engine = LLMEngine(runner, tok, CacheConfig(num_blocks=32), SchedulerConfig())
        params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
        return engine.generate([tok.encode(PROMPT)], params)[0].text
    finally:
        runner.close()


def test_greedy_completion_matches_torch(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=GREEDY_TOKENS,
                              temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert r.usage is not None and r.usage.completion_tokens == GREEDY_TOKENS
    assert r.choices[0].text == torch_greedy_text()
    streamed = client.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_chat_and_bad_request(server: ServerProcess, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Speak."}], max_tokens=8)
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 8
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    aborts = server.stats()["caller_aborts"]
    stream = client.completions.create(model=MODEL, prompt="KING:", max_tokens=500,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    stats = server.wait_idle_and_leak_free(aborts + 1, timeout=300)
    assert stats["leak_check"] == "ok" and stats["num_running"] == 0
