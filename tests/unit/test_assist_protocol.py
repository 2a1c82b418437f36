"""The assist wire format (pd_serve.gateway.assist_protocol), the gateway's handshake
(pd_serve.gateway.assist.handshake: 409 on model or tokenizer mismatch, 400 on what the model
cannot take, max_tokens = min(G, 1 + N)) and tokenizer_hash (stable under reformatting,
sensitive to the vocabulary and to the special-token roles)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from pd_serve.api.errors import APIError
from pd_serve.api.prepare import Limits
from pd_serve.config import ModelSpec, ServeConfig
from pd_serve.gateway.app import build_gateway_app
from pd_serve.gateway.assist import handshake
from pd_serve.gateway.assist_protocol import (
    ASSIST_PATH,
    AssistEnd,
    AssistRequest,
    AssistToken,
    end_reason,
    parse_event,
    sse_event,
)
from pd_serve.models.tokenizer import Tokenizer, tokenizer_hash
from tests.e2e.server_process import DEMO_MODEL

HASH = tokenizer_hash(DEMO_MODEL)
GW: Any = SimpleNamespace(limits=Limits("shakespeare-llama", 64, 1024, 16))


def request(**change: Any) -> dict[str, Any]:
    base = {"model": "shakespeare-llama", "tokenizer_hash": HASH, "prompt_token_ids": [5, 6, 7],
            "max_cloud_tokens": 4, "refine_ratio": 0.5, "sampling": {"max_tokens": 20}}
    return {**base, **change}


def test_valid_request_and_defaults() -> None:
    req = AssistRequest.model_validate(request())
    assert req.refine_window == 32 and req.cloud_max_tokens == 5
    assert AssistRequest.model_validate(request(max_cloud_tokens=50)).cloud_max_tokens == 20
    assert AssistRequest.model_validate(request(max_cloud_tokens=0)).cloud_max_tokens == 1
    assert AssistRequest.model_validate(request(refine_ratio=1)).refine_ratio == 1.0


@pytest.mark.parametrize("change", [
    {"refine_ratio": 0.0}, {"refine_ratio": 1.01}, {"refine_ratio": float("nan")},
    {"refine_ratio": "0.5"}, {"max_cloud_tokens": -1}, {"max_cloud_tokens": 2.5},
    {"max_cloud_tokens": True}, {"refine_window": -3}, {"prompt_token_ids": []},
    {"prompt_token_ids": ["5"]}, {"model": ""}, {"tokenizer_hash": ""}, {"extra": 1},
    {"sampling": {"max_tokens": 3, "bogus": 1}}])
def test_invalid_requests(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AssistRequest.model_validate(request(**change))


def test_missing_field() -> None:
    data = request()
    del data["tokenizer_hash"]
    with pytest.raises(ValidationError, match="tokenizer_hash"):
        AssistRequest.model_validate(data)


def test_handshake_mismatches_and_limits() -> None:
    params = handshake(AssistRequest.model_validate(request()), GW, HASH)
    assert params.max_tokens == 5 and params.temperature == 1.0
    cases = [(request(model="llama-70b"), 409, "model_mismatch", "llama-70b"),
             (request(tokenizer_hash="f" * 64), 409, "tokenizer_mismatch", "tokenizer"),
             (request(prompt_token_ids=[1, 1024]), 400, None, "vocabulary"),
             (request(sampling={"max_tokens": 62}), 400, "context_length_exceeded", "64"),
             (request(sampling={"max_tokens": 8, "top_p": 0.0}), 400, None, "top_p")]
    for data, status, code, text in cases:
        with pytest.raises(APIError) as err:
            handshake(AssistRequest.model_validate(data), GW, HASH)
        assert err.value.status == status and err.value.code == code
        assert text in err.value.message


def test_end_reasons() -> None:
    assert end_reason("stop", 3, 5, 20) == "stop"
    assert end_reason("length", 5, 5, 20) == "budget"
    assert end_reason("length", 5, 5, 5) == "length"  # G itself ran out
    assert end_reason("length", 3, 5, 20) == "length"  # the context filled first


def test_events_round_trip() -> None:
    for event in (AssistEnd(reason="budget", cloud_tokens=3),
                  AssistToken(index=1, token_id=9, text="a", finished=False,
                              finish_reason=None)):
        head, data = sse_event(event).strip().split("\n")
        parsed = parse_event(head.removeprefix("event: "), json.loads(data[len("data: "):]))
        assert parsed == event
    with pytest.raises(ValueError, match="unknown assist event"):
        parse_event("handoff", {})
    with pytest.raises(ValueError):
        parse_event("end", {"reason": "tired", "cloud_tokens": 1})


def test_tokenizer_hash(tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    spec = json.loads((copy / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(spec, indent=4))  # reformatted only
    assert tokenizer_hash(copy) == HASH
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|im_end|>"}))
    assert tokenizer_hash(copy) != HASH  # another token stops generation
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_hash(copy) == HASH
    spec["model"]["vocab"]["zz-new"] = len(spec["model"]["vocab"])
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    assert tokenizer_hash(copy) != HASH
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        tokenizer_hash(copy)


def test_gateway_route_refuses_before_forwarding() -> None:
    """The handshake runs before any instance is contacted (none listens at this address)."""
    cfg = ServeConfig(model=ModelSpec(path=str(DEMO_MODEL), backend="torch"))
    app = build_gateway_app(cfg, Tokenizer(DEMO_MODEL), 2048, {"p": "http://127.0.0.1:9"})
    with TestClient(app) as client:
        r = client.post(ASSIST_PATH, json=request(model="other"))
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_mismatch"
        r = client.post(ASSIST_PATH, json=request(tokenizer_hash="abc"))
        assert r.status_code == 409 and r.json()["error"]["code"] == "tokenizer_mismatch"
        r = client.post(ASSIST_PATH, json=request(refine_ratio=2))
        assert r.status_code == 400 and r.json()["error"]["param"] == "refine_ratio"
