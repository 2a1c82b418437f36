"""Scheduler: prefill-first policy, token budget, chunked prefill, preemption, admission checks."""

from __future__ import annotations

import pytest

from pd_serve.config import SchedulerConfig
from pd_serve.engine.block_manager import BlockManager
from pd_serve.engine.output_text import OutputText
from pd_serve.engine.outputs import FinishReason
from pd_serve.engine.request import Request, RequestStatus
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.engine.scheduler import Scheduler, SchedulerOutput
from pd_serve.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from tests.checkpoints import DEMO_MODEL

    return Tokenizer(DEMO_MODEL)


def make(tokenizer: Tokenizer, num_blocks: int = 32, block_size: int = 4, seqs: int = 4,
         budget: int = 64, prefix: bool = True, max_model_len: int = 1024) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget),
                     bm, max_model_len)


def req(tokenizer: Tokenizer, rid: str, prompt: list[int], max_tokens: int = 8,
        arrival: float = 0.0) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                   arrival_time=arrival, text=OutputText(tokenizer))


def run(sched: Scheduler, token: int = 5) -> SchedulerOutput:
    """One step as the engine does it, with every sampled token = `token`."""
    out = sched.schedule()
    for sp in out.prefills:
        completes = sp.completes
        sched.on_computed(sp.request, sp.num_tokens)
        if completes:
            sp.request.output_token_ids.append(token)
    for r in out.decodes:
        sched.on_computed(r, 1)
        r.output_token_ids.append(token)
    sched.block_manager.check_invariants()
    return out


def finish_all(sched: Scheduler) -> None:
    for r in list(sched.running) + list(sched.waiting):
        sched.finish(r, FinishReason.ABORT)
    sched.block_manager.leak_check()


def test_fifo_admission_respects_max_num_seqs(tokenizer: Tokenizer) -> None:
    sched = make(tokenizer, seqs=2)
    reqs = [req(tokenizer, f"r{i}", [1, 2, 3], arrival=i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    out = run(sched)
    assert [sp.request for sp in out.prefills] == reqs[:2]
    assert reqs[2].status is RequestStatus.WAITING
    out = run(sched)
    assert out.decodes == reqs[:2] and not out.prefills
    sched.finish(reqs[0], FinishReason.STOP)
    out = run(sched)  # a free seat: prefill first
    assert [sp.request for sp in out.prefills] == [reqs[2]] and not out.decodes
    finish_all(sched)


def test_chunked_prefill_over_steps(tokenizer: Tokenizer) -> None:
    sched = make(tokenizer, budget=4, seqs=2)
    r = req(tokenizer, "a", list(range(1, 11)))
    sched.add(r)
    starts = []
    for _ in range(3):
        out = run(sched)
        (sp,) = out.prefills
        starts.append((r.num_computed_tokens - sp.num_tokens, sp.num_tokens))
    assert starts == [(0, 4), (4, 4), (8, 2)]
    assert r.output_token_ids == [5] and not r.is_prefilling
    assert run(sched).decodes == [r]
    finish_all(sched)


def test_budget_is_shared_and_partial_prefill_continues_first(tokenizer: Tokenizer) -> None:
    sched = make(tokenizer, budget=4, seqs=4)
    a, b = req(tokenizer, "a", [1, 2, 3], arrival=0), req(tokenizer, "b", [4, 5, 6], arrival=1)
    sched.add(a)
    sched.add(b)
    out = run(sched)
    assert [(sp.request, sp.num_tokens) for sp in out.prefills] == [(a, 3), (b, 1)]
    out = run(sched)
    assert [(sp.request, sp.num_tokens) for sp in out.prefills] == [(b, 2)]
    assert run(sched).decodes == [a, b]
    finish_all(sched)


def test_prefix_hit_on_admission(tokenizer: Tokenizer) -> None:
    sched = make(tokenizer)
    a = req(tokenizer, "a", list(range(1, 10)))
    sched.add(a)
    run(sched)
    b = req(tokenizer, "b", list(range(1, 9)) + [40])
    sched.add(b)
    (sp,) = run(sched).prefills
    assert sp.request is b and sp.num_tokens == 1 and b.num_cached_tokens == 8
    finish_all(sched)


def test_preemption_takes_latest_arrival_and_recomputes(tokenizer: Tokenizer) -> None:
    sched = make(tokenizer, num_blocks=4, block_size=2, seqs=4)
    a = req(tokenizer, "a", [1, 2, 3], max_tokens=4, arrival=0)
    b = req(tokenizer, "b", [4, 5, 6], max_tokens=4, arrival=1)
    sched.add(a)
    sched.add(b)
    run(sched)  # both prefilled: 2 blocks each, cache full
    assert run(sched).decodes == [a, b]  # position 3 still fits the second block
    out = run(sched)  # a needs a third block: b (latest) is preempted
    assert out.decodes == [a] and out.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and sched.waiting[0] is b
    assert b.block_table == [] and b.num_computed_tokens == 0
    sched.finish(a, FinishReason.STOP)
    (sp,) = run(sched).prefills  # b re-prefills prompt + its generated tokens
    assert sp.request is b and b.prefill_len == 5 and sp.num_tokens == 3
    assert b.num_cached_tokens == 0 and b.num_computed_tokens == 5  # 2 tokens from its cache
    assert sched.num_preemptions == 1
    finish_all(sched)


def test_preempting_itself_when_latest(tokenizer: Tokenizer) -> None:
    sched = make(tokenizer, num_blocks=3, block_size=2, seqs=4)
    a = req(tokenizer, "a", [1, 2, 3], max_tokens=3, arrival=0)
    b = req(tokenizer, "b", [4, 5], max_tokens=3, arrival=1)
    sched.add(a)
    sched.add(b)
    run(sched)  # a: 2 blocks, b: 1 block, cache full
    out = run(sched)  # a's position 3 fits; b's position 2 needs a block: b preempts itself
    assert out.decodes == [a] and out.preempted == [b]
    assert list(sched.waiting) == [b]
    finish_all(sched)


def test_add_rejects_requests_that_never_fit(tokenizer: Tokenizer) -> None:
    sched = make(tokenizer, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="KV cache"):
        sched.add(req(tokenizer, "big", list(range(1, 15)), max_tokens=4))
    sched.add(req(tokenizer, "fits", list(range(1, 15)), max_tokens=3))  # 16 tokens, 1 unwritten
    capped = make(tokenizer, num_blocks=4, block_size=4, max_model_len=17)
    capped.add(req(tokenizer, "capped", list(range(1, 15)), max_tokens=100))
    assert len(sched.waiting) == 1 and len(capped.waiting) == 1


def test_budget_smaller_than_seqs_is_rejected(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make(tokenizer, seqs=8, budget=4)
