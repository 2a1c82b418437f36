"""Pure P/D policies and control-plane messages: slot admission, decode-peer and prefill ranking,
SamplingParams over the wire."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.frontend.forward import rank_prefills
from pd_serve.instance.admission import SlotPool, rank_decode_peers
from pd_serve.instance.messages import AssignRequest, PrefillRequest, SamplingWire


def test_slot_pool_rejects_when_full_and_refuses_double_free() -> None:
    pool = SlotPool(2)
    assert (pool.acquire(), pool.acquire(), pool.acquire()) == (0, 1, None)
    assert pool.busy == 2
    pool.release(1)
    assert pool.acquire() == 1
    pool.release(0)
    with pytest.raises(AssertionError):
        pool.release(0)


def test_rankings_fewest_in_flight_then_configured_order() -> None:
    assert rank_decode_peers(["a", "b", "c"], {"a": 2, "b": 0}) == ["b", "c", "a"]
    assert rank_prefills(["p", "q"], {"p": 1, "q": 1}) == ["p", "q"]


def test_sampling_roundtrip_and_validation() -> None:
    p = SamplingParams(max_tokens=7, temperature=0.0, stop=("\n",), stop_token_ids=(3,), seed=5)
    assert SamplingWire.of(p).params() == p
    with pytest.raises(ValueError, match="top_p"):
        SamplingWire(top_p=0.0).params()


def test_messages_are_strict() -> None:
    with pytest.raises(ValidationError):
        AssignRequest.model_validate({"role": "router"})
    with pytest.raises(ValidationError):
        PrefillRequest.model_validate({"request_id": "r", "prompt_token_ids": [],
                                       "sampling": {}})
    with pytest.raises(ValidationError):
        AssignRequest.model_validate({"role": "decode", "surprise": 1})
