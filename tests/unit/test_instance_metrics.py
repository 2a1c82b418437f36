"""Instance `/metrics` in process: InstanceMetrics renders a stateless instance and a real prefill
and decode Instance (FakeModelRunner, FakeTransport, in-process wire); values follow requests
(hand-off bytes and time, decoded tokens, prefix-cache hits, rejections, hand-off failures).
Every test with roles ends with the instances' leak checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pd_serve.api.errors import APIError
from pd_serve.instance.app import Instance
from pd_serve.instance.messages import PrefillRequest, SamplingWire
from pd_serve.instance.metrics import InstanceMetrics
from pd_serve.kv.layout import KVLayout
from tests.fakes import fake_model_config
from tests.inprocess_pd import BLOCK, PDPair, patch_runtime, pd_config

PROMPT = list(range(10, 10 + 3 * BLOCK + 2))  # three full blocks and two tokens
MAX_TOKENS = 6


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(inst: Instance, name: str, **labels: str) -> float | None:
    """One sample of a fresh render of `inst`, None when absent."""
    text = InstanceMetrics().render(inst).decode()
    return samples(text).get((name, frozenset(labels.items())))


async def until(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """The engine's stats snapshot lags a little (refreshed when idle and every 16 steps)."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def run(monkeypatch: pytest.MonkeyPatch, scenario: Callable[[PDPair], Awaitable[None]],
        **cfg: Any) -> None:
    wire = patch_runtime(monkeypatch)

    async def main() -> None:
        pair = await PDPair.start(wire, pd_config(**cfg))
        try:
            await scenario(pair)
        finally:
            await pair.close()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_stateless_instance() -> None:
    inst = Instance(pd_config(), "http://stateless.test")
    metrics, other = InstanceMetrics(), InstanceMetrics()  # private registries never collide
    got = samples(metrics.render(inst).decode())
    assert got == samples(other.render(inst).decode())
    assert got[("pd_instance_info", frozenset({("role", "none"), ("scenario", "none")}))] == 1
    assert got[("pd_instance_draining", frozenset())] == 0
    names = {name for name, _ in got}
    assert not names & {"pd_slots_total", "pd_kv_blocks_total", "pd_handoff_bytes_total"}
    inst.drain(True)
    assert value(inst, "pd_instance_draining") == 1


def test_prefill_and_decode_follow_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(pair: PDPair) -> None:
        p, d = pair.prefill, pair.decode
        assert value(p, "pd_instance_info", role="prefill", scenario="chat") == 1
        assert value(d, "pd_instance_info", role="decode", scenario="chat") == 1
        assert (value(p, "pd_slots_total"), value(p, "pd_slots_in_use")) == (2, 0)
        assert value(d, "pd_slots_total") is None and value(p, "pd_handoff_bytes_total") is None
        await until(lambda: value(p, "pd_kv_blocks_total") == 64
                    and value(d, "pd_kv_blocks_total") == 64)
        assert value(d, "pd_handoff_bytes_total") == 0

        events = await pair.run_request("r1", PROMPT, MAX_TOKENS)
        kinds = [e for e, _ in events]
        assert kinds[:2] == ["first", "handoff"] and kinds[-1] == "delta"
        assert events[-1][1]["completion_tokens"] == MAX_TOKENS
        await pair.wait_idle()
        per_handoff = KVLayout.for_model(fake_model_config(), len(PROMPT)).total_bytes
        assert value(d, "pd_handoff_bytes_total") == per_handoff
        assert value(d, "pd_handoff_seconds_count") == 1
        assert value(d, "pd_decode_tokens_total") == MAX_TOKENS - 1  # prefill made the first
        assert value(p, "pd_prefill_seconds_count") == 1
        assert value(p, "pd_slots_in_use") == 0
        await until(lambda: value(p, "pd_prefix_cache_query_tokens_total") == len(PROMPT))
        assert value(p, "pd_prefix_cache_hit_tokens_total") == 0

        await pair.run_request("r2", PROMPT, MAX_TOKENS)  # same prompt: cached full blocks
        await pair.wait_idle()
        assert value(d, "pd_handoff_bytes_total") == 2 * per_handoff
        assert value(d, "pd_handoff_seconds_count") == 2
        await until(lambda: value(p, "pd_prefix_cache_query_tokens_total") == 2 * len(PROMPT))
        hit = (len(PROMPT) - 1) // BLOCK * BLOCK  # the last token is always computed
        assert value(p, "pd_prefix_cache_hit_tokens_total") == hit
        await until(lambda: value(p, "pd_kv_blocks_in_use") == 0
                    and value(d, "pd_kv_blocks_in_use") == 0)
        assert value(p, "pd_kv_blocks_cached") == len(PROMPT) // BLOCK
        assert value(p, "pd_requests_running") == 0 and value(d, "pd_requests_waiting") == 0

    run(monkeypatch, scenario)


def test_rejections_and_handoff_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    def request(rid: str, deadline_s: float | None = None) -> PrefillRequest:
        return PrefillRequest(request_id=rid, prompt_token_ids=PROMPT, deadline_s=deadline_s,
                              sampling=SamplingWire(max_tokens=MAX_TOKENS, temperature=0.0,
                                                    ignore_eos=True))

    async def scenario(pair: PDPair) -> None:
        p, d = pair.prefill, pair.decode
        role = p.need_prefill()
        body, ticket = role.offer(request("held"), time.monotonic())  # takes the only slot
        assert value(p, "pd_slots_in_use") == 1
        with pytest.raises(APIError) as busy:
            role.offer(request("busy"), time.monotonic())
        assert busy.value.code == "no_free_slot"
        ticket.abandon()  # the body never started: the slot goes back
        await body.aclose()  # type: ignore[attr-defined]
        await until(lambda: value(p, "pd_slots_in_use") == 0)
        p.drain(True)
        with pytest.raises(APIError):
            role.offer(request("drained"), time.monotonic())
        p.drain(False)
        late, _ = role.offer(request("late", deadline_s=0.0), time.monotonic())
        assert [c async for c in late][0].startswith("event: error")
        for reason, n in (("no_free_slot", 1), ("draining", 1), ("deadline_exceeded", 1),
                          ("queue_full", 0)):
            assert value(p, "pd_prefill_rejections_total", reason=reason) == n, reason

        d.drain(True)  # decode refuses the hand-off: prefill's stream ends with an error
        events = await pair.run_request("refused", PROMPT, MAX_TOKENS)
        assert [e for e, _ in events] == ["first", "error"]
        assert value(p, "pd_handoff_failures_total", reason="not_accepted") == 1
        d.drain(False)
        await pair.wait_idle()  # the failed request's slot is freed behind its stream

        assert d.runtime is not None
        d.runtime.transport.stall_s = 1.0  # longer than pd.fetch_timeout_s
        events = await pair.run_request("stalled", PROMPT, MAX_TOKENS)
        assert [e for e, _ in events] == ["first", "handoff", "error"]
        d.runtime.transport.stall_s = 0.0
        assert value(d, "pd_handoff_failures_total", reason="fetch_failed") == 1
        assert value(d, "pd_handoff_failures_total", reason="reserve_failed") == 0
        assert value(d, "pd_handoff_bytes_total") == 0
        assert value(d, "pd_handoff_seconds_count") == 0

    run(monkeypatch, scenario, b_p=1, fetch_timeout_s=0.3)
