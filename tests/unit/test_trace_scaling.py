"""Scaling traces to a model's context and prompt synthesis (pd_serve.bench.scaling): every policy
fits the context and keeps order, the report says what changed, Mooncake block scaling keeps
prefix sharing, and synthesised prompts share tokens exactly where hash ids (or the scenario's
system prompt) are shared."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.bench.scaling import (
    auto_block_tokens,
    request_prompt,
    scale_trace,
    synth_prompt,
)
from pd_serve.bench.trace_formats import load_trace
from pd_serve.bench.traces import LengthStats, Trace, TraceRequest, prompt_tokens

TRACES = Path(__file__).parents[3] / "shared" / "traces"
MOONCAKE = TRACES / "mooncake" / "conversation_trace.jsonl"
VOCAB = 1024


def _trace(lengths: list[tuple[int, int]], block: int | None = None) -> Trace:
    reqs = tuple(TraceRequest(float(i), n_in, n_out,
                              tuple(range(100 * i, 100 * i + -(-n_in // block))) if block else (),
                              f"s{i % 3}", f"t.csv:{i + 2}")
                 for i, (n_in, n_out) in enumerate(lengths))
    return Trace("t", reqs, timed=True, block_size=block)


def test_quantile_policy_fits_p99_and_reports() -> None:
    t = _trace([(1000, 100)] * 98 + [(3000, 1000), (20000, 4000)])
    scaled, rep = scale_trace(t, 2048)
    assert rep.policy == "quantile" and rep.block_tokens == 0 and rep.max_model_len == 2048
    p99 = 4000 + 0.01 * (24000 - 4000)  # numpy linear between the two largest totals
    assert rep.factor == pytest.approx(2048 / p99)
    assert scaled.requests[0].input_len == 488  # ceil(1000 x 2048 / 4200)
    assert (rep.capped, rep.capped_input, rep.capped_output) == (1, 1, 0)
    assert rep.input_before == LengthStats.of([r.input_len for r in t.requests])
    assert rep.output_after == LengthStats.of([r.output_len for r in scaled.requests])
    assert rep.input_before is not None and rep.input_before.p50 == 1000
    assert scaled.requests[-1].input_len + scaled.requests[-1].output_len == 2048
    assert "scaled (quantile)" in scaled.notes[-1]


def test_short_trace_is_not_scaled_up_but_factor_may() -> None:
    t = _trace([(10, 0), (20, 5)])
    same, rep = scale_trace(t, 2048)
    assert rep.factor == 1.0 and [(r.input_len, r.output_len) for r in same.requests] == [
        (10, 1), (20, 5)]  # a 0-token output becomes 1 (max_tokens must be positive)
    up, rep = scale_trace(t, 2048, factor=2.5)
    assert rep.policy == "factor" and [(r.input_len, r.output_len) for r in up.requests] == [
        (25, 1), (50, 13)]


def test_output_cap_and_output_over_context() -> None:
    t = _trace([(100, 5000), (4000, 10)])
    scaled, rep = scale_trace(t, 1000, policy="cap", max_output=200)
    assert [(r.input_len, r.output_len) for r in scaled.requests] == [(100, 200), (990, 10)]
    assert (rep.capped_input, rep.capped_output, rep.capped) == (1, 1, 2)
    scaled, rep = scale_trace(t, 1000, policy="cap")
    assert (scaled.requests[0].input_len, scaled.requests[0].output_len) == (1, 999)


@pytest.mark.parametrize("kwargs, why", [
    ({"policy": "zoom"}, "unknown scaling policy 'zoom'; policies: auto, blocks"),
    ({"policy": "factor"}, "needs a finite factor"),
    ({"policy": "quantile", "factor": 0.5}, "takes neither factor"),
    ({"policy": "blocks"}, "needs a trace with hash-id blocks"),
    ({"max_output": 0}, "max_output"),
    ({"quantile": 0}, "quantile"),
])
def test_bad_scaling_arguments(kwargs: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        scale_trace(_trace([(10, 10)]), 100, **kwargs)  # type: ignore[arg-type]


def test_block_policy_keeps_prefix_sharing() -> None:
    a = TraceRequest(0.0, 1100, 300, (0, 1, 2))
    b = TraceRequest(1.0, 1024, 40, (0, 1))
    c = TraceRequest(2.0, 90000, 500, tuple(range(100, 276)))
    t = Trace("m", (a, b, c), timed=True, block_size=512)
    with pytest.raises(ValueError, match="use policy='blocks'"):
        scale_trace(t, 2048, policy="quantile")
    assert auto_block_tokens(t, 2048) == 8  # p99 of the totals 88,718: x 8/512 = 1,386 fits
    scaled, rep = scale_trace(t, 2048, block_tokens=32)
    assert (rep.policy, rep.block_tokens, rep.factor, scaled.block_size) == ("blocks", 32,
                                                                            1 / 16, 32)
    assert [(r.input_len, r.output_len) for r in scaled.requests[:2]] == [(69, 19), (64, 3)]
    assert scaled.requests[2].input_len + scaled.requests[2].output_len == 2048
    pa, pb = request_prompt(scaled, 0, VOCAB), request_prompt(scaled, 1, VOCAB)
    assert pa[:64] == pb and pa == prompt_tokens(scaled.requests[0], 32, VOCAB)


def test_auto_block_tokens_on_the_real_trace() -> None:
    if not MOONCAKE.is_file():
        pytest.skip(f"no shared traces at {TRACES}")
    t = load_trace(MOONCAKE, limit=3000)
    scaled, rep = scale_trace(t, 2048)
    assert rep.block_tokens == auto_block_tokens(t, 2048) == scaled.block_size
    assert rep.capped <= 0.01 * len(t) + 1  # p99 fits, so at most ~1 % are cut
    assert all(r.input_len + r.output_len <= 2048 for r in scaled.requests)
    assert all(len(r.hash_ids) == -(-r.input_len // rep.block_tokens) for r in scaled.requests)


lengths = st.lists(st.tuples(st.integers(1, 200_000), st.integers(0, 20_000)),
                   min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(lengths, st.integers(2, 40_000), st.sampled_from(["auto", "quantile", "factor", "cap"]),
       st.floats(0.001, 4.0), st.one_of(st.none(), st.integers(1, 500)))
def test_scaling_fits_the_context_and_keeps_order(pairs: list[tuple[int, int]], ctx: int,
                                                  policy: str, factor: float,
                                                  max_output: int | None) -> None:
    t = _trace(pairs)
    if max_output is not None and max_output >= ctx:
        max_output = None
    scaled, rep = scale_trace(t, ctx, policy=policy, max_output=max_output,
                              factor=factor if policy == "factor" else None)
    assert len(scaled) == len(t) and rep.capped <= len(t)
    for before, after in zip(t.requests, scaled.requests):
        assert (after.arrival_s, after.source, after.scenario) == (
            before.arrival_s, before.source, before.scenario)
        assert after.input_len >= 1 and after.output_len >= 1
        assert after.input_len + after.output_len <= ctx
        if max_output is not None:
            assert after.output_len <= max_output


@settings(max_examples=60, deadline=None)
@given(lengths, st.integers(2, 40_000), st.sampled_from([None, 1, 4, 32, 512]))
def test_block_scaling_fits_and_keeps_one_block_per_hash_id(
        pairs: list[tuple[int, int]], ctx: int, block_tokens: int | None) -> None:
    t = _trace(pairs, block=512)
    scaled, rep = scale_trace(t, ctx, block_tokens=block_tokens)
    bt = rep.block_tokens
    assert scaled.block_size == bt and 512 % bt == 0
    for before, after in zip(t.requests, scaled.requests):
        assert after.input_len + after.output_len <= ctx and after.arrival_s == before.arrival_s
        assert after.hash_ids == before.hash_ids[:len(after.hash_ids)]
        assert len(after.hash_ids) == -(-after.input_len // bt)


ids = st.lists(st.integers(0, 50), max_size=6)


@settings(max_examples=80, deadline=None)
@given(ids, ids, ids, st.sampled_from([4, 8, 16]), st.data())
def test_equal_hash_prefixes_give_equal_tokens_exactly(common: list[int], tail_a: list[int],
                                                       tail_b: list[int], bt: int,
                                                       data: st.DataObject) -> None:
    if tail_a and tail_b and tail_a[0] == tail_b[0]:
        tail_b = [tail_a[0] + 1000, *tail_b[1:]]  # ids diverge right after the common prefix
    ha, hb = (*common, *tail_a), (*common, *tail_b)
    la = data.draw(st.integers(max(1, (len(ha) - 1) * bt + 1), max(1, len(ha) * bt)))
    lb = data.draw(st.integers(max(1, (len(hb) - 1) * bt + 1), max(1, len(hb) * bt)))
    if not ha or not hb:
        return
    pa = prompt_tokens(TraceRequest(0.0, la, 1, ha), bt, VOCAB)
    pb = prompt_tokens(TraceRequest(0.0, lb, 1, hb), bt, VOCAB)
    shared = min(len(common) * bt, la, lb)
    assert pa[:shared] == pb[:shared]
    end = min(la, lb, (len(common) + 1) * bt)
    if tail_a and tail_b and end - len(common) * bt >= 3:  # 3+ random tokens: never all equal
        assert pa[len(common) * bt:end] != pb[len(common) * bt:end]


def test_synth_prompt_shares_only_the_scenario_system_prompt() -> None:
    a, b = TraceRequest(0.0, 50, 1, scenario="x"), TraceRequest(0.0, 60, 1, scenario="x")
    c = TraceRequest(0.0, 50, 1, scenario="y")
    pa, pb, pc = (synth_prompt(r, i, VOCAB, system_prompt_len=20) for i, r in enumerate((a, b, c)))
    assert (len(pa), len(pb), len(pc)) == (50, 60, 50)
    assert pa[:20] == pb[:20] and pa[20:30] != pb[20:30] and pa[:20] != pc[:20]
    assert synth_prompt(a, 0, VOCAB, 20) == pa and synth_prompt(a, 0, VOCAB, 20, salt=1) != pa
    assert synth_prompt(a, 0, VOCAB) != synth_prompt(a, 1, VOCAB)  # seeded by index
    assert all(3 <= tok < VOCAB for tok in pa + pc)
    assert len(synth_prompt(TraceRequest(0.0, 5, 1), 0, VOCAB, 20)) == 5
    t = Trace("u", (a, b), timed=False)
    assert request_prompt(t, 1, VOCAB, 20) == pb
    with pytest.raises(ValueError, match="vocab_size"):
        synth_prompt(a, 0, 3)
