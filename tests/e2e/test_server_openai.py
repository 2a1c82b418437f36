"""The aggregated server as a real process (torch backend, demo model) driven by the real
`openai` client: completions and chat, streaming or not, usage, greedy determinism, stop strings,
prefix-cache usage, the bad-request table, client aborts, and `pd-serve up`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pd_serve.models.tokenizer import Tokenizer
from tests.e2e.server_process import DEMO_MODEL, REPO, ServerProcess, write_config

pytestmark = pytest.mark.e2e
MODEL = "shakespeare-llama"
NUM_BLOCKS = 256
USER: Any = [{"role": "user", "content": "Good morrow, my lord."}]
LONG_PROMPT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, "
               "speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("serve-torch")
    proc = ServerProcess(write_config(tmp / "serve.yaml", "torch", NUM_BLOCKS), tmp / "log")
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(DEMO_MODEL)


def test_completion_usage(client: openai.OpenAI, tok: Tokenizer) -> None:
    r = client.completions.create(model=MODEL, prompt="ROMEO:\n", max_tokens=12,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(tok.encode("ROMEO:\n")), 12, len(tok.encode("ROMEO:\n")) + 12)


def test_chat_usage(client: openai.OpenAI, tok: Tokenizer) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=10)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(USER)))
    assert 1 <= r.usage.completion_tokens <= 10


def test_greedy_is_deterministic_and_streams_the_same_text(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="JULIET:\n", max_tokens=24, temperature=0)
    first = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == first
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=USER, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and full.usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_strings(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="KING RICHARD II:\n", max_tokens=40,
                              temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    assert len(text) > 20, text
    stop = text[12:15]
    expected = text[:text.index(stop)]
    r = client.completions.create(**kw, stop=[stop, "\u2603never"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_prefix_cache_shows_in_usage(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=LONG_PROMPT, max_tokens=2)
    client.completions.create(**kw)
    usage = client.completions.create(**kw).usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    assert 0 < cached < usage.prompt_tokens and cached % 16 == 0


def _over_context() -> dict[str, Any]:
    return {"prompt": [5] * 2048, "max_tokens": 1}


BAD: list[tuple[str, str, dict[str, Any], int, str | None]] = [
    # id, endpoint, request fields, status, param
    ("unknown-model", "completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("max-tokens-zero", "completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", "completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("max-tokens-over-context", "completions", {"prompt": "x", "max_tokens": 4096}, 400,
     "max_tokens"),
    ("max-tokens-string", "completions", {"prompt": "x", "max_tokens": "7"}, 400, "max_tokens"),
    ("prompt-over-context", "completions", _over_context(), 400, "prompt"),
    ("empty-prompt", "completions", {"prompt": ""}, 400, "prompt"),
    ("two-prompts", "completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("temperature", "completions", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("top-p", "completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top-k", "completions", {"prompt": "x", "extra_body": {"top_k": -3}}, 400, "top_k"),
    ("n", "completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("empty-messages", "chat", {"messages": []}, 400, "messages"),
    ("bad-role", "chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("chat-over-context", "chat", {"messages": USER, "max_tokens": 2048}, 400, "max_tokens"),
]


@pytest.mark.parametrize(("endpoint", "fields", "status", "param"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(client: openai.OpenAI, endpoint: str,
                                        fields: dict[str, Any], status: int,
                                        param: str | None) -> None:
    create: Any = (client.completions.create if endpoint == "completions"
                   else client.chat.completions.create)
    with pytest.raises(openai.APIStatusError) as info:
        create(**{"model": MODEL, **fields})
    assert info.value.status_code == status
    body: Any = info.value.body  # the client unwraps {"error": {...}}
    err = body.get("error", body)
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices


@pytest.mark.parametrize("raw", [b'{"prompt": "x",', b"\xff\xfe", b"[]", b""])
def test_malformed_bodies(server: ServerProcess, client: openai.OpenAI, raw: bytes) -> None:
    r = httpx.post(f"{server.base}/v1/completions", content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices


def test_aborted_stream_leaves_no_blocks(server: ServerProcess, client: openai.OpenAI) -> None:
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    aborts = server.stats()["caller_aborts"]
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert len(got) >= 3
        assert server.stats()["open_requests"] == 1  # still generating when we hang up
    stats = server.wait_idle_and_leak_free(aborts + 1)
    assert stats["leak_check"] == "ok" and stats["num_running"] == 0
    assert stats["num_free_blocks"] == NUM_BLOCKS and stats["caller_aborts"] == aborts + 1
    # The openai client leaving a stream early, and a non-streaming client timing out.
    stream = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=1500,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/completions", json={**body, "stream": False}, timeout=1.0)
    stats = server.wait_idle_and_leak_free(aborts + 3)
    assert stats["leak_check"] == "ok" and stats["num_free_blocks"] == NUM_BLOCKS
    assert stats["caller_aborts"] == aborts + 3  # none of the three ran to 1500 tokens
    assert httpx.get(f"{server.base}/health").json()["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices


def test_concurrent_requests(server: ServerProcess) -> None:
    import asyncio

    async def main() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key="none",
                                     max_retries=0, timeout=120)
        reqs = [aclient.completions.create(model=MODEL, prompt=f"Scene {i}:\n", max_tokens=8,
                                           extra_body={"ignore_eos": True}) for i in range(6)]
        return await asyncio.gather(*reqs)

    results = asyncio.run(main())
    assert all(r.usage.completion_tokens == 8 for r in results)


def test_models_and_health(server: ServerProcess, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server.base}/health").status_code == 200
    assert "pd_serve_http_responses_total" in httpx.get(f"{server.base}/metrics").text


def test_pd_serve_up_sample(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pd_serve", "up", "--config", "configs/deploy/local-torch.yaml",
           "--port", "0", "--exit-after-sample"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[chat] assistant:" in r.stdout and "[completion] ROMEO:" in r.stdout
