"""Pure P/D policies and control-plane messages: slot admission, decode-peer and prefill ranking,
decode-peer liveness, SamplingParams over the wire."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.gateway.policy import rank as rank_prefills
from pd_serve.instance.admission import PeerHealth, SlotPool, rank_decode_peers
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
    assert rank_decode_peers(["a", "b", "c"], {"a": 2}, start=2) == ["c", "b", "a"]
    assert rank_decode_peers(["a", "b", "c"], {}, start=4) == ["b", "c", "a"]
    assert rank_decode_peers([], {}, start=3) == []


def test_rotation_spreads_hand_offs_over_every_decode_peer() -> None:
    """One prefill with at most 2 hand-offs in flight and 6 idle decode peers: advancing the
    start reaches all of them (without it only the first two were ever chosen)."""
    peers = [f"d{i}" for i in range(6)]
    chosen = {rank_decode_peers(peers, {}, start)[0] for start in range(1, 7)}
    assert chosen == set(peers)
    assert rank_prefills(["p", "q"], {"p": 1, "q": 1}) == ["p", "q"]


def test_peer_health_probes_watched_peers_once_per_interval() -> None:
    h = PeerHealth(failures_to_dead=2, interval_s=0.5)
    assert h.take_due([], 0.0) == []
    assert h.take_due(["a", "b"], 0.0) == ["a", "b"]
    assert h.take_due(["a", "b"], 0.3) == []
    assert h.take_due(["b"], 0.5) == ["b"]  # "a" has nothing pending and no failures
    assert h.take_due(["a"], 0.6) == ["a"]


def test_peer_health_dead_after_consecutive_failures_and_revived() -> None:
    h = PeerHealth(failures_to_dead=2, interval_s=0.5)
    assert h.record("a", False) is None
    assert h.record("a", True) is None  # a success resets the count
    assert h.record("a", False) is None and not h.is_dead("a")
    assert h.take_due([], 1.0) == ["a"]  # a suspect is probed with nothing pending
    assert h.record("a", False) == "dead"
    assert h.record("a", False) is None  # "dead" is reported once
    assert h.dead() == ["a"] and h.alive(["a", "b"]) == ["b"]
    assert h.take_due([], 2.0) == ["a"]  # dead peers are probed until they answer
    assert h.record("a", True) == "alive"
    assert h.alive(["a", "b"]) == ["a", "b"] and h.take_due([], 3.0) == []


def test_peer_health_forgets_removed_peers() -> None:
    h = PeerHealth(failures_to_dead=1, interval_s=0.5)
    assert h.record("a", False) == "dead" and h.record("b", False) == "dead"
    h.forget(["b"])
    assert h.dead() == ["b"]
    with pytest.raises(ValueError):
        PeerHealth(failures_to_dead=0, interval_s=0.5)


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
