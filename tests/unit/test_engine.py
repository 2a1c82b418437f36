"""LLMEngine over FakeModelRunner: stop rules, limits, abort, and the identity checks (prefix
cache, preemption, chunked prefill and batching never change greedy output)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.outputs import FinishReason, RequestOutput
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer
from tests.checkpoints import DEMO_MODEL
from tests.fakes import FakeModelRunner, greedy_reference

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
TOKENIZER = Tokenizer(DEMO_MODEL)


def make_engine(block_size: int = 4, num_blocks: int = 64, seqs: int = 8, budget: int = 64,
                max_model_len: int | None = None, prefix: bool = True,
                eos_token_ids: tuple[int, ...] = (0,),
                max_position_embeddings: int = 2048) -> LLMEngine:
    runner = FakeModelRunner(block_size=block_size, num_blocks=num_blocks,
                             eos_token_ids=eos_token_ids,
                             max_position_embeddings=max_position_embeddings)
    return LLMEngine(runner, TOKENIZER, CacheConfig(block_size, num_blocks, prefix),
                     SchedulerConfig(seqs, budget, max_model_len), seed=0)


def fake(engine: LLMEngine) -> FakeModelRunner:
    runner = engine._runner
    assert isinstance(runner, FakeModelRunner)
    return runner


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + 37 * i) % 1000 + 1 for i in range(n)]


def stream(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    """Steps until idle, collecting every output per request."""
    outs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_batch_equals_single_and_reference() -> None:
    prompts = [prompt(n, s) for n, s in ((5, 1), (17, 2), (9, 3), (1, 4))]
    engine = make_engine()
    batch = engine.generate(prompts, GREEDY)
    for p, out in zip(prompts, batch):
        assert out.new_token_ids == greedy_reference(p, 12)
        assert (out.finish_reason, out.completion_tokens) == (FinishReason.LENGTH, 12)
        assert out.text == TOKENIZER.decode(out.new_token_ids)
        single = make_engine().generate([p], GREEDY)[0]
        assert single.new_token_ids == out.new_token_ids
    engine.leak_check()


def test_streamed_deltas_add_up() -> None:
    engine = make_engine()
    engine.add_request("a", prompt(6), SamplingParams(max_tokens=20, temperature=0.0))
    outs = stream(engine)["a"]
    assert [len(o.new_token_ids) for o in outs] == [1] * 20
    assert "".join(o.text_delta for o in outs) == outs[-1].text
    assert [o.finished for o in outs] == [False] * 19 + [True]
    engine.leak_check()


def first_new(tokens: list[int], at_least: int) -> int:
    """Index of a token at or after `at_least` that does not occur before it."""
    return next(i for i in range(at_least, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids() -> None:
    p = prompt(7)
    cold = greedy_reference(p, 12)
    i = first_new(cold, 3)
    engine = make_engine()
    (out,) = engine.generate([p], SamplingParams(max_tokens=12, temperature=0.0,
                                                 stop_token_ids=(cold[i],)))
    assert out.new_token_ids == cold[:i + 1] and out.finish_reason == FinishReason.STOP
    assert out.text == TOKENIZER.decode(cold[:i])  # the stop token is not shown
    engine.leak_check()


def test_eos_and_ignore_eos() -> None:
    p = prompt(7)
    cold = greedy_reference(p, 12)
    i = first_new(cold, 2)
    engine = make_engine(eos_token_ids=(cold[i],))
    (out,) = engine.generate([p], GREEDY)
    assert out.new_token_ids == cold[:i + 1] and out.finish_reason == FinishReason.STOP
    (out,) = engine.generate([p], SamplingParams(max_tokens=12, temperature=0.0,
                                                 ignore_eos=True))
    assert out.new_token_ids == cold and out.finish_reason == FinishReason.LENGTH
    engine.leak_check()


def straddling_stop(tokens: list[int], text: str) -> str:
    """A 3-character stop string whose first character ends one token's text and whose
    first occurrence is there, so a streamer without hold-back would leak that character."""
    for j in range(3, len(tokens)):
        end = len(TOKENIZER.decode(tokens[:j + 1]))
        stop = text[end - 1:end + 2]
        if len(stop) == 3 and "\ufffd" not in text[:end + 2] and text.find(stop) == end - 1:
            return stop
    raise AssertionError("no straddling stop string in the cold text")


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(include: bool) -> None:
    p = prompt(5)
    engine = make_engine()
    cold = engine.generate([p], SamplingParams(max_tokens=40, temperature=0.0))[0]
    text = cold.text
    stop = straddling_stop(cold.new_token_ids, text)
    expected = text[:text.find(stop)] + (stop if include else "")
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=("zzzzzzz", stop),
                            include_stop_str_in_output=include)
    engine.add_request("s", p, params)
    outs = stream(engine)["s"]
    assert outs[-1].text == expected and outs[-1].finish_reason == FinishReason.STOP
    # Nothing of the stop string leaks out early in a delta.
    assert "".join(o.text_delta for o in outs) == expected
    assert outs[-1].completion_tokens < 40
    engine.leak_check()


def test_unmatched_stop_string_releases_held_text() -> None:
    engine = make_engine()
    plain = engine.generate([prompt(5)], SamplingParams(max_tokens=15, temperature=0.0))[0]
    engine.add_request("s", prompt(5), SamplingParams(max_tokens=15, temperature=0.0,
                                                      stop=("\x00never\x00",)))
    outs = stream(engine)["s"]
    assert "".join(o.text_delta for o in outs) == plain.text == outs[-1].text
    engine.leak_check()


def test_context_limit() -> None:
    engine = make_engine(max_model_len=20)
    assert engine.max_model_len == 20
    (out,) = engine.generate([prompt(12)], SamplingParams(max_tokens=50, temperature=0.0))
    assert out.completion_tokens == 8 and out.finish_reason == FinishReason.LENGTH
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", prompt(20), GREEDY)
    assert make_engine(max_model_len=99999, max_position_embeddings=64).max_model_len == 64
    engine.leak_check()


@pytest.mark.parametrize("bad, match", [
    ([], "empty"), ([1, 1024], r"\[0, 1024\)"), ([-1], "integers"), ([1, "x"], "integers"),
])
def test_invalid_prompts(bad: list, match: str) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match=match):
        engine.add_request("r", bad, GREEDY)
    assert not engine.has_unfinished()
    engine.leak_check()


def test_duplicate_id_and_cache_too_small() -> None:
    engine = make_engine(num_blocks=4)
    engine.add_request("r", prompt(3), GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r", prompt(3), GREEDY)
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request("big", prompt(10), SamplingParams(max_tokens=10))
    engine.abort("r")
    stream(engine)
    with pytest.raises(ValueError, match="KV cache"):  # nothing of the batch stays queued
        engine.generate([prompt(3), prompt(30)], GREEDY)
    assert not engine.has_unfinished()
    engine.leak_check()


def test_abort_frees_blocks_and_reports_once() -> None:
    engine = make_engine(seqs=2)
    for rid in ("a", "b", "c"):  # c waits: max_num_seqs is 2
        engine.add_request(rid, prompt(9), SamplingParams(max_tokens=30, temperature=0.0))
    engine.step()
    engine.step()
    free_before = engine.stats().num_free_blocks
    engine.abort("a")
    engine.abort("c")
    engine.abort("nope")
    assert engine.stats().num_free_blocks > free_before
    engine.leak_check()
    outs = engine.step()
    aborted = {o.request_id: o for o in outs if o.finish_reason == FinishReason.ABORT}
    assert set(aborted) == {"a", "c"} and all(o.finished for o in aborted.values())
    assert aborted["a"].completion_tokens == 2 and aborted["c"].completion_tokens == 0
    rest = stream(engine)
    assert set(rest) == {"b"} and rest["b"][-1].finish_reason == FinishReason.LENGTH
    engine.leak_check()


def test_prefix_cache_hit_equals_cold_run() -> None:
    base = prompt(40)
    engine = make_engine()
    first = engine.generate([base], GREEDY)[0]
    computed = fake(engine).prefill_tokens
    again, branch = engine.generate([base, base[:33] + [5, 6, 7]], GREEDY)
    assert (first.cached_tokens, again.cached_tokens, branch.cached_tokens) == (0, 36, 32)
    assert fake(engine).prefill_tokens - computed == 4 + 4
    cold = make_engine(prefix=False)
    assert again.new_token_ids == first.new_token_ids == greedy_reference(base, 12)
    assert branch.new_token_ids == cold.generate([base[:33] + [5, 6, 7]], GREEDY)[0].new_token_ids
    assert engine.stats().prefix_hit_rate > 0
    engine.leak_check()
    cold.leak_check()


@pytest.mark.parametrize("prefix, budget", [(True, 64), (False, 64), (True, 4), (False, 4)])
def test_preemption_equals_no_preemption(prefix: bool, budget: int) -> None:
    prompts = [prompt(10, s) for s in range(4)]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    # Each request needs up to 8 blocks; a budget of 4 also chunks the recompute.
    tiny = make_engine(num_blocks=12, prefix=prefix, seqs=4, budget=budget)
    outs = tiny.generate(prompts, params)
    assert tiny.stats().num_preemptions > 0
    for p, out in zip(prompts, outs):
        assert out.new_token_ids == greedy_reference(p, 20)
    tiny.leak_check()


def test_chunked_prefill_equals_unchunked() -> None:
    prompts = [prompt(30, s) for s in range(3)]
    chunked = make_engine(budget=8, seqs=4)
    outs = chunked.generate(prompts, GREEDY)
    starts = [c.start_pos for b in fake(chunked).batches if hasattr(b, "seqs") for c in b.seqs]
    assert max(starts) > 0
    whole = make_engine(budget=512).generate(prompts, GREEDY)
    assert [o.new_token_ids for o in outs] == [o.new_token_ids for o in whole]
    chunked.leak_check()


def test_seeded_sampling_independent_of_batch_and_preemption() -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=123)
    alone = make_engine().generate([prompt(10)], params)[0].new_token_ids
    others = SamplingParams(max_tokens=20, temperature=1.0)
    tiny = make_engine(num_blocks=12)
    outs = tiny.generate([prompt(10, s) for s in range(1, 4)] + [prompt(10)],
                         [others] * 3 + [params])
    assert outs[-1].new_token_ids == alone
    assert tiny.stats().num_preemptions > 0
    tiny.leak_check()


def test_generate_needs_idle_engine() -> None:
    engine = make_engine()
    engine.add_request("x", prompt(3), GREEDY)
    with pytest.raises(RuntimeError, match="idle"):
        engine.generate([prompt(3)], GREEDY)
    engine.abort("x")
    engine.step()
    engine.leak_check()


@settings(max_examples=25, deadline=None)
@given(block_size=st.sampled_from([1, 2, 4, 8]), num_blocks=st.integers(8, 40),
       budget=st.integers(4, 40), seqs=st.integers(1, 4), prefix=st.booleans(),
       shapes=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 20), st.integers(1, 10)),
                       min_size=1, max_size=5))
def test_random_configs_match_reference(block_size: int, num_blocks: int, budget: int,
                                        seqs: int, prefix: bool,
                                        shapes: list[tuple[int, int, int]]) -> None:
    engine = make_engine(block_size, num_blocks, min(seqs, budget), budget, prefix=prefix)
    fits = [(prompt(n, s), m) for s, n, m in shapes
            if -(-(n + m - 1) // block_size) <= num_blocks]
    for i, (p, m) in enumerate(fits):
        engine.add_request(str(i), p, SamplingParams(max_tokens=m, temperature=0.0))
    outs = stream(engine)
    for i, (p, m) in enumerate(fits):
        tokens = [t for o in outs[str(i)] for t in o.new_token_ids]
        assert tokens == greedy_reference(p, m)
    engine.leak_check()
