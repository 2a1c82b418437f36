"""The bench client (pd_serve.bench.client) against `FakeOpenAI`, a small OpenAI-compatible
server on a loopback port that streams tokens with known delays: measured TTFT and ITL are
within tolerance of the fake's delays, usage gives the token counts (also when one chunk carries
several tokens), and failures (HTTP 503, an error event, a stream cut mid-way, connection
refused, a missing [DONE]) are recorded on the request without stopping the run; the CLI writes
its JSON and plots; workload prompts keep the trace's prefix sharing and fit the context."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from typer.testing import CliRunner

from pd_serve.bench.arrivals import ArrivalSpec
from pd_serve.bench.cli import bench_app
from pd_serve.bench.client import BenchRequest, ClientConfig, request_body, run_load
from pd_serve.bench.metrics import compute_metrics
from pd_serve.bench.runner import BenchSettings, discover, run_point
from pd_serve.bench.slo import parse_goodput
from pd_serve.bench.traces import Trace, TraceRequest
from pd_serve.bench.workload import WorkloadSpec, build_requests, fit, load_workload, prompt_of
from tests.e2e.server_process import free_port
from tests.fake_orchestrator import Served

TTFT_S, ITL_S = 0.20, 0.05
MODEL = "fake-model"


def _chunk(text: str, finish: str | None = None, chat: bool = False) -> str:
    choice: dict[str, Any] = ({"index": 0, "delta": {"content": text}} if chat
                              else {"index": 0, "text": text})
    choice["finish_reason"] = finish
    return "data: " + json.dumps({"id": "x", "object": "chunk", "choices": [choice]}) + "\n\n"


class FakeOpenAI:
    """Streams `max_tokens` tokens: the first after TTFT_S, then one every ITL_S. The scenario
    header picks a behaviour: `http503`, `error_event` (error after 2 tokens), `cut` (connection
    dropped after 2 tokens), `no_done` (ends without [DONE] or finish_reason), `pairs` (two
    tokens per chunk), `no_usage` (no usage message)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions", response_model=None)(self.completions)
        self.app.post("/v1/chat/completions", response_model=None)(self.chat)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model",
                                            "max_model_len": 4096}]}

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        mode = request.headers.get("x-pd-scenario", "")
        if mode == "http503":
            return JSONResponse({"error": {"message": "no capacity", "code": "busy"}}, 503)
        n = body.get("max_tokens") or body.get("max_completion_tokens")
        prompt = body.get("prompt") or body["messages"][0]["content"]
        return StreamingResponse(self._stream(mode, n, len(prompt), chat),
                                 media_type="text/event-stream")

    async def _stream(self, mode: str, n: int, n_prompt: int, chat: bool) -> AsyncIterator[str]:
        await asyncio.sleep(TTFT_S)
        per = 2 if mode == "pairs" else 1
        sent = 0
        while sent < n:
            if sent == 2 and mode == "error_event":
                yield "data: " + json.dumps({"error": {"message": "decode died"}}) + "\n\n"
                yield "data: [DONE]\n\n"
                return
            if sent == 2 and mode == "cut":
                raise RuntimeError("connection dropped on purpose")
            k = min(per, n - sent)
            sent += k
            last = sent >= n
            yield _chunk("ab"[:k], "length" if last and mode != "no_done" else None, chat)
            if not last:
                await asyncio.sleep(ITL_S)
        if mode == "no_done":
            return
        if mode != "no_usage":
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n,
                     "total_tokens": n_prompt + n}
            yield "data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"
        yield ": ping\n\ndata: [DONE]\n\n"


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeOpenAI, str]]:
    server = FakeOpenAI()
    served = Served(server.app).start()
    yield server, served.url
    served.stop()


def _req(i: int, scenario: str = "default", out: int = 6, at: float = 0.0) -> BenchRequest:
    return BenchRequest(i, [5, 6, 7, 8], 4, out, scenario, at)


def _run(cfg: ClientConfig, reqs: list[BenchRequest]) -> Any:
    return asyncio.run(run_load(cfg, reqs))


