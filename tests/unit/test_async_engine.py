"""AsyncEngine: delivery across the thread boundary, rejection, abort on early exit, step
failures that fail requests but keep the loop serving, stop. Uses FakeEngine and, for one
end-to-end check, the real LLMEngine over FakeModelRunner."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.async_engine import AsyncEngine, EngineDeadError, EngineError
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.outputs import FinishReason, RequestOutput
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer
from tests.fakes import FakeModelRunner, greedy_reference


class FakeEngine:
    """Emits one token (= the step number) per step per request; `fail_steps` steps raise."""

    max_model_len = 64

    def __init__(self) -> None:
        self.reqs: dict[str, tuple[int, SamplingParams, int]] = {}
        self.aborted: list[str] = []
        self.pending_abort: list[str] = []
        self.fail_steps = 0
        self.thread_ids: set[int] = set()

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self.thread_ids.add(threading.get_ident())
        if not prompt:
            raise ValueError("prompt is empty")
        self.reqs[request_id] = (len(prompt), params, 0)

    def abort(self, request_id: str) -> None:
        if self.reqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)
            self.pending_abort.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.reqs or self.pending_abort)

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("boom")
        outs = [RequestOutput(r, [], "", "", True, FinishReason.ABORT, 0, 0)
                for r in self.pending_abort]
        self.pending_abort.clear()
        for rid, (plen, params, n) in list(self.reqs.items()):
            n += 1
            done = n >= params.max_tokens
            self.reqs[rid] = (plen, params, n)
            if done:
                del self.reqs[rid]
            outs.append(RequestOutput(rid, [n], f"{n} ", "", done,
                                      FinishReason.LENGTH if done else None, plen, n))
        return outs

    def stats(self) -> dict[str, Any]:
        return {"num_running": len(self.reqs)}

    def leak_check(self) -> None:
        assert not self.reqs


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], max_tokens: int
                  ) -> list[RequestOutput]:
    return [o async for o in engine.generate(rid, prompt, SamplingParams(max_tokens=max_tokens))]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


@pytest.fixture
def fake() -> Any:
    engine = FakeEngine()
    async_engine = AsyncEngine(engine)
    async_engine.start()
    yield engine, async_engine
    async_engine.stop()
    assert not async_engine.alive


def test_outputs_stream_in_order_from_the_engine_thread(fake: Any) -> None:
    engine, ae = fake

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(ae, f"r{i}", [1, 2], 3 + i) for i in range(4)))

    results = run(main())
    for i, outs in enumerate(results):
        assert [o.new_token_ids[0] for o in outs] == list(range(1, 4 + i))
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert engine.thread_ids and threading.get_ident() not in engine.thread_ids
    assert ae.stats()["open_requests"] == 0


def test_rejected_request_raises_value_error(fake: Any) -> None:
    _, ae = fake
    with pytest.raises(ValueError, match="empty"):
        run(collect(ae, "bad", [], 3))
    assert len(run(collect(ae, "good", [1], 2))) == 2  # still serving


def test_duplicate_request_id_is_rejected(fake: Any) -> None:
    _, ae = fake

    async def main() -> None:
        agen = ae.generate("same", [1], SamplingParams(max_tokens=1000))
        await agen.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await collect(ae, "same", [1], 2)
        await agen.aclose()

    run(main())


def test_consumer_leaving_early_aborts_the_request(fake: Any) -> None:
    engine, ae = fake

    async def main() -> None:
        agen = ae.generate("early", [1], SamplingParams(max_tokens=10_000))
        await agen.__anext__()
        await agen.aclose()
        task = asyncio.ensure_future(collect(ae, "cancelled", [1], 10_000))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    wait_until(lambda: not engine.has_unfinished())
    assert sorted(engine.aborted) == ["cancelled", "early"]
    assert ae.stats()["open_requests"] == 0 and ae.stats()["caller_aborts"] == 2


def test_step_failure_fails_requests_and_the_loop_keeps_serving(fake: Any) -> None:
    engine, ae = fake
    engine.fail_steps = 1
    with pytest.raises(EngineError, match="boom"):
        run(collect(ae, "victim", [1], 5))
    assert "victim" in engine.aborted
    assert len(run(collect(ae, "after", [1], 3))) == 3
    assert ae.health()["ok"] and ae.stats()["failed_steps"] == 1


def test_persistent_step_failure_makes_health_fail() -> None:
    engine = FakeEngine()
    engine.fail_steps = 10**9
    ae = AsyncEngine(engine)
    ae.start()
    try:
        for i in range(3):
            with pytest.raises(EngineError):
                run(collect(ae, f"r{i}", [1], 5))
        assert not ae.health()["ok"]
    finally:
        ae.stop()


def test_generate_on_a_stopped_engine_raises() -> None:
    ae = AsyncEngine(FakeEngine())
    with pytest.raises(EngineDeadError):
        run(collect(ae, "r", [1], 2))


def test_stop_fails_open_requests() -> None:
    engine = FakeEngine()
    ae = AsyncEngine(engine)
    ae.start()

    async def main() -> None:
        agen = ae.generate("open", [1], SamplingParams(max_tokens=10**9))
        await agen.__anext__()
        await asyncio.to_thread(ae.stop)
        with pytest.raises(EngineDeadError):
            async for _ in agen:
                pass

    run(main())


def test_real_engine_matches_the_greedy_reference(demo_model_dir: Any) -> None:
    runner = FakeModelRunner(block_size=4, num_blocks=64)
    engine = LLMEngine(runner, Tokenizer(demo_model_dir), CacheConfig(block_size=4, num_blocks=64),
                       SchedulerConfig(max_num_seqs=4))
    ae = AsyncEngine(engine)
    ae.start()
    try:
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]

        async def main() -> list[list[RequestOutput]]:
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            return await asyncio.gather(*(
                _all(ae.generate(f"g{i}", p, params)) for i, p in enumerate(prompts)))

        for prompt, outs in zip(prompts, run(main())):
            tokens = [t for o in outs for t in o.new_token_ids]
            assert tokens == greedy_reference(prompt, 6)
    finally:
        ae.stop()
    engine.leak_check()  # the thread is joined: safe to touch the engine here
    assert not engine.has_unfinished()


async def _all(agen: Any) -> list[RequestOutput]:
    return [o async for o in agen]


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
