"""Request validation table for /v1/completions and /v1/chat/completions: each bad request maps
to the right status, OpenAI error param and message; good ones to the right engine inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pd_serve.api.errors import APIError, from_validation_errors, parse_json
from pd_serve.api.prepare import Limits, Prepared, prepare_chat, prepare_completion
from pd_serve.api.protocol import ChatCompletionRequest, CompletionRequest, Usage
from pd_serve.models.tokenizer import Tokenizer

LIMITS = Limits(model_name="shakespeare-llama", max_model_len=64, vocab_size=1024,
                max_tokens_default=128)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer(demo_model_dir)


def prepare(kind: str, body: dict[str, Any], tok: Tokenizer) -> Prepared | APIError:
    try:
        if kind == "completions":
            return prepare_completion(CompletionRequest.model_validate(body), tok, LIMITS)
        return prepare_chat(ChatCompletionRequest.model_validate(body), tok, LIMITS)
    except ValidationError as exc:
        return from_validation_errors(list(exc.errors()))
    except APIError as exc:
        return exc


C, CH = "completions", "chat"
BAD: list[tuple[str, dict[str, Any], int, str | None, str]] = [
    # kind, body, status, param, message fragment
    (C, {}, 400, "prompt", "field required"),
    (C, {"prompt": ""}, 400, "prompt", "must not be empty"),
    (C, {"prompt": []}, 400, "prompt", "must not be empty"),
    (C, {"prompt": ["a", "b"]}, 400, "prompt", "only one prompt"),
    (C, {"prompt": [[1, 2], [3]]}, 400, "prompt", "only one prompt"),
    (C, {"prompt": [1, 5000]}, 400, "prompt", "outside the vocabulary"),
    (C, {"prompt": [1, "a"]}, 400, "prompt", "valid"),
    (C, {"prompt": 5}, 400, "prompt", "valid"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    (C, {"prompt": "x", "max_tokens": -3}, 400, "max_tokens", "greater than or equal to 1"),
    (C, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    (C, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", "valid integer"),
    (C, {"prompt": "x", "max_tokens": True}, 400, "max_tokens", "valid integer"),
    (C, {"prompt": "x", "max_tokens": 64}, 400, "max_tokens", "maximum context length is 64"),
    (C, {"prompt": list(range(1, 65))}, 400, "prompt", "no room for a completion"),
    (C, {"prompt": "x", "temperature": -0.1}, 400, "temperature", "greater than or equal"),
    (C, {"prompt": "x", "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    (C, {"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    (C, {"prompt": "x", "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    (C, {"prompt": "x", "top_k": -2}, 400, "top_k", "greater than or equal to -1"),
    (C, {"prompt": "x", "n": 2}, 400, "n", "only 1"),
    (C, {"prompt": "x", "stop": ""}, 400, "stop", "must not be empty"),
    (C, {"prompt": "x", "stop": ["a"] * 17}, 400, "stop", "at most 16"),
    (C, {"prompt": "x", "stop": 5}, 400, "stop", "valid"),
    (C, {"prompt": "x", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    (C, {"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    (C, {"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    (C, {"prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    (C, {"prompt": "x", "best_of": 2}, 400, "best_of", "only 1"),
    (C, {"prompt": "x", "suffix": "end"}, 400, "suffix", "not supported"),
    (C, {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    (C, {"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    (C, {"prompt": "x", "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage", "valid boolean"),
    (C, {"prompt": "x", "stop_token_ids": [4096]}, 400, "stop_token_ids", "outside"),
    (CH, {}, 400, "messages", "field required"),
    (CH, {"messages": []}, 400, "messages", "must not be empty"),
    (CH, {"messages": "hi"}, 400, "messages", "valid list"),
    (CH, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "Input"),
    (CH, {"messages": [{"content": "x"}]}, 400, "messages[0].role", "field required"),
    (CH, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
     "only text content parts"),
    (CH, {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens",
     "greater than or equal to 1"),
    (CH, {"messages": USER, "max_completion_tokens": 60}, 400, "max_tokens",
     "maximum context length"),
    (CH, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    (CH, {"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format",
     "only type 'text'"),
    (CH, {"messages": USER, "logprobs": True}, 400, "logprobs", "not supported"),
    (CH, {"messages": USER, "n": 3}, 400, "n", "only 1"),
    (CH, {"messages": USER, "model": ""}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize(("kind", "body", "status", "param", "fragment"), BAD,
                         ids=[f"{k}-{i}" for i, (k, *_rest) in enumerate(BAD)])
def test_bad_request_table(kind: str, body: dict[str, Any], status: int, param: str | None,
                           fragment: str, tok: Tokenizer) -> None:
    result = prepare(kind, body, tok)
    assert isinstance(result, APIError), f"accepted: {result}"
    err = result.body()["error"]
    assert (result.status, err["param"]) == (status, param), err
    assert fragment in err["message"], err
    assert err["type"] in ("invalid_request_error", "authentication_error")


def test_malformed_json_is_a_400() -> None:
    with pytest.raises(APIError) as info:
        parse_json(b'{"prompt": "x",')
    assert info.value.status == 400 and info.value.code == "invalid_json"


@pytest.mark.parametrize("prompt", ["ROMEO:", ["ROMEO:"], [5, 6, 7], [[5, 6, 7]]])
def test_prompt_forms(prompt: Any, tok: Tokenizer) -> None:
    result = prepare(C, {"prompt": prompt, "max_tokens": 5, "unknown_field": {"x": 1}}, tok)
    assert isinstance(result, Prepared)
    expected = tok.encode("ROMEO:") if "ROMEO:" in str(prompt) else [5, 6, 7]
    assert result.prompt_token_ids == expected
    assert result.params.max_tokens == 5


def test_sampling_fields_reach_sampling_params(tok: Tokenizer) -> None:
    result = prepare(C, {"prompt": "x", "max_tokens": 7, "temperature": 0, "top_p": 0.5,
                         "top_k": 20, "seed": 3, "stop": "\n", "ignore_eos": True}, tok)
    assert isinstance(result, Prepared)
    p = result.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.ignore_eos) == (
        7, 0.0, 0.5, 20, 3, ("\n",), True)


def test_default_max_tokens_is_capped_to_the_room_left(tok: Tokenizer) -> None:
    result = prepare(C, {"prompt": list(range(1, 61))}, tok)
    assert isinstance(result, Prepared) and result.params.max_tokens == 4
    result = prepare(C, {"prompt": [1]}, tok)
    assert isinstance(result, Prepared) and result.params.max_tokens == 63


def test_chat_uses_template_end_of_turn_and_max_completion_tokens(tok: Tokenizer) -> None:
    result = prepare(CH, {"messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text",
                                                                     "text": "hi"}]}],
                          "max_tokens": 30, "max_completion_tokens": 9}, tok)
    assert isinstance(result, Prepared)
    expected = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "hi"}])
    assert result.prompt_token_ids == tok.encode(expected)
    assert result.params.max_tokens == 9
    assert tok.token_to_id("<|im_end|>") in result.params.stop_token_ids


def test_usage_totals() -> None:
    u = Usage.of(prompt=10, completion=5, cached=8)
    assert (u.total_tokens, u.prompt_tokens_details.cached_tokens) == (15, 8)