def test_ttft_and_itl_match_the_fakes_delays(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    res = _run(ClientConfig(url, MODEL), [_req(i, out=6) for i in range(3)])
    for rec in res.records:
        assert rec.success, rec.error
        assert rec.status == 200 and rec.usage_reported
        assert (rec.prompt_tokens, rec.output_tokens) == (4, 6)
        assert rec.ttft_s is not None and TTFT_S <= rec.ttft_s < TTFT_S + 0.25
        assert len(rec.itl_s) == 5
        assert abs(statistics.mean(rec.itl_s) - ITL_S) < 0.03
        assert min(rec.itl_s) > ITL_S * 0.5
    m = compute_metrics(res.records, res.duration_s)
    assert m.completed == 3 and m.failed == 0
    assert abs(m.stat("tpot").mean - 1000 * ITL_S) < 30
    body = server.bodies[-1]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 6 and body["ignore_eos"] is True
    assert body["prompt"] == [5, 6, 7, 8] and body["model"] == MODEL
    assert "x-pd-scenario" not in server.headers[-1]  # default scenario: no header


def test_send_times_follow_the_schedule(fake: tuple[FakeOpenAI, str]) -> None:
    _, url = fake
    res = _run(ClientConfig(url, MODEL), [_req(0, out=1, at=0.0), _req(1, out=1, at=0.4)])
    a, b = res.records
    assert a.success and b.success
    assert 0.35 < b.send_s - a.send_s < 0.6
    assert b.output_tokens == 1 and b.itl_s == []


def test_multi_token_chunks_count_tokens_from_usage(fake: tuple[FakeOpenAI, str]) -> None:
    _, url = fake
    (rec,) = _run(ClientConfig(url, MODEL), [_req(0, "pairs", out=6)]).records
    assert rec.success, rec.error
    assert len(rec.chunk_s) == 3 and len(rec.itl_s) == 2  # one ITL entry per chunk, as vLLM
    assert rec.output_tokens == 6


def test_without_usage_tokens_are_counted_per_text_chunk(fake: tuple[FakeOpenAI, str]) -> None:
    _, url = fake
    (rec,) = _run(ClientConfig(url, MODEL), [_req(0, "no_usage", out=4)]).records
    assert rec.success and not rec.usage_reported
    assert rec.output_tokens == 4 and rec.prompt_tokens == 4  # prompt: the workload's length


def test_chat_endpoint(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    cfg = ClientConfig(url, MODEL, endpoint="chat", ignore_eos=False, temperature=0.0)
    req = BenchRequest(0, "the of and", 3, 3)
    (rec,) = _run(cfg, [req]).records
    assert rec.success, rec.error
    assert rec.output_tokens == 3 and len(rec.chunk_s) == 3
    body = server.bodies[-1]
    assert body["messages"] == [{"role": "user", "content": "the of and"}]
    assert body["max_completion_tokens"] == 3 and "ignore_eos" not in body
    assert body["temperature"] == 0.0
    assert request_body(cfg, req) == body


@pytest.mark.parametrize("mode, status, error", [
    ("http503", 503, "HTTP 503 [busy]: no capacity"),
    ("error_event", 200, "stream error: decode died"),
    ("cut", 200, "RemoteProtocolError"),
    ("no_done", 200, "stream ended before [DONE]"),
])
def test_failures_are_recorded_not_raised(fake: tuple[FakeOpenAI, str], mode: str,
                                          status: int, error: str) -> None:
    server, url = fake
    res = _run(ClientConfig(url, MODEL), [_req(0, mode), _req(1)])
    bad, good = res.records
    assert not bad.success and bad.status == status
    assert error in bad.error
    assert good.success, good.error
    assert any(h.get("x-pd-scenario") == mode for h in server.headers)
    m = compute_metrics(res.records, res.duration_s)
    assert (m.completed, m.failed) == (1, 1)


def test_connection_refused_is_a_failed_request() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    res = _run(ClientConfig(url, MODEL), [_req(0), _req(1)])
    assert all(not r.success and r.status is None for r in res.records)
    assert all("ConnectError" in r.error for r in res.records)
    assert discover(url) == (None, None)


def test_max_concurrency_queues_on_the_client(fake: tuple[FakeOpenAI, str]) -> None:
    _, url = fake
    res = _run(ClientConfig(url, MODEL, max_concurrency=1), [_req(i, out=2) for i in range(3)])
    recs = sorted(res.records, key=lambda r: r.send_s)
    assert all(r.success for r in recs)
    for a, b in zip(recs, recs[1:]):
        assert b.send_s >= a.done_s - 0.01  # one in flight at a time
    assert recs[-1].queue_s > 2 * TTFT_S  # waited for two before it
    assert compute_metrics(res.records, res.duration_s).max_concurrent_requests == 1


def test_run_point_end_to_end_with_slos(fake: tuple[FakeOpenAI, str]) -> None:
    _, url = fake
    assert discover(url) == (MODEL, 4096)
    settings = BenchSettings(
        ClientConfig(url, MODEL),
        WorkloadSpec(num_prompts=4, input_len=8, output_len=3, scenario="pairs"),
        ArrivalSpec("poisson", 50.0, seed=1), slos=parse_goodput(["ttft:5000,tpot:1000"]),
        progress=False)
    res = run_point(settings)
    assert res.metrics.completed == 4 and res.errors == {}
    assert res.metrics.slo_attainment == 1.0 and res.metrics.request_goodput is not None
    assert set(res.scenarios) == {"pairs"}


def test_cli_run_and_sweep_write_json_and_plots(fake: tuple[FakeOpenAI, str],
                                                tmp_path: Path) -> None:
    _, url = fake
    common = ["--base-url", f"{url}/v1", "--num-prompts", "4", "--input-len", "6",
              "--output-len", "3", "--no-progress"]
    res = CliRunner().invoke(bench_app, [
        "run", *common, "--request-rate", "40", "--goodput", "ttft:5000,tpot:1000",
        "--percentiles", "50,99", "--result", str(tmp_path / "run.json"), "--save-requests",
        "--plot", str(tmp_path / "run.png"), "--metadata", "who=test"])
    assert res.exit_code == 0, res.output
    assert "Serving Benchmark Result" in res.output
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["schema"] == "pd-serve-bench-run/1" and data["metadata"] == {"who": "test"}
    assert data["server"] == {"base_url": url, "model": MODEL, "max_model_len": 4096}
    assert data["metrics"]["completed"] == 4 and data["metrics"]["slo_attainment"] == 1.0
    assert data["request_rate"] == 40 and data["arrival"] == "poisson"
    assert len(data["requests"]) == 4 and data["requests"][0]["output_tokens"] == 3
    assert (tmp_path / "run.png").stat().st_size > 0
    res = CliRunner().invoke(bench_app, [
        "sweep", *common, "--request-rate-list", "20,40", "--goodput", "ttft:5000",
        "--instances", "2", "--cooldown", "0", "--result", str(tmp_path / "sweep.json"),
        "--plot", str(tmp_path / "sweep.png")])
    assert res.exit_code == 0, res.output
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["rate"] for p in sweep["points"]] == [20, 40]
    assert sweep["sweep"]["max_rate"] == 40 and sweep["sweep"]["max_rate_per_instance"] == 20
    assert not sweep["sweep"]["bounded"]
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_cli_errors_are_one_line(fake: tuple[FakeOpenAI, str]) -> None:
    _, url = fake
    res = CliRunner().invoke(bench_app, ["sweep", "--base-url", url, "--num-prompts", "2",
                                         "--request-rate-list", "1"])
    assert res.exit_code == 2 and "needs an SLO" in res.output
    res = CliRunner().invoke(bench_app, ["run", "--base-url", url, "--goodput", "fast:1",
                                         "--num-prompts", "2"])
    assert res.exit_code == 2 and "--goodput" in res.output


def test_workload_prompts_keep_prefix_sharing_and_fit_the_context() -> None:
    a = TraceRequest(0.0, 1000, 300, (1, 2), scenario="chat", source="t:1")
    b = TraceRequest(1.0, 700, 50, (1, 9))
    spec = WorkloadSpec(traces=("t.jsonl",), block_tokens=16, max_model_len=40, max_output=8)
    fitted = fit(Trace("t", (a, b), timed=True, block_size=512), spec)
    fa, fb = fitted.requests
    assert (fa.input_len, fa.output_len, fa.scenario, fa.source) == (32, 8, "chat", "t:1")
    assert (fb.input_len, fb.output_len) == (22, 2)
    pa, pb = prompt_of(fitted, 0, spec), prompt_of(fitted, 1, spec)
    assert isinstance(pa, list) and isinstance(pb, list)
    assert len(pa) == 32 and len(pb) == 22
    assert pa[:16] == pb[:16] and pa[16:22] != pb[16:22]  # shared first block only
    assert prompt_of(fitted, 0, spec, salt=1) != pa  # a new salt: no cache carry-over
    bare = Trace("r", (TraceRequest(0.0, 5, 1),), timed=False)
    no_ids = prompt_of(bare, 0, spec)
    assert isinstance(no_ids, list) and len(no_ids) == 5 and min(no_ids) >= 3
    text = prompt_of(fitted, 0, replace(spec, prompt_mode="text"))
    assert isinstance(text, str) and len(text.split()) == 32


def test_several_traces_are_merged_one_scenario_each(tmp_path: Path) -> None:
    for name, ts in (("chat", 0), ("code", 500)):
        rows = [{"timestamp": ts + 1000 * i, "input_length": 600, "output_length": 20,
                 "hash_ids": [i, i + 1]} for i in range(3)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = WorkloadSpec(traces=(str(tmp_path / "chat.jsonl"), str(tmp_path / "code.jsonl")),
                        max_model_len=256)
    trace = fit(load_workload(spec), spec)
    assert trace.timed and len(trace.requests) == 6
    assert [r.scenario for r in trace.requests] == ["chat", "code"] * 3
    assert all(r.input_len + r.output_len <= 256 for r in trace.requests)


def test_random_workload_and_build_requests() -> None:
    spec = WorkloadSpec(num_prompts=50, input_len=100, output_len=10, range_ratio=0.5,
                        scenario="s", seed=3)
    reqs = build_requests(spec, ArrivalSpec("constant", 10.0))
    assert len(reqs) == 50 and all(r.scenario == "s" for r in reqs)
    assert all(50 <= r.input_len <= 150 and 5 <= r.output_len <= 15 for r in reqs)
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.input_len for r in reqs)
    assert [r.send_at for r in reqs[:3]] == pytest.approx([0.1, 0.2, 0.3])
    assert build_requests(spec, ArrivalSpec("constant", 10.0)) == reqs  # seeded
    with pytest.raises(ValueError, match="num-prompts"):
        WorkloadSpec()
