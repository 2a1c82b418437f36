"""Building blocks of the simulator: the event loop's ordering, the analytic decode batch
against step-by-step arithmetic, the prefill step composition (chunking, budget, FIFO) and the
prefix cache's LRU."""

from __future__ import annotations

import math
import random

import pytest

from pd_serve.sim.batch import DecodeRun
from pd_serve.sim.config import InstanceSpec
from pd_serve.sim.engine import PrefillWork
from pd_serve.sim.events import EventLoop
from pd_serve.sim.latency import DecodeModel, PrefillModel
from pd_serve.sim.prefix_cache import PrefixCache
from pd_serve.sim.request import SimRequest


def _req(idx: int, input_len: int, output_len: int = 2,
         hash_ids: tuple[int, ...] = ()) -> SimRequest:
    return SimRequest(idx, None, input_len, output_len, hash_ids, 0.0)


def test_event_loop_orders_by_time_then_scheduling() -> None:
    loop, seen = EventLoop(), list[str]()
    loop.at(2.0, seen.append, "c")
    loop.at(1.0, seen.append, "a")
    loop.at(1.0, seen.append, "b")
    loop.after(0.5, lambda _: loop.after(0.0, seen.append, "d"))
    assert loop.run(until=1.5) == 4
    assert seen == ["d", "a", "b"] and loop.now == 1.5
    loop.run()
    assert seen[-1] == "c" and loop.events == 5
    with pytest.raises(ValueError, match="before the clock"):
        loop.at(1.0, seen.append)


@pytest.mark.parametrize("padded", [False, True])
def test_decode_run_matches_stepping(padded: bool) -> None:
    model = DecodeModel(0.01, 0.001, 2e-5, padded)
    run = DecodeRun(model, None)
    rng = random.Random(3)
    members = {i: [rng.randint(1, 500), rng.randint(1, 40)] for i in range(6)}  # ctx, remaining
    reqs = {i: _req(i, c - 1) for i, (c, _) in members.items()}
    run.restart(1.0)
    for i, (_, rem) in members.items():
        run.add(reqs[i], rem)
    t, step = 1.0, 0
    while members:
        contexts = [c for c, _ in members.values()]
        t += model.time_of(contexts)
        step += 1
        for m in members.values():
            m[0] += 1
            m[1] -= 1
        done = sorted(i for i, m in members.items() if m[1] == 0)
        if done:
            k = run.steps_to_finish()
            assert k == step - run.steps
            assert run.boundary(k) == pytest.approx(t, rel=1e-12)
            assert run.steps_to(t - 1e-9) == k and run.steps_to(t) == k
            run.advance(k, run.boundary(k))
            assert sorted(r.idx for r in run.pop_finished()) == done
            run.restart(run.t0)
            for i in done:
                del members[i]
    assert run.size == 0 and run.key_sum == 0


def test_prefill_work_chunks_under_the_token_budget_in_fifo_order() -> None:
    spec = InstanceSpec(max_num_batched_tokens=100)
    work = PrefillWork(spec, PrefillModel(0.01, 0.0, 1e-4, 0.0), None)
    a, b, c = _req(0, 150), _req(1, 30), _req(2, 10)
    for r in (a, b, c):
        work.add(r)
    first = work.compose(seq_room=16)
    assert first is not None and first[0] == [a] and first[1] == [100]
    assert work.complete(first) == []
    second = work.compose(seq_room=15)
    assert second is not None and second[0] == [a, b, c] and second[1] == [50, 30, 10]
    assert work.duration(second) == pytest.approx(0.01 + 1e-4 * 90)
    assert work.complete(second) == [a, b, c] and work.busy == 0
    assert work.compose(seq_room=16) is None


def test_prefill_work_respects_the_sequence_limit_and_admission() -> None:
    work = PrefillWork(InstanceSpec(), PrefillModel(0.01, 0, 0, 0), None)
    reqs = [_req(i, 10) for i in range(3)]
    for r in reqs:
        work.add(r)
    chunks = work.compose(seq_room=2)
    assert chunks is not None and chunks[0] == reqs[:2]
    assert work.compose(seq_room=5, admit=lambda r: False) is not None  # running ones go on
    assert list(work.waiting) == [reqs[2]]


def test_prefix_cache_hits_and_lru_eviction() -> None:
    cache = PrefixCache(4)
    assert cache.match((1, 2, 3)) == 0
    cache.insert((1, 2, 3), 3)
    assert cache.match((1, 2, 9)) == 2
    cache.insert((5, 6), 2)  # 5 blocks > 4: the least recently used (3) goes
    assert cache.match((1, 2, 3)) == 2 and len(cache) == 4
    cache.insert((7,), 1)  # evicts 6 (chain tails go before their heads)
    assert cache.match((5, 6)) == 1


def test_prefill_uses_the_prefix_cache_but_computes_at_least_one_token() -> None:
    spec = InstanceSpec(prefix_cache_blocks=16, hash_block_tokens=64)
    work = PrefillWork(spec, PrefillModel(0.01, 0, 1e-4, 0), None)
    first, second = _req(0, 128, hash_ids=(1, 2)), _req(1, 128, hash_ids=(1, 2))
    work.add(first)
    chunks = work.compose(16)
    assert chunks is not None
    work.complete(chunks)
    work.add(second)
    chunks = work.compose(16)
    assert chunks is not None and chunks[1] == [1] and second.cached == 127
    assert math.isclose(work.duration(chunks), 0.01 + 1e-4)
