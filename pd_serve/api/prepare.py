"""Turns a validated OpenAI request into engine inputs: prompt token ids and SamplingParams,
enforcing the served model's name, vocabulary and context length.

Context policy (as vLLM): a prompt must leave room for at least one new token; an explicit
`max_tokens` with prompt + max_tokens over the context is a 400; when `max_tokens` is omitted
the server default is capped to the room the prompt leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

from pd_serve.api.errors import APIError, bad_request, model_not_found
from pd_serve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingRequest,
)
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer

# Chat templates end each turn with one of these; generation stops there, not at EOS only.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class Limits:
    """What the served model accepts."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_tokens_default: int


@dataclass(frozen=True)
class Prepared:
    prompt_token_ids: list[int]
    params: SamplingParams


def check_model(requested: str | None, limits: Limits) -> None:
    if requested is not None and requested != limits.model_name:
        raise model_not_found(requested)


def prepare_completion(req: CompletionRequest, tok: Tokenizer, limits: Limits) -> Prepared:
    check_model(req.model, limits)
    prompt = _completion_prompt(req.prompt, tok, limits)
    return Prepared(prompt, _params(req, req.max_tokens, len(prompt), limits, (), "prompt"))


def prepare_chat(req: ChatCompletionRequest, tok: Tokenizer, limits: Limits) -> Prepared:
    check_model(req.model, limits)
    try:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from exc
    prompt = tok.encode(text)
    end_ids = tuple(i for t in END_OF_TURN_TOKENS if (i := tok.token_to_id(t)) is not None)
    return Prepared(prompt, _params(req, req.completion_limit, len(prompt), limits, end_ids,
                                    "messages"))


def _completion_prompt(prompt: str | list[int] | list[str] | list[list[int]], tok: Tokenizer,
                       limits: Limits) -> list[int]:
    """One prompt as text, token ids, or a one-element list of either."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tok.encode(prompt) if prompt else []
    else:
        ids = list(prompt)  # type: ignore[arg-type]
        _check_token_ids(ids, limits, "prompt")
    if not ids:
        raise bad_request("prompt must not be empty", param="prompt")
    return ids


def _check_token_ids(ids: list[int], limits: Limits, param: str) -> None:
    bad = [i for i in ids if not 0 <= i < limits.vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary "
                          f"[0, {limits.vocab_size})", param=param)


def _params(req: _SamplingRequest, max_tokens: int | None, prompt_len: int, limits: Limits,
            extra_stop_ids: tuple[int, ...], prompt_param: str) -> SamplingParams:
    room = limits.max_model_len - prompt_len
    if room < 1:
        raise _context_error(limits, f"However, your {prompt_param} has {prompt_len} tokens, "
                             "which leaves no room for a completion.", prompt_param)
    if max_tokens is None:
        max_tokens = min(limits.max_tokens_default, room)
    elif max_tokens > room:
        raise _context_error(
            limits, f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
            f"{prompt_param}, {max_tokens} for the completion). Please reduce the length of the "
            f"{prompt_param} or of the completion.", "max_tokens")
    stop_ids = list(req.stop_token_ids or [])
    _check_token_ids(stop_ids, limits, "stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0, seed=req.seed, stop=tuple(req.stop_list),
            stop_token_ids=tuple(dict.fromkeys([*stop_ids, *extra_stop_ids])),
            ignore_eos=req.ignore_eos)
    except ValueError as exc:
        raise bad_request(str(exc)) from exc


def _context_error(limits: Limits, detail: str, param: str) -> APIError:
    return bad_request(f"This model's maximum context length is {limits.max_model_len} tokens. "
                       f"{detail}",
                       param=param, code="context_length_exceeded")
