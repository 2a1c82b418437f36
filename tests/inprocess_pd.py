"""A prefill and a decode Instance in one process for unit tests: the real Instance, roles,
engines, KVSender/KVReceiver and Runtime.build, over FakeModelRunner and FakeTransport, with the
instance-to-instance HTTP (hand-off, HandoffDone, /health probes) carried by an in-process
httpx MockTransport that calls the other Instance directly.

Lifecycle:
1. `patch_runtime(monkeypatch)` makes Runtime.build use FakeModelRunner and FakeTransport and
   every httpx.AsyncClient use the in-process wire (`Wire`);
2. `PDPair.start(cfg)` (on a running loop) builds and assigns both instances ("prefill" and
   "decode" of group `chat`) and registers them on the wire;
3. `run_request(...)` offers one request to prefill and reads both SSE streams to their end;
4. `close()` waits until both are idle, runs the leak checks (engine, sender, receiver), closes
   both and checks that every transport registration is gone.
"""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial
from typing import Any

import httpx
import pytest

from pd_serve.api.errors import APIError
from pd_serve.backends.base import RunnerConfig
from pd_serve.config import CacheConfig, ModelSpec, PDConfig, SchedulerConfig, ServeConfig
from pd_serve.instance import runtime as runtime_mod
from pd_serve.instance.app import Instance
from pd_serve.instance.messages import (
    AssignRequest,
    HandoffDone,
    HandoffRequest,
    PrefillRequest,
    SamplingWire,
)
from pd_serve.kv.transport import FakeTransport
from tests.checkpoints import DEMO_MODEL
from tests.fakes import FakeModelRunner

PREFILL_URL, DECODE_URL = "http://prefill.test", "http://decode.test"
BLOCK = 4


def pd_config(b_p: int = 2, **pd: Any) -> ServeConfig:
    return ServeConfig(model=ModelSpec(path=str(DEMO_MODEL), name="fake", backend="torch"),
                       cache=CacheConfig(block_size=BLOCK, num_blocks=64),
                       scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=128),
                       pd=PDConfig(b_p=b_p, handoff_timeout_s=10.0, attach_timeout_s=10.0,
                                   **pd))


class Wire:
    """Routes instance-to-instance requests by host to the Instance registered for it."""

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        inst = self.instances.get(f"{request.url.scheme}://{request.url.host}")
        if inst is None:
            raise httpx.ConnectError("no such instance", request=request)
        path = request.url.path
        try:
            if path == "/health":
                return httpx.Response(200, json={"status": "ok"})
            if path == "/internal/handoff":
                msg = HandoffRequest.model_validate_json(request.content)
                return httpx.Response(202, json={"queued": inst.need_decode().accept(msg)})
            if path == "/internal/handoff_done":
                done = HandoffDone.model_validate_json(request.content)
                return httpx.Response(200, json={"released":
                                                 inst.need_prefill().handoff_done(done)})
        except APIError as exc:
            return httpx.Response(exc.status, json=exc.body())
        return httpx.Response(404)


def patch_runtime(monkeypatch: pytest.MonkeyPatch) -> Wire:
    wire = Wire()
    real_client = httpx.AsyncClient

    def client(**kwargs: Any) -> httpx.AsyncClient:
        return real_client(transport=httpx.MockTransport(wire.handle), **kwargs)

    def runner(rc: RunnerConfig) -> FakeModelRunner:
        return FakeModelRunner(block_size=rc.block_size, num_blocks=rc.num_blocks or 64,
                               max_position_embeddings=rc.max_model_len or 128)

    monkeypatch.setattr(httpx, "AsyncClient", client)
    monkeypatch.setattr(runtime_mod, "create_runner", runner)
    monkeypatch.setattr(runtime_mod, "make_transport", lambda cfg: FakeTransport())
    return wire


def sse_events(chunks: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in "".join(chunks).split("\n\n"):
        if frame:
            event, data = frame.split("\n", 1)
            out.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


class PDPair:
    def __init__(self, wire: Wire, cfg: ServeConfig) -> None:
        self.wire = wire
        self.prefill = Instance(cfg, PREFILL_URL)
        self.decode = Instance(cfg, DECODE_URL)
        wire.instances = {PREFILL_URL: self.prefill, DECODE_URL: self.decode}
        self.transports: list[Any] = []

    @classmethod
    async def start(cls, wire: Wire, cfg: ServeConfig) -> PDPair:
        pair = cls(wire, cfg)
        await pair.decode.assign(AssignRequest(role="decode", group="chat"))
        await pair.prefill.assign(AssignRequest(role="prefill", group="chat",
                                                decode_peers=[DECODE_URL]))
        for inst in (pair.prefill, pair.decode):
            assert inst.runtime is not None
            pair.transports.append(inst.runtime.transport)
        return pair

    async def run_request(self, rid: str, prompt: list[int], max_tokens: int = 6
                          ) -> list[tuple[str, dict[str, Any]]]:
        """Prefill's SSE events, then (after a hand-off) decode's, each stream read to its end."""
        req = PrefillRequest(request_id=rid, prompt_token_ids=prompt,
                             sampling=SamplingWire(max_tokens=max_tokens, temperature=0.0,
                                                   ignore_eos=True))
        body, ticket = self.prefill.need_prefill().offer(req, time.monotonic())
        try:
            events = sse_events([chunk async for chunk in body])
        finally:
            ticket.abandon()
        if events[-1][0] == "handoff":
            stream = await self.decode.need_decode().attach(rid)
            events += sse_events([chunk async for chunk in stream])
        return events

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self.prefill.idle and self.decode.idle):
            assert time.monotonic() < deadline, "instances never went idle"
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Leak checks once idle, then close both; every registration must be gone."""
        await self.wait_idle()
        for inst in (self.prefill, self.decode):
            assert inst.runtime is not None
            await inst.runtime.engine.call(lambda e: e.leak_check())
            sender = inst.runtime.sender
            if sender is not None:
                await inst.runtime.engine.call(partial(_leak_check, sender))
        assert (await self.prefill.stats())["kv_leak_check"] == "ok"
        for inst in (self.prefill, self.decode):
            await inst.close()
        assert [t.num_registered for t in self.transports] == [0, 0], "registrations leaked"


def _leak_check(part: Any, _engine: Any) -> None:
    """Engine thread: the sender's slots are touched only there."""
    part.leak_check()
