"""The load generator's HTTP client: sends each request at its scheduled time as a streaming
OpenAI `/v1/completions` or `/v1/chat/completions` call and records when every chunk arrived.

Lifecycle of one run (`run_load`):
1. one `httpx.AsyncClient` is opened; `t0 = perf_counter()` is taken just before the first
   dispatch and every recorded time is in seconds from `t0`;
2. every request is its own task (open loop): it sleeps until its `send_at`, waits for a
   `max_concurrency` slot if one is set (that wait is client queueing, excluded from TTFT and
   E2E as in vLLM), then POSTs with `stream: true` and `stream_options.include_usage`;
3. each SSE message with non-empty `choices` is one *chunk*: the first gives TTFT (even with
   empty text, e.g. a chat stream's role-only first chunk, exactly as vLLM), later ones an
   inter-chunk gap (ITL). A chunk may carry several tokens (a server's stream interval,
   detokenisation holding back partial characters, speculative decoding); like vLLM we keep
   one ITL entry per chunk, not per token, and take the token count from `usage`;
4. the request ends at `[DONE]`, an error, or a cut stream; `on_done(record)` is called (the
   progress bar), and errors are recorded on the request, never raised;
5. `duration_s` runs from `t0` until the last request ended, and the client is closed.

A request succeeds iff HTTP 200, at least one chunk arrived, no error event came, and the stream
ended with `[DONE]` or a `finish_reason`. Output tokens: `usage.completion_tokens` of the last
message when the server reports usage, else the number of chunks that carried text.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
SCENARIO_HEADER = "X-PD-Scenario"
DEFAULT_SCENARIO = "default"  # requests of this scenario are sent without the header
ERROR_CHARS = 500


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: prompt (token ids or text), expected lengths, scenario, send time."""

    index: int
    prompt: str | list[int]
    input_len: int
    output_len: int
    scenario: str = DEFAULT_SCENARIO
    send_at: float = 0.0


