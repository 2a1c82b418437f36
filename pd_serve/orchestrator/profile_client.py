"""The profiler's view of a live gateway: sends token-id prompts to `/v1/completions` (streaming,
scenario header) and reads each request's timeline from `/debug/requests/{id}`, returning the
times the performance model needs (which prefill instance took it, TTFT, hand-off target, token
times) on one clock.

Lifecycle: `GatewayProbe(base_url, scenario, client, api_key)`; `burst(prompts, max_tokens)`
any number of times; the caller owns (and closes) the httpx.AsyncClient.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

SCENARIO_HEADER = "X-PD-Scenario"


class ProfileError(RuntimeError):
    """The gateway refused or failed a profiling request, or its timeline is unusable."""


@dataclass(frozen=True)
class Sample:
    """One finished request. Times are seconds on the profiler's monotonic clock: the gateway's
    relative timeline times plus the moment the request was sent (loopback-close to the
    gateway's arrival time). `ttft` runs from the gateway's arrival to the first token;
    `accepted_at`: when the prefill `instance` accepted the request; `tokens`: (time, completion
    tokens so far), the first from prefill."""

    instance: str
    ttft: float
    accepted_at: float
    first_token_at: float
    decode_url: str | None
    tokens: tuple[tuple[float, int], ...]

    @property
    def arrived_at(self) -> float:
        """The gateway's arrival time of the request on the profiler's clock."""
        return self.first_token_at - self.ttft

    @property
    def completion_tokens(self) -> int:
        return self.tokens[-1][1] if self.tokens else 0


class GatewayProbe:
    def __init__(self, base_url: str, scenario: str, client: httpx.AsyncClient,
                 api_key: str | None = None, timeline_wait_s: float = 2.0) -> None:
        self.base = base_url.rstrip("/")
        self.client = client
        self.headers = {SCENARIO_HEADER: scenario}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeline_wait_s = timeline_wait_s

    async def max_model_len(self) -> int:
        r = await self.client.get(f"{self.base}/v1/models", headers=self.headers)
        if r.status_code != 200:
            raise ProfileError(f"GET /v1/models: HTTP {r.status_code} {r.text[:300]}")
        return int(r.json()["data"][0]["max_model_len"])

    async def burst(self, prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        """Sends every prompt at once and waits for all of them."""
        return list(await asyncio.gather(*(self.one(p, max_tokens) for p in prompts)))

    async def one(self, prompt: list[int], max_tokens: int) -> Sample:
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": 0.0, "ignore_eos": True}
        sent = time.monotonic()
        request_id = await self._stream(body)
        return _sample(await self._timeline(request_id), sent)

    async def _stream(self, body: dict[str, Any]) -> str:
        """Reads the SSE stream to its end; the request id its chunks carry."""
        request_id: str | None = None
        async with self.client.stream("POST", f"{self.base}/v1/completions", json=body,
                                      headers=self.headers) as r:
            if r.status_code != 200:
                await r.aread()
                raise ProfileError(f"POST /v1/completions: HTTP {r.status_code} "
                                   f"{r.text[:300]}")
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                data = json.loads(line[5:])
                if "error" in data:
                    raise ProfileError(f"stream error: {data['error']}")
                request_id = request_id or data.get("id")
        if request_id is None:
            raise ProfileError("the completion stream carried no request id")
        return request_id

    async def _timeline(self, request_id: str) -> dict[str, Any]:
        """The request's timeline once the gateway has marked it finished."""
        deadline = time.monotonic() + self.timeline_wait_s
        while True:
            r = await self.client.get(f"{self.base}/debug/requests/{request_id}")
            if r.status_code != 200:
                raise ProfileError(f"GET /debug/requests/{request_id}: HTTP {r.status_code} "
                                   f"{r.text[:300]} (is gateway.timeline_capacity too small?)")
            tl: dict[str, Any] = r.json()
            if tl.get("outcome") is not None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        if tl.get("outcome") != "finished":
            raise ProfileError(f"request {request_id} ended {tl.get('outcome')!r}: "
                               f"{tl.get('detail')}")
        return tl


def _sample(tl: dict[str, Any], sent: float) -> Sample:
    accepted = [o for o in tl.get("offers", []) if o.get("answer") == "accepted"]
    first = tl.get("first_token_s")
    if not accepted or first is None:
        raise ProfileError(f"timeline of {tl.get('request_id')} has no accepted offer or "
                           "first token")
    handoff = tl.get("handoff") or {}
    tokens = tuple((sent + float(t["t"]), int(t["completion_tokens"]))
                   for t in tl.get("tokens", []))
    return Sample(instance=str(accepted[-1]["instance"]), ttft=float(first),
                  accepted_at=sent + float(accepted[-1]["t"]), first_token_at=sent + float(first),
                  decode_url=handoff.get("decode_url"), tokens=tokens)
