"""The gateway's pure forwarding policies, table-driven: ranking, retry order, batch-forwarding
stickiness, deadline termination, round-robin cycling, fifo choice."""

from __future__ import annotations

import pytest

from pd_serve.config import TTFTBand
from pd_serve.gateway import policy as pol
from pd_serve.gateway.policy import Attempt, Offer, RouterState, Terminate, Wait

INST = ("a", "b", "c")


def state(**open_streams: int) -> RouterState:
    return RouterState(INST, dict(open_streams))


@pytest.mark.parametrize(("streams", "expected"), [
    ({}, ["a", "b", "c"]),
    ({"a": 2, "b": 1}, ["c", "b", "a"]),
    ({"a": 1, "b": 1, "c": 1}, ["a", "b", "c"]),
    ({"a": 0, "b": 3, "c": 1}, ["a", "c", "b"]),
])
def test_rank_fewest_open_streams_first_ties_in_order(streams: dict[str, int],
                                                       expected: list[str]) -> None:
    assert pol.rank(INST, streams) == expected


def run_offers(policy: str, st: RouterState, answers: dict[str, bool], now: float = 0.0,
               deadline_s: float = 10.0) -> tuple[list[str], pol.Decision]:
    """Offers until an acceptance or a non-offer decision; returns the instances offered."""
    att = Attempt.start(now, deadline_s)
    offered: list[str] = []
    while True:
        d = pol.decide(policy, st, att, now, 0.1)
        if not isinstance(d, Offer):
            return offered, d
        pol.note_offer(policy, st, att, d.instance)
        offered.append(d.instance)
        if answers.get(d.instance, True):
            pol.note_accept(st, att, d.instance)
            return offered, d
        pol.note_reject(st, att, d.instance, "all slots busy")


@pytest.mark.parametrize(("streams", "answers", "offered", "final"), [
    ({}, {}, ["a"], Offer),
    ({"a": 1}, {"b": False}, ["b", "c"], Offer),
    ({"c": 5}, {"a": False, "b": False}, ["a", "b", "c"], Offer),
    ({}, {"a": False, "b": False, "c": False}, ["a", "b", "c"], Wait),
])
def test_forwarding_retry_order(streams: dict[str, int], answers: dict[str, bool],
                                offered: list[str], final: type) -> None:
    got, decision = run_offers(pol.FORWARDING, state(**streams), answers)
    assert got == offered and isinstance(decision, final)


def test_forwarding_offers_carry_no_queue_flag() -> None:
    d = pol.decide(pol.FORWARDING, state(), Attempt.start(0.0, 5.0), 1.0, 0.1)
    assert d == Offer("a", queue=False, deadline_s=4.0)


def test_batch_forwarding_sticks_to_last_acceptor_until_it_rejects() -> None:
    st = state()
    assert run_offers(pol.FORWARDING, st, {})[0] == ["a"]
    # `a` now has the most open streams but keeps getting requests (batch forwarding)
    assert run_offers(pol.FORWARDING, st, {})[0] == ["a"]
    assert st.open_streams["a"] == 2 and st.target == "a"
    # `a` rejects: the target is dropped and the next-ranked instance takes over
    assert run_offers(pol.FORWARDING, st, {"a": False})[0] == ["a", "b"]
    assert st.target == "b"
    assert run_offers(pol.FORWARDING, st, {})[0] == ["b"]


def test_wait_then_new_round_offers_everyone_again() -> None:
    st, att = state(), Attempt.start(0.0, 1.0)
    for inst in INST:
        pol.note_offer(pol.FORWARDING, st, att, inst)
        pol.note_reject(st, att, inst, "all slots busy")
    assert pol.decide(pol.FORWARDING, st, att, 0.2, 0.1) == Wait(0.1)
    pol.note_wait(att)
    d = pol.decide(pol.FORWARDING, st, att, 0.3, 0.1)
    assert isinstance(d, Offer) and d.instance == "a"


@pytest.mark.parametrize(("now", "retry", "kind"), [
    (1.0, 0.1, Terminate),   # the deadline has passed: checked before every offer
    (2.5, 0.1, Terminate),
    (0.95, 0.1, Terminate),  # a wait would end past the deadline
    (0.5, 0.1, Wait),
])
def test_deadline_termination(now: float, retry: float, kind: type) -> None:
    st, att = state(), Attempt.start(0.0, 1.0)
    for inst in INST:
        pol.note_offer(pol.FORWARDING, st, att, inst)
        pol.note_reject(st, att, inst, "all slots busy")
    d = pol.decide(pol.FORWARDING, st, att, now, retry)
    assert isinstance(d, kind)
    if isinstance(d, Terminate):
        assert "3 rejection(s)" in d.reason and "a: all slots busy" in d.reason


def test_deadline_checked_before_the_first_offer() -> None:
    d = pol.decide(pol.FORWARDING, state(), Attempt.start(0.0, 0.5), 0.6, 0.1)
    assert isinstance(d, Terminate) and "no instance was offered it" in d.reason


def _arrive(st: RouterState, arrival: float, deadline_s: float = 10.0) -> Attempt:
    att = Attempt.start(arrival, deadline_s)
    pol.join(st, att)
    return att


def _reject_round(st: RouterState, att: Attempt, now: float) -> pol.Decision:
    """Offers until the policy stops offering; every offer is rejected."""
    d = pol.decide(pol.FORWARDING, st, att, now, 0.02)
    while isinstance(d, Offer):
        pol.note_offer(pol.FORWARDING, st, att, d.instance)
        pol.note_reject(st, att, d.instance, "all slots busy")
        d = pol.decide(pol.FORWARDING, st, att, now, 0.02)
    return d


