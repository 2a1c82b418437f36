"""Engine hand-off roles over FakeModelRunner: prefill-only parking and release, decode
reservations and adoption; a prefill engine plus a decode engine equal the aggregated engine."""

from __future__ import annotations

import pytest

from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.outputs import FinishReason, RequestOutput
from pd_serve.engine.sampling_params import SamplingParams
from tests.fakes import FakeModelRunner, greedy_reference
from tests.unit.test_engine import TOKENIZER, fake, make_engine, prompt, stream

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def prefill_first(engine: LLMEngine, rid: str, p: list[int],
                  params: SamplingParams) -> RequestOutput:
    engine.add_request(rid, p, params, prefill_only=True)
    outs = [o for o in engine.step() if o.request_id == rid]
    assert len(outs) == 1
    return outs[0]


def hand_off(prefill: LLMEngine, decode: LLMEngine, rid: str, p: list[int],
             first: RequestOutput, params: SamplingParams) -> None:
    """Moves a parked request's K/V from `prefill` to `decode` (the fakes' token-id KV)."""
    table, n = prefill.handoff_blocks(rid)
    assert n == len(p)
    kv = fake(prefill).read_kv(table, n)
    reservation = decode.reserve_handoff(rid, n)
    assert reservation is not None
    fake(decode).write_kv(reservation, kv)
    decode.add_prefilled(rid, p, first.new_token_ids[0], params, reservation)
    prefill.release_handoff(rid)


def test_prefill_only_parks_and_release_frees() -> None:
    engine = make_engine()
    free = engine.stats().num_free_blocks
    p = prompt(10)
    out = prefill_first(engine, "r", p, GREEDY)
    assert out.handoff_ready and not out.finished and out.finish_reason is None
    assert out.new_token_ids == greedy_reference(p, 1) and out.completion_tokens == 1
    assert not engine.has_unfinished() and engine.stats().num_handoff == 1
    table, n = engine.handoff_blocks("r")
    assert n == 10 and len(table) == 3  # block_size 4
    assert fake(engine).read_kv(table, n)[0, 0, :, 0, 0].tolist() == p
    assert engine.step() == []  # parked: never scheduled again
    engine.leak_check()
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r", p, GREEDY)
    engine.release_handoff("r")
    engine.release_handoff("r")  # idempotent
    assert engine.step() == [] and engine.stats().num_free_blocks == free
    with pytest.raises(KeyError):
        engine.handoff_blocks("r")
    engine.leak_check()


def test_prefill_only_that_needs_no_decode_finishes() -> None:
    engine = make_engine()
    out = prefill_first(engine, "one", prompt(6), SamplingParams(max_tokens=1, temperature=0))
    assert out.finished and out.finish_reason == FinishReason.LENGTH and not out.handoff_ready
    first = greedy_reference(prompt(7), 1)[0]
    out = prefill_first(engine, "stop", prompt(7), SamplingParams(
        max_tokens=5, temperature=0, stop_token_ids=(first,)))
    assert out.finished and out.finish_reason == FinishReason.STOP
    assert engine.stats().num_handoff == 0
    engine.leak_check()


def test_abort_parked_reports_once_and_frees() -> None:
    engine = make_engine()
    prefill_first(engine, "r", prompt(9), GREEDY)
    engine.abort("r")
    engine.leak_check()
    outs = engine.step()
    assert [(o.request_id, o.finish_reason, o.finished) for o in outs] == [
        ("r", FinishReason.ABORT, True)]
    assert engine.step() == []
    engine.leak_check()


def test_reservation_limits_and_cancel() -> None:
    engine = make_engine(num_blocks=8, seqs=2)
    t1 = engine.reserve_handoff("a", 10)
    assert t1 is not None and len(t1) == 3 and engine.stats().num_reserved == 1
    assert engine.reserve_handoff("big", 25) is None  # 7 blocks, 5 free
    t2 = engine.reserve_handoff("b", 4)
    assert t2 is not None and not set(t1) & set(t2)
    assert engine.reserve_handoff("c", 1) is None  # batch full (max_num_seqs 2)
    with pytest.raises(ValueError, match="already in use"):
        engine.reserve_handoff("a", 3)
    with pytest.raises(ValueError, match="num_tokens"):
        engine.reserve_handoff("z", 0)
    engine.leak_check()
    engine.cancel_reservation("a")
    engine.cancel_reservation("a")
    engine.abort("b")  # abort frees a reservation silently
    assert engine.step() == []
    assert not engine.has_unfinished() and engine.stats().num_free_blocks == 8
    engine.leak_check()


