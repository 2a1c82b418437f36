"""On-demand forwarding to prefill instances: fewest open streams first, a 429 (no free slot)
moves on to the next, a full round of rejections waits `retry_interval_s` and tries again until
the deadline, then 503 with the reason. Requests wait here, never in a prefill queue.

Lifecycle: `Forwarder(urls, pd)`; `open()` returns a PrefillStream whose `close()` the caller
must call (it ends the HTTP stream, which aborts the request on prefill if it is still there,
and decrements the open-stream count); `aclose()` ends the HTTP client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from pd_serve.api.errors import SERVER_ERROR, APIError
from pd_serve.config import PDConfig


def rank_prefills(urls: Sequence[str], open_streams: Mapping[str, int]) -> list[str]:
    """Pure policy: fewest open streams first, ties in configured order."""
    order = {u: i for i, u in enumerate(urls)}
    return sorted(urls, key=lambda u: (open_streams.get(u, 0), order[u]))


@dataclass
class PrefillStream:
    url: str
    response: httpx.Response
    forwarder: Forwarder
    closed: bool = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.forwarder.open_streams[self.url] -= 1
            await self.response.aclose()


class Forwarder:
    def __init__(self, urls: Sequence[str], pd: PDConfig) -> None:
        if not urls:
            raise ValueError("the front end needs at least one prefill instance URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.pd = pd
        self.open_streams: dict[str, int] = {u: 0 for u in self.urls}
        self.rejections = 0
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def open(self, body: bytes) -> PrefillStream:
        """The first prefill stream that accepts `body`; APIError 503 after the deadline, or the
        prefill's own 4xx (bad input) as it is."""
        deadline = time.monotonic() + self.pd.forward_deadline_s
        reasons: dict[str, str] = {}
        while True:
            for url in rank_prefills(self.urls, self.open_streams):
                stream = await self._try(url, body, reasons)
                if stream is not None:
                    return stream
            if time.monotonic() + self.pd.retry_interval_s > deadline:
                detail = "; ".join(f"{u}: {r}" for u, r in reasons.items())
                raise APIError(503, f"no prefill instance accepted the request within "
                               f"{self.pd.forward_deadline_s:g} s ({detail})", type=SERVER_ERROR,
                               code="no_prefill_capacity")
            await asyncio.sleep(self.pd.retry_interval_s)

    async def _try(self, url: str, body: bytes, reasons: dict[str, str]) -> PrefillStream | None:
        req = self.client.build_request("POST", f"{url}/internal/prefill", content=body,
                                        headers={"content-type": "application/json"})
        try:
            response = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            reasons[url] = f"unreachable ({type(exc).__name__})"
            return None
        if response.status_code == 200:
            self.open_streams[url] += 1
            return PrefillStream(url, response, self)
        await response.aread()
        await response.aclose()
        if response.status_code == 429:
            self.rejections += 1
            reasons[url] = "all slots busy"
            return None
        if response.status_code == 409:
            reasons[url] = "not a prefill instance"
            return None
        raise _relayed_error(response)


def _relayed_error(response: httpx.Response) -> APIError:
    try:
        err = response.json()["error"]
        return APIError(response.status_code, str(err["message"]), type=str(err["type"]),
                        param=err.get("param"), code=err.get("code"))
    except (ValueError, KeyError, TypeError):
        return APIError(502, f"prefill answered HTTP {response.status_code}", type=SERVER_ERROR,
                        code="bad_gateway")
