"""The HTTP layer in process: the real app, AsyncEngine and LLMEngine over FakeModelRunner,
driven through Starlette's TestClient (routes, SSE framing, auth, error bodies, leak check)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pd_serve.api.server import build_app
from pd_serve.config import CacheConfig, ModelSpec, SchedulerConfig, ServeConfig, ServerConfig
from pd_serve.engine.async_engine import AsyncEngine
from pd_serve.engine.engine import LLMEngine
from pd_serve.models.tokenizer import Tokenizer
from tests.fakes import FakeModelRunner

KEY = "sk-test"


def make_client(model_dir: Path, api_keys: tuple[str, ...] = ()) -> tuple[TestClient, LLMEngine]:
    cfg = ServeConfig(model=ModelSpec(name="fake", backend="torch"),
                      cache=CacheConfig(block_size=4, num_blocks=64),
                      scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=128),
                      server=ServerConfig(api_keys=api_keys, max_tokens_default=8))
    tok = Tokenizer(model_dir)
    engine = LLMEngine(FakeModelRunner(block_size=4, num_blocks=64), tok, cfg.cache,
                       cfg.scheduler)
    return TestClient(build_app(AsyncEngine(engine), tok, cfg)), engine


@pytest.fixture
def client(demo_model_dir: Path) -> Iterator[TestClient]:
    c, engine = make_client(demo_model_dir)
    with c:
        yield c
    engine.leak_check()  # the engine thread is joined once the client's lifespan ends
    assert not engine.has_unfinished()


def sse_events(text: str) -> list[Any]:
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), frames
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[len("data: "):]) for f in frames[:-1]]


def test_completion_and_usage(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "fake", "prompt": [5, 6, 7],
                                             "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_streams_match_the_full_response(client: TestClient) -> None:
    req = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**req, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == full
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_stream_shape(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["delta"] == {}
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["object"] == "chat.completion.chunk" for e in events)


@pytest.mark.parametrize(("path", "kwargs", "status", "code"), [
    ("/v1/completions", {"content": b'{"prompt": '}, 400, "invalid_json"),
    ("/v1/completions", {"content": b'[1, 2]'}, 400, None),
    ("/v1/completions", {"json": {"prompt": "x", "model": "nope"}}, 404, "model_not_found"),
    ("/v1/completions", {"json": {"prompt": "x", "max_tokens": 500}}, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"json": {"messages": []}}, 400, "invalid_value"),
    ("/v1/nothing", {"json": {}}, 404, "not_found"),
])
def test_errors_are_openai_bodies(client: TestClient, path: str, kwargs: dict[str, Any],
                                  status: int, code: str | None) -> None:
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_models_health_stats_metrics(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["fake"]
    assert client.get("/v1/models/fake").json()["max_model_len"] == 128
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/stats").json()["engine_thread_alive"] is True
    assert "pd_serve_http_responses_total" in client.get("/metrics").text


def test_api_keys(demo_model_dir: Path) -> None:
    c, _ = make_client(demo_model_dir, api_keys=(KEY,))
    with c:
        body = {"prompt": "x", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # operator routes stay open
