"""The disaggregated deployment as real processes on loopback (torch backend, demo model): the
real `openai` client through the front end gets the aggregated server's greedy output token for
token in every hand-off mode; the first token leaves prefill before the hand-off; a full prefill
rejects and the front end retries; a killed decode ends its request with a clear error and frees
the prefill slot (mid-run, and mid-hand-off long before the hand-off timeout); a dead decode peer
is skipped and chosen again once it is back; a client cancel leaves both instances leak-free.
Every test ends with leak checks on the instances it used."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pd_serve.models.tokenizer import Tokenizer
from tests.e2e.pd_cluster import PDCluster, Proc
from tests.e2e.server_process import DEMO_MODEL, ServerProcess, free_port, write_config

pytestmark = pytest.mark.e2e
MODEL = "shakespeare-llama"
PROMPTS = ["ROMEO:\n", "KING HENRY:\nMy lords,", "First Citizen:\nBefore we proceed any "
           "further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n", "O", "\n\n"]
CHAT: Any = [{"role": "user", "content": "Good morrow, my lord."}]
MODES = ("bulk", "per_layer", "block_fixed")


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def greedy_outputs(client: openai.OpenAI) -> list[tuple[str | None, Any]]:
    """Completions (plain and streamed), a chat, and a request that ends at prefill."""
    outs: list[tuple[str | None, Any]] = []
    for i, prompt in enumerate(PROMPTS):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8 + 7 * i,
                                      temperature=0, extra_body={"ignore_eos": i % 2 == 0})
        outs.append((r.choices[0].text, r.usage.model_dump() if r.usage else None))
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24,
                                       temperature=0, stream=True)
    outs.append(("".join(c.choices[0].text for c in stream if c.choices), None))
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20,
                                          temperature=0)
    outs.append((chat.choices[0].message.content, chat.usage.model_dump() if chat.usage else 0))
    one = client.completions.create(model=MODEL, prompt="ROMEO:\n", max_tokens=1, temperature=0)
    outs.append((one.choices[0].text, one.choices[0].finish_reason))
    return outs


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str | None, Any]]]:
    tmp = tmp_path_factory.mktemp("agg")
    proc = ServerProcess(write_config(tmp / "serve.yaml", "torch"), tmp / "log").start()
    try:
        yield greedy_outputs(_client(proc.base))
    finally:
        proc.stop()


@pytest.fixture()
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PDCluster]:
    pd = dict(getattr(request, "param", {}))
    decodes = pd.pop("decodes", [{}])
    c = PDCluster(tmp_path, "torch", **pd)
    try:
        yield c.start(decodes)
    except Exception:
        print(c.logs())
        raise
    finally:
        c.stop()


def wait_clean(proc: Proc, timeout: float = 30.0) -> dict[str, Any]:
    """Waits until `proc` is idle and its engine and KV leak checks, run after now, pass."""
    since, deadline = time.time(), time.monotonic() + timeout
    while True:
        s = proc.stats()
        eng = s["engine"]
        if (eng["leak_check_time"] > since and eng["leak_check"] == "ok"
                and eng["open_requests"] == 0 and s["waiting_handoffs"] == 0
                and s.get("slots_busy", 0) == 0 and s.get("streams", 0) == 0
                and s["kv_leak_check"] == "ok"):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} not clean: {s}")
        time.sleep(0.2)


def wait_stats(proc: Proc, ok: Callable[[dict[str, Any]], bool],
               timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not ok(s := proc.stats()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name}: condition not met within {timeout} s: {s}")
        time.sleep(0.1)
    return s


def check_clean(c: PDCluster) -> None:
    assert c.prefill is not None
    for proc in (c.prefill, *[d for d in c.decodes if d.proc.poll() is None]):
        wait_clean(proc)


@pytest.mark.parametrize("cluster", [*({"handoff_mode": m} for m in MODES),
                                     {"handoff_layerwise": True}], indirect=True,
                         ids=[*MODES, "layerwise"])
def test_greedy_equals_aggregated(cluster: PDCluster,
                                  aggregated: list[tuple[str | None, Any]]) -> None:
    assert cluster.frontend is not None
    assert greedy_outputs(_client(cluster.frontend.url)) == aggregated
    check_clean(cluster)


def test_first_token_before_handoff(cluster: PDCluster) -> None:
    assert cluster.prefill is not None
    tok = Tokenizer(DEMO_MODEL)
    body = {"request_id": "raw-1", "prompt_token_ids": tok.encode(PROMPTS[2]),
            "sampling": {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}}
    seen: list[tuple[str, float, dict[str, Any]]] = []
    with httpx.stream("POST", f"{cluster.prefill.url}/internal/prefill", json=body,
                      timeout=60) as r:
        assert r.status_code == 200
        name = ""
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                seen.append((name, time.monotonic(), json.loads(line[5:])))
    assert [e[0] for e in seen] == ["first", "handoff"]
    first, handoff = seen[0][2], seen[1][2]
    assert first["prompt_tokens"] == len(body["prompt_token_ids"]) and not first["finished"]
    assert seen[0][1] <= seen[1][1]
    deltas = []
    with httpx.stream("GET", f"{handoff['decode_url']}/internal/stream/raw-1", timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                deltas.append(json.loads(line[5:]))
    assert deltas[-1]["finished"] and deltas[-1]["completion_tokens"] == 16
    assert deltas[-1]["text"].startswith(first["text"])
    check_clean(cluster)


# decode waits 0.5 s before each fetch, so the only slot stays busy long enough for the second
# concurrent request to meet it (without it a fast first hand-off made the test a race)
@pytest.mark.parametrize("cluster", [{"b_p": 1, "decodes": [{"fetch_delay_s": 0.5}]}],
                         indirect=True)
def test_full_prefill_rejects_and_frontend_retries(cluster: PDCluster) -> None:
    assert cluster.prefill is not None and cluster.frontend is not None
    tok = Tokenizer(DEMO_MODEL)
    body = {"request_id": "hold", "prompt_token_ids": tok.encode(PROMPTS[2] * 4),
            "sampling": {"max_tokens": 4, "temperature": 0.0}}
    with httpx.stream("POST", f"{cluster.prefill.url}/internal/prefill", json=body,
                      timeout=60) as held:
        assert held.status_code == 200  # the only slot stays busy until decode fetched the KV
        second = httpx.post(f"{cluster.prefill.url}/internal/prefill",
                            json={**body, "request_id": "second"}, timeout=60)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "no_free_slot"
        held.read()
    results: list[Any] = [None, None]

    def ask(i: int) -> None:
        results[i] = _client(cluster.frontend.url).completions.create(  # type: ignore[union-attr]
            model=MODEL, prompt=PROMPTS[2] * 3, max_tokens=12, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0].choices[0].text == results[1].choices[0].text
    assert cluster.frontend.stats()["prefill_rejections"] >= 1
    check_clean(cluster)


def test_decode_killed_mid_run(cluster: PDCluster) -> None:
    assert cluster.prefill is not None and cluster.frontend is not None
    client = _client(cluster.frontend.url)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1500,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError) as err:
        for i, _ in enumerate(stream):
            if i == 3:
                cluster.decodes[0].stop(signal.SIGKILL)
    assert "instance" in str(err.value) or "decode" in str(err.value)
    wait_clean(cluster.prefill)
    new = cluster.add_decode()
    r = httpx.post(f"{cluster.prefill.url}/internal/assign",
                   json={"role": "prefill", "decode_peers": [new.url]}, timeout=30)
    assert r.status_code == 200
    again = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                      temperature=0)
    assert again.choices[0].finish_reason in ("length", "stop")
    check_clean(cluster)


@pytest.mark.parametrize("cluster", [{"handoff_timeout_s": 60.0,
                                      "decodes": [{"fetch_delay_s": 60.0}, {}]}],
                         indirect=True, ids=["slow-fetch-decode+spare"])
def test_decode_killed_mid_handoff_frees_slot_at_once(cluster: PDCluster) -> None:
    assert cluster.prefill is not None and cluster.frontend is not None
    prefill, (slow, spare) = cluster.prefill, cluster.decodes
    client = _client(cluster.frontend.url)
    failure: list[BaseException] = []

    def ask() -> None:  # the hand-off to `slow` stays pending: it waits 60 s before fetching
        try:
            for _ in client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16,
                                               temperature=0, stream=True):
                pass
        except BaseException as exc:  # noqa: BLE001 - asserted below
            failure.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    s = wait_stats(prefill, lambda s: s["waiting_handoffs"] == 1)
    assert s["slots_busy"] == 1 and slow.stats()["fetching"] == 1
    slow.stop(signal.SIGKILL)
    # Freed by the liveness probe, not by the 60 s hand-off timeout (the counters say which).
    s = wait_stats(prefill, lambda s: s["slots_busy"] == 0, timeout=30.0)
    assert s["handoffs_lost_to_dead_peers"] == 1 and s["handoff_timeouts"] == 0
    assert s["dead_decode_peers"] == [slow.url]
    assert f"decode peer {slow.url} died with 1 hand-off(s) pending" in prefill.log()
    asker.join(30)
    assert len(failure) == 1 and isinstance(failure[0], openai.APIError)
    assert "lost the instance serving the request" in str(failure[0])
    again = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                      temperature=0)
    assert again.choices[0].finish_reason in ("length", "stop")
    assert spare.stats()["engine"]["steps"] > 0
    check_clean(cluster)


def test_dead_decode_peer_is_skipped_then_used_again(cluster: PDCluster) -> None:
    assert cluster.prefill is not None and cluster.frontend is not None
    prefill, live, port = cluster.prefill, cluster.decodes[0], free_port()
    down = f"http://127.0.0.1:{port}"  # nothing listens here yet
    r = httpx.post(f"{prefill.url}/internal/assign",
                   json={"role": "prefill", "decode_peers": [down, live.url]}, timeout=30)
    assert r.status_code == 200
    client = _client(cluster.frontend.url)
    for prompt in PROMPTS[:3]:  # `down` ranks first (nothing in flight, configured order)
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop")
    wait_stats(prefill, lambda s: s["dead_decode_peers"] == [down], timeout=10.0)
    back = cluster.add_decode(port=port)
    wait_stats(prefill, lambda s: s["dead_decode_peers"] == [], timeout=10.0)
    for prompt in PROMPTS[:2]:  # the tie order rotates per hand-off: one of two goes to `back`
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop")
    assert back.stats()["engine"]["steps"] > 0
    check_clean(cluster)


@pytest.mark.parametrize("cluster", [{}, {"handoff_layerwise": True}], indirect=True,
                         ids=["staged", "layerwise"])
def test_client_cancel_leaves_no_leaks(cluster: PDCluster) -> None:
    assert cluster.frontend is not None
    stream = _client(cluster.frontend.url).completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=1500, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    check_clean(cluster)
    assert cluster.decodes[0].stats()["engine"]["caller_aborts"] >= 1


@pytest.mark.parametrize("cluster", [{"handoff_layerwise": True}], indirect=True)
def test_layerwise_handoff_ended_by_prefill_frees_both_sides(cluster: PDCluster) -> None:
    """Decode is engaged before the prefill: a prefill that fails (a token id the engine
    refuses) or a request that ends at its first token ends the hand-off on both sides, with
    nothing left held and no decode failure counted; then a normal request goes through."""
    assert cluster.prefill is not None and cluster.frontend is not None
    tok = Tokenizer(DEMO_MODEL)
    for rid, ids, max_tokens, want in (
            ("bad-token", [5, 10**6, 7], 4, ["error"]),  # the engine refuses it: prefill_failed
            ("one", tok.encode(PROMPTS[1]), 1, ["first"])):
        body = {"request_id": rid, "prompt_token_ids": ids,
                "sampling": {"max_tokens": max_tokens, "temperature": 0.0}}
        events = []
        with httpx.stream("POST", f"{cluster.prefill.url}/internal/prefill", json=body,
                          timeout=60) as r:
            assert r.status_code == 200
            events = [line[6:].strip() for line in r.iter_lines() if line.startswith("event:")]
        assert events == want
        check_clean(cluster)
    assert cluster.decodes[0].stats()["failed_handoffs"] == 0  # ended by prefill: no failure
    done = _client(cluster.frontend.url).completions.create(model=MODEL, prompt=PROMPTS[0],
                                                            max_tokens=6, temperature=0)
    assert done.usage is not None and done.usage.completion_tokens == 6
    check_clean(cluster)


@pytest.mark.parametrize("cluster", [{"handoff_layerwise": True, "decode_staging_buffers": 2}],
                         indirect=True)
def test_layerwise_concurrent_requests_equal_sequential(cluster: PDCluster) -> None:
    """Four requests at once (two layer-wise reads at a time on decode) give the same greedy
    text as the same requests one by one."""
    assert cluster.frontend is not None
    client = _client(cluster.frontend.url)

    def ask(prompt: str) -> str | None:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text

    one_by_one = [ask(p) for p in PROMPTS[:4]]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, PROMPTS[:4])) == one_by_one
    check_clean(cluster)


@pytest.mark.slow
def test_mindspore_greedy_equals_aggregated(tmp_path: Path,
                                            aggregated: list[tuple[str | None, Any]]) -> None:
    c = PDCluster(tmp_path, "mindspore", threads=1)
    try:
        c.start()
        assert c.frontend is not None
        assert greedy_outputs(_client(c.frontend.url)) == aggregated
        check_clean(c)
    finally:
        c.stop()