def test_add_prefilled_rejects_mismatch_and_keeps_reservation() -> None:
    engine = make_engine()
    table = engine.reserve_handoff("r", 6)
    assert table is not None
    with pytest.raises(ValueError, match="tokens"):
        engine.add_prefilled("r", prompt(5), 7, GREEDY, table)
    with pytest.raises(ValueError, match="block table"):
        engine.add_prefilled("r", prompt(6), 7, GREEDY, table[::-1] + [99])
    with pytest.raises(ValueError, match="first_token_id"):
        engine.add_prefilled("r", prompt(6), 5000, GREEDY, table)
    with pytest.raises(ValueError, match="nothing left"):
        engine.add_prefilled("r", prompt(6), 7, SamplingParams(max_tokens=1), table)
    with pytest.raises(ValueError, match="no hand-off reservation"):
        engine.add_prefilled("x", prompt(6), 7, GREEDY, table)
    assert engine.stats().num_reserved == 1
    engine.leak_check()
    engine.cancel_reservation("r")
    engine.leak_check()


def run_disaggregated(prompts: list[list[int]], params: SamplingParams,
                      decode: LLMEngine | None = None
                      ) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Prefill engine + decode engine; returns each request's tokens and text (prefill's
    first token and text delta followed by decode's)."""
    prefill = make_engine()
    decode = decode or make_engine()
    firsts: dict[str, RequestOutput] = {}
    for i, p in enumerate(prompts):
        prefill.add_request(f"r{i}", p, params, prefill_only=True)
    while prefill.has_unfinished():
        for out in prefill.step():
            firsts[out.request_id] = out
    tokens = {rid: list(o.new_token_ids) for rid, o in firsts.items()}
    texts = {rid: o.text_delta for rid, o in firsts.items()}
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        if firsts[rid].handoff_ready:
            hand_off(prefill, decode, rid, p, firsts[rid], params)
    prefill.leak_check()
    for rid, outs in stream(decode).items():
        tokens[rid] += [t for o in outs for t in o.new_token_ids]
        texts[rid] += "".join(o.text_delta for o in outs)
        assert outs[-1].finished and outs[-1].completion_tokens == len(tokens[rid])
        assert texts[rid] == outs[-1].text
    decode.leak_check()
    return tokens, texts


def test_disaggregated_equals_aggregated_greedy() -> None:
    prompts = [prompt(n, s) for n, s in ((5, 1), (17, 2), (9, 3), (1, 4), (8, 5))]
    agg = make_engine().generate(prompts, GREEDY)
    got, texts = run_disaggregated(prompts, GREEDY)
    assert [got[f"r{i}"] for i in range(len(prompts))] == [o.new_token_ids for o in agg]
    assert [texts[f"r{i}"] for i in range(len(prompts))] == [o.text for o in agg]
    assert all(len(t) == 12 for t in got.values())


def test_disaggregated_stop_string_and_seeded_sampling() -> None:
    p = prompt(5)
    cold = make_engine().generate([p], SamplingParams(max_tokens=30, temperature=0.0))[0]
    stop = cold.text[len(cold.text) // 2:len(cold.text) // 2 + 3]
    for params in (SamplingParams(max_tokens=30, temperature=0.0, stop=(stop, "qqqq")),
                   SamplingParams(max_tokens=20, temperature=1.0, seed=7, top_k=50)):
        (agg,) = make_engine().generate([p], params)
        tokens, texts = run_disaggregated([p], params)
        assert (tokens["r0"], texts["r0"]) == (agg.new_token_ids, agg.text)
        assert agg.finish_reason == (FinishReason.STOP if params.stop else FinishReason.LENGTH)


def test_decode_registers_received_blocks_for_prefix_reuse() -> None:
    decode = make_engine()
    p = prompt(13)
    run_disaggregated([p], GREEDY, decode)
    assert decode.stats().num_cached_blocks >= 3  # 13 prompt tokens: 3 full blocks of 4
    runner = fake(decode)
    before = runner.prefill_tokens
    (out,) = decode.generate([p + [5]], SamplingParams(max_tokens=3, temperature=0.0))
    assert out.cached_tokens == 12 and runner.prefill_tokens - before == 2
    assert out.new_token_ids == greedy_reference(p + [5], 3)
    decode.leak_check()


def test_handed_off_request_survives_preemption() -> None:
    # A tiny decode cache forces the later handed-off request to be preempted and recomputed.
    decode = LLMEngine(FakeModelRunner(block_size=4, num_blocks=7), TOKENIZER,
                       CacheConfig(4, 7, True), SchedulerConfig(8, 64, None), seed=0)
    prompts = [prompt(9, 1), prompt(9, 2)]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    got, _ = run_disaggregated(prompts, params, decode)
    assert decode.stats().num_preemptions >= 1
    assert [got["r0"], got["r1"]] == [greedy_reference(p, 10) for p in prompts]