@dataclass(frozen=True)
class ClientConfig:
    """Where and how requests are sent. `extra_body` is merged into every request body."""

    base_url: str
    model: str
    endpoint: str = "completions"
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float | None = None
    timeout_s: float = 600.0
    max_concurrency: int | None = None
    request_id_prefix: str = "bench-"
    send_scenario: bool = True  # X-PD-Scenario on requests of a non-default scenario
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {tuple(ENDPOINTS)}, got {self.endpoint!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request; times in s from the run's start (`t0`)."""

    index: int
    scenario: str
    scheduled_s: float
    send_s: float
    chunk_s: tuple[float, ...]  # arrival of every message with non-empty choices
    done_s: float
    input_len: int  # expected prompt tokens (the workload's)
    max_tokens: int  # output tokens asked for (the workload's output length)
    prompt_tokens: int  # usage.prompt_tokens if reported, else input_len
    output_tokens: int
    usage_reported: bool
    status: int | None
    error: str = ""

    @property
    def success(self) -> bool:
        return not self.error

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_s[0] - self.send_s if self.chunk_s else None

    @property
    def e2el_s(self) -> float | None:
        """Send to the last chunk (not to `[DONE]`), as vLLM."""
        return self.chunk_s[-1] - self.send_s if self.chunk_s else None

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    @property
    def queue_s(self) -> float:
        """Client-side wait between the scheduled time and the send (concurrency cap, lag)."""
        return max(0.0, self.send_s - self.scheduled_s)


@dataclass(frozen=True)
class LoadResult:
    records: list[RequestRecord]
    duration_s: float
    started_unix: float


def request_body(cfg: ClientConfig, req: BenchRequest) -> dict[str, Any]:
    """The JSON body vLLM's openai / openai-chat backends send (no pd-serve-only fields but the
    widely accepted `ignore_eos`, sent only when on)."""
    body: dict[str, Any] = {"model": cfg.model, "stream": True,
                            "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        text = req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt))
        body["messages"] = [{"role": "user", "content": text}]
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    return body | cfg.extra_body


def request_headers(cfg: ClientConfig, req: BenchRequest) -> dict[str, str]:
    headers = {"x-request-id": f"{cfg.request_id_prefix}{req.index}"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    if cfg.send_scenario and req.scenario != DEFAULT_SCENARIO:
        headers[SCENARIO_HEADER] = req.scenario
    return headers


class _Recorder:
    """Mutable per-request state while its stream is read."""

    def __init__(self, req: BenchRequest, t0: float) -> None:
        self.req, self.t0 = req, t0
        self.send_s = 0.0
        self.chunks: list[float] = []
        self.text_chunks = 0
        self.usage: dict[str, Any] | None = None
        self.status: int | None = None
        self.error = ""
        self.ended = False  # [DONE] or a finish_reason seen

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def message(self, msg: dict[str, Any], at: float) -> None:
        if isinstance(msg.get("error"), dict | str):
            self.error = "stream error" + _error_detail(msg["error"])
            return
        if isinstance(msg.get("usage"), dict):
            self.usage = msg["usage"]
        choices = msg.get("choices")
        if not choices:
            return
        self.chunks.append(at)
        choice = choices[0] if isinstance(choices[0], dict) else {}
        delta = choice.get("delta") or {}
        text = choice.get("text") or delta.get("content") or delta.get("reasoning_content")
        self.text_chunks += bool(text)
        if choice.get("finish_reason"):
            self.ended = True

    def record(self) -> RequestRecord:
        error = self.error
        if not error and not self.chunks:
            error = "no tokens received"
        elif not error and not self.ended:
            error = "stream ended before [DONE]"
        usage = self.usage or {}
        out = usage.get("completion_tokens")
        prompt = usage.get("prompt_tokens")
        reported = isinstance(out, int)
        return RequestRecord(
            self.req.index, self.req.scenario, self.req.send_at, self.send_s, tuple(self.chunks),
            self.now(), self.req.input_len, self.req.output_len,
            prompt if isinstance(prompt, int) else self.req.input_len,
            out if isinstance(out, int) else self.text_chunks, reported, self.status,
            error[:ERROR_CHARS])


async def _read_stream(rec: _Recorder, response: httpx.Response) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, `:` pings, `event:` lines
        data = line[5:].strip()
        if data == "[DONE]":
            rec.ended = True
            return
        at = rec.now()
        try:
            msg = json.loads(data)
        except json.JSONDecodeError:
            rec.error = f"malformed SSE data: {data[:200]}"
            return
        if isinstance(msg, dict):
            rec.message(msg, at)
        if rec.error:
            return


def _error_detail(err: Any) -> str:
    """` [code]: message` of an OpenAI error object (the code is kept so that e.g. the
    gateway's `ttft_deadline_exceeded` can be counted apart)."""
    if not isinstance(err, dict):
        return f": {err}"
    code = err.get("code")
    return f"{f' [{code}]' if code else ''}: {err.get('message', json.dumps(err))}"


def _http_error(status: int, body: bytes) -> str:
    try:
        detail = _error_detail(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        detail = ": " + body.decode(errors="replace").strip()
    return f"HTTP {status}{detail}"


async def send_one(client: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest, t0: float,
                   slots: asyncio.Semaphore | None = None) -> RequestRecord:
    """Waits until `req.send_at`, sends it and reads its stream; never raises on I/O errors."""
    rec = _Recorder(req, t0)
    await asyncio.sleep(max(0.0, req.send_at - rec.now()))
    if slots is not None:
        await slots.acquire()
    try:
        rec.send_s = rec.now()
        url = cfg.base_url.rstrip("/") + ENDPOINTS[cfg.endpoint]
        async with client.stream("POST", url, json=request_body(cfg, req),
                                 headers=request_headers(cfg, req)) as response:
            rec.status = response.status_code
            if response.status_code != 200:
                rec.error = _http_error(response.status_code, await response.aread())
            else:
                await _read_stream(rec, response)
    except Exception as exc:  # any failure belongs to the request, never to the run
        rec.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        if slots is not None:
            slots.release()
    return rec.record()


async def run_load(cfg: ClientConfig, requests: Sequence[BenchRequest],
                   on_done: Callable[[RequestRecord], None] | None = None) -> LoadResult:
    """Sends every request open-loop at its `send_at` and returns their records (same order)."""
    limits = httpx.Limits(max_connections=cfg.max_concurrency,
                          max_keepalive_connections=cfg.max_concurrency)
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.timeout_s)) as client:
        started = time.time()
        t0 = time.perf_counter()

        async def one(req: BenchRequest) -> RequestRecord:
            record = await send_one(client, cfg, req, t0, slots)
            if on_done is not None:
                on_done(record)
            return record

        records = await asyncio.gather(*(one(r) for r in requests))
        duration = time.perf_counter() - t0
    return LoadResult(list(records), duration, started)
