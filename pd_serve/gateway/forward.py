"""The I/O side of forwarding: applies the pure policy's decisions (pd_serve.gateway.policy) with
httpx. An offer is one POST /internal/prefill; 429 is a rejection, 200 an acceptance (an open
SSE stream); when the policy terminates, the request ends with 503 `ttft_deadline_exceeded`.

Lifecycle: `Forwarder(scenarios, retry_interval_s)`; `open(scenario, body, timeline)` returns a
PrefillStream whose `close()` the caller must call (it ends the HTTP stream, which aborts the
request on prefill if it is still there, and lowers the open-stream count); `aclose()` ends the
HTTP client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from pd_serve.api.errors import SERVER_ERROR, APIError
from pd_serve.gateway import policy as pol
from pd_serve.gateway.scenarios import Scenario
from pd_serve.gateway.timeline import Timeline


@dataclass
class PrefillStream:
    url: str
    response: httpx.Response
    state: pol.RouterState
    attempt: pol.Attempt
    closed: bool = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            pol.note_close(self.state, self.url)
            await self.response.aclose()


class Forwarder:
    def __init__(self, scenarios: Mapping[str, Scenario], retry_interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not scenarios:
            raise ValueError("the gateway needs at least one scenario")
        self.scenarios = dict(scenarios)
        self.retry_interval_s = retry_interval_s
        self.clock = clock
        self.open_streams: dict[str, int] = {}  # shared: scenarios may share instances
        self.states = {name: pol.RouterState(sc.instances, self.open_streams)
                       for name, sc in self.scenarios.items()}
        self.rejections = 0
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))

    @property
    def urls(self) -> list[str]:
        return list(dict.fromkeys(u for st in self.states.values() for u in st.instances))

    def set_instances(self, scenario: str, urls: list[str]) -> bool:
        """Replaces a scenario's prefill instances (from the orchestrator's meta info); requests
        in flight are not disturbed. False when nothing changed."""
        urls = [u.rstrip("/") for u in urls]
        sc = self.scenarios[scenario]
        if list(sc.instances) == urls:
            return False
        self.scenarios[scenario] = dataclasses.replace(sc, instances=tuple(urls))
        pol.set_instances(self.states[scenario], urls)
        return True

    async def aclose(self) -> None:
        await self.client.aclose()

    async def open(self, sc: Scenario, body: dict[str, Any], tl: Timeline) -> PrefillStream:
        """The first prefill stream that accepts `body`; APIError 503 when the TTFT deadline
        passes first, or the prefill's own 4xx (bad input) as it is."""
        state = self.states[sc.name]
        assert tl.deadline is not None
        attempt = pol.Attempt(tl.arrival, tl.deadline)
        pol.join(state, attempt)
        try:
            while True:
                decision = pol.decide(sc.policy, state, attempt, self.clock(),
                                      self.retry_interval_s)
                if isinstance(decision, pol.Terminate):
                    raise APIError(503, decision.reason, type=SERVER_ERROR,
                                   code="ttft_deadline_exceeded")
                if isinstance(decision, pol.Wait):
                    await asyncio.sleep(decision.seconds)
                    pol.note_wait(attempt)
                    continue
                pol.note_offer(sc.policy, state, attempt, decision.instance)
                stream = await self._offer(decision, body, state, attempt, tl)
                if stream is not None:
                    return stream
        finally:
            pol.note_done(state, attempt)  # accepted, terminated or cancelled: leave the line

    async def _offer(self, offer: pol.Offer, body: dict[str, Any], state: pol.RouterState,
                     attempt: pol.Attempt, tl: Timeline) -> PrefillStream | None:
        url = offer.instance
        payload = {**body, "queue": True, "deadline_s": offer.deadline_s} if offer.queue else body
        req = self.client.build_request("POST", f"{url}/internal/prefill",
                                        content=json.dumps(payload).encode(),
                                        headers={"content-type": "application/json"})
        try:
            response = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            self._rejected(state, attempt, tl, url, f"unreachable ({type(exc).__name__})")
            return None
        if response.status_code == 200:
            pol.note_accept(state, attempt, url)
            tl.offer(self.clock(), url, "accepted")
            return PrefillStream(url, response, state, attempt)
        await response.aread()
        await response.aclose()
        if response.status_code == 429:
            self.rejections += 1
            self._rejected(state, attempt, tl, url, _REJECT_REASONS.get(
                _error_code(response) or "", "all slots busy"))
            return None
        if response.status_code == 409:
            self._rejected(state, attempt, tl, url, "not a prefill instance")
            return None
        raise _relayed_error(response)

    def _rejected(self, state: pol.RouterState, attempt: pol.Attempt, tl: Timeline, url: str,
                  reason: str) -> None:
        pol.note_reject(state, attempt, url, reason)
        tl.offer(self.clock(), url, reason)


_REJECT_REASONS = {"no_free_slot": "all slots busy", "queue_full": "local queue full",
                   "draining": "draining", "no_decode_peer": "no live decode peer"}


def _error_code(response: httpx.Response) -> str | None:
    """The `code` of an OpenAI-style error body, if it has one."""
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _relayed_error(response: httpx.Response) -> APIError:
    try:
        err = response.json()["error"]
        return APIError(response.status_code, str(err["message"]), type=str(err["type"]),
                        param=err.get("param"), code=err.get("code"))
    except (ValueError, KeyError, TypeError):
        return APIError(502, f"prefill answered HTTP {response.status_code}", type=SERVER_ERROR,
                        code="bad_gateway")