def test_waiting_line_keeps_arrival_order() -> None:
    st = state()
    old, new = _arrive(st, 0.0), _arrive(st, 0.1)
    assert isinstance(_reject_round(st, old, 0.0), Wait) and st.waiting == [old.id]
    # A newer request does not offer (and cannot overtake) while an older one waits.
    assert isinstance(pol.decide(pol.FORWARDING, st, new, 0.1, 0.02), Wait)
    assert st.waiting == [old.id, new.id]
    pol.note_wait(old)
    first = pol.decide(pol.FORWARDING, st, old, 0.2, 0.02)  # the head retries
    assert isinstance(first, Offer)
    pol.note_offer(pol.FORWARDING, st, old, first.instance)
    pol.note_accept(st, old, first.instance)
    pol.note_done(st, old)
    assert st.waiting == [new.id]
    assert isinstance(pol.decide(pol.FORWARDING, st, new, 0.2, 0.02), Offer)


def test_request_waiting_in_line_ends_at_its_deadline() -> None:
    st = state()
    old, new = _arrive(st, 0.0), _arrive(st, 0.0, deadline_s=0.5)
    _reject_round(st, old, 0.0)
    pol.decide(pol.FORWARDING, st, new, 0.1, 0.02)
    d = pol.decide(pol.FORWARDING, st, new, 0.6, 0.02)
    assert isinstance(d, Terminate) and "waiting at the gateway" in d.reason
    pol.note_done(st, new)
    assert st.waiting == [old.id]


def test_baselines_have_no_gateway_line() -> None:
    st = state()
    old, new = _arrive(st, 0.0), _arrive(st, 0.0)
    st.waiting.append(old.id)  # even with a line recorded, fifo offers at once
    assert isinstance(pol.decide(pol.FIFO, st, new, 0.0, 0.02), Offer)


def test_round_robin_cycles_regardless_of_load() -> None:
    st = state(a=5)
    picks = [run_offers(pol.ROUND_ROBIN, st, {})[0][0] for _ in range(5)]
    assert picks == ["a", "b", "c", "a", "b"]


def test_round_robin_offers_queue_with_remaining_budget() -> None:
    d = pol.decide(pol.ROUND_ROBIN, state(), Attempt.start(0.0, 2.0), 0.5, 0.1)
    assert d == Offer("a", queue=True, deadline_s=1.5)


@pytest.mark.parametrize(("streams", "pick"), [
    ({}, "a"), ({"a": 1}, "b"), ({"a": 1, "b": 1}, "c"), ({"a": 2, "b": 1, "c": 2}, "b")])
def test_fifo_picks_fewest_open_streams_and_queues(streams: dict[str, int], pick: str) -> None:
    st = state(**streams)
    d = pol.decide(pol.FIFO, st, Attempt.start(0.0, 3.0), 1.0, 0.1)
    assert d == Offer(pick, queue=True, deadline_s=2.0)


def test_fifo_is_not_sticky() -> None:
    st = state()
    run_offers(pol.FIFO, st, {})
    assert run_offers(pol.FIFO, st, {})[0] == ["b"]


def test_close_lowers_open_streams_never_below_zero() -> None:
    st = state(a=1)
    pol.note_close(st, "a")
    pol.note_close(st, "a")
    assert st.open_streams["a"] == 0


@pytest.mark.parametrize(("n", "deadline"), [(1, 0.5), (100, 0.5), (101, 2.0), (5000, 8.0)])
def test_ttft_deadline_per_prompt_length_band(n: int, deadline: float) -> None:
    bands = (TTFTBand(100, 0.5), TTFTBand(1000, 2.0), TTFTBand(None, 8.0))
    assert pol.ttft_deadline(bands, n) == deadline


def test_prompt_longer_than_every_band_gets_the_last_deadline() -> None:
    assert pol.ttft_deadline((TTFTBand(10, 1.0), TTFTBand(20, 3.0)), 50) == 3.0


def test_first_token_after_deadline_is_slo_failure() -> None:
    att = Attempt.start(10.0, 1.0)
    assert pol.first_token_in_slo(att, 10.9) and not pol.first_token_in_slo(att, 11.2)


def test_empty_scenario_waits_then_terminates_with_reason() -> None:
    st = RouterState(())
    att = Attempt.start(0.0, 1.0)
    pol.join(st, att)
    for policy in (pol.FORWARDING, pol.FIFO, pol.ROUND_ROBIN):
        assert isinstance(pol.decide(policy, st, att, 0.5, 0.02), pol.Wait)
    end = pol.decide(pol.FORWARDING, st, att, 1.0, 0.02)
    assert isinstance(end, pol.Terminate) and "no prefill instance serving" in end.reason


def test_set_instances_keeps_line_and_open_streams() -> None:
    st = RouterState(("a", "b"))
    first, second = Attempt.start(0.0, 5.0), Attempt.start(0.0, 5.0)
    pol.join(st, first)
    pol.join(st, second)
    pol.note_accept(st, first, "b")
    st.waiting.append(second.id)
    pol.set_instances(st, ["c", "a"])
    assert st.instances == ("c", "a") and st.target is None
    assert st.open_streams["b"] == 1 and st.open_streams["c"] == 0
    assert st.waiting == [second.id]
    pol.note_close(st, "b")  # a stream on a removed instance still closes cleanly
    assert st.open_streams["b"] == 0
    offer = pol.decide(pol.FORWARDING, st, second, 0.1, 0.02)
    assert isinstance(offer, pol.Offer) and offer.instance == "c"
