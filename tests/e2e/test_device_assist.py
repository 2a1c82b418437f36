"""The P/D-Device cloud assist (`POST /v1/device/assist`) on real processes (gateway, prefill,
decode; torch backend, demo model): the event order of the protocol, N bounds the cloud tokens
exactly, a stop ends early, handshake mismatches are 409s, greedy with rho = 1 gives the first
1 + N tokens of cloud-only serving, rho < 1 returns the rule's number of indices without
changing the tokens (MindSpore, slow: the same as torch), and closing the stream early frees
everything. Every test ends with leak checks on both instances."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pd_serve.gateway.assist_protocol import ASSIST_PATH, parse_event
from pd_serve.models.tokenizer import Tokenizer, tokenizer_hash
from tests.e2e.pd_cluster import PDCluster, running_cluster
from tests.e2e.server_process import DEMO_MODEL
from tests.e2e.test_pd_local import MODEL, PROMPTS, check_clean

pytestmark = pytest.mark.e2e
TOK = Tokenizer(DEMO_MODEL)
HASH = tokenizer_hash(DEMO_MODEL)
LONG = TOK.encode(PROMPTS[2] * 3)  # ~100 tokens


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDCluster]:
    with running_cluster(tmp_path_factory.mktemp("assist")) as c:
        yield c


@pytest.fixture()
def url(cluster: PDCluster) -> Iterator[str]:
    assert cluster.frontend is not None
    yield cluster.frontend.url + ASSIST_PATH
    check_clean(cluster)


def body(prompt: list[int], n: int, rho: float = 1.0, g: int = 64, window: int = 32,
         **sampling: Any) -> dict[str, Any]:
    return {"model": MODEL, "tokenizer_hash": HASH, "prompt_token_ids": prompt,
            "max_cloud_tokens": n, "refine_ratio": rho, "refine_window": window,
            "sampling": {"max_tokens": g, "temperature": 0.0, **sampling}}


def assist(url: str, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every event of one assist stream, each checked against its protocol model."""
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("POST", url, json=data, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for name, d in sse_lines(r):
            parse_event(name, d)
            events.append((name, d))
    return events


def tokens(events: list[tuple[str, dict[str, Any]]]) -> tuple[list[int], str]:
    """Token ids and text of the first and every `token` event."""
    picked = [d for e, d in events if e in ("first", "token")]
    return [d["token_id"] for d in picked], "".join(d["text"] for d in picked)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_event_order_and_n_bounds_cloud_tokens(url: str, n: int) -> None:
    events = assist(url, body(TOK.encode(PROMPTS[0]), n, ignore_eos=True))
    assert [e for e, _ in events] == ["meta", "first", "refined", *["token"] * n, "end"]
    meta, end = events[0][1], events[-1][1]
    assert meta["model"] == MODEL and meta["tokenizer_hash"] == HASH
    assert meta["prompt_tokens"] == len(TOK.encode(PROMPTS[0]))
    assert [d["index"] for e, d in events if e == "token"] == list(range(1, n + 1))
    assert end == {"reason": "budget", "cloud_tokens": 1 + n}
    assert events[1][1]["finished"] == (n == 0)
    assert events[2][1]["keep_indices"] == list(range(meta["prompt_tokens"]))


def test_user_budget_below_cloud_budget(url: str) -> None:
    events = assist(url, body(TOK.encode(PROMPTS[1]), 10, g=4, ignore_eos=True))
    assert [e for e, _ in events] == ["meta", "first", "refined", "token", "token", "token",
                                      "end"]
    assert events[-1][1] == {"reason": "length", "cloud_tokens": 4}
    assert events[-2][1]["finished"] and events[-2][1]["finish_reason"] == "length"


def test_stop_token_ends_early(url: str) -> None:
    prompt = TOK.encode(PROMPTS[1])
    ids, _ = tokens(assist(url, body(prompt, 12, ignore_eos=True)))
    j = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # first unseen token
    events = assist(url, body(prompt, 12, ignore_eos=True, stop_token_ids=[ids[j]]))
    assert events[-1][1] == {"reason": "stop", "cloud_tokens": j + 1}
    last = events[-2][1]
    assert last["finished"] and last["finish_reason"] == "stop" and last["token_id"] == ids[j]


def sse_lines(r: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    name = ""
    for line in r.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            yield name, json.loads(line[5:])


def cloud_only_ids(cluster: PDCluster, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy token ids of plain cloud serving (prefill, hand-off, decode) of `prompt`."""
    assert cluster.prefill is not None
    req = {"request_id": f"cloud-only-{max_tokens}", "prompt_token_ids": prompt,
           "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}
    with httpx.stream("POST", f"{cluster.prefill.url}/internal/prefill", json=req,
                      timeout=120) as r:
        events = dict(sse_lines(r))
    ids = [events["first"]["token_id"]]
    if "handoff" in events:
        url = f"{events['handoff']['decode_url']}/internal/stream/{req['request_id']}"
        with httpx.stream("GET", url, timeout=120) as r:
            ids += [t for _, d in sse_lines(r) for t in d["token_ids"]]
    return ids


@pytest.mark.parametrize("n", [0, 5, 20])
def test_greedy_rho1_equals_cloud_only(url: str, cluster: PDCluster, n: int) -> None:
    assert cluster.frontend is not None
    prompt = TOK.encode(PROMPTS[2])
    r = httpx.post(f"{cluster.frontend.url}/v1/completions", timeout=120,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 1 + n,
                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    ids, text = tokens(assist(url, body(prompt, n, g=200, ignore_eos=True)))
    assert text == r.json()["choices"][0]["text"]
    assert ids == cloud_only_ids(cluster, prompt, 200)[:1 + n]


@pytest.mark.parametrize(("rho", "window"), [(0.3, 8), (0.05, 32), (0.5, 0), (0.999, 4)])
def test_refined_indices_follow_the_rule(url: str, rho: float, window: int) -> None:
    full = assist(url, body(LONG, 6, ignore_eos=True))
    events = assist(url, body(LONG, 6, rho=rho, window=window, ignore_eos=True))
    refined = next(d for e, d in events if e == "refined")
    keep, length = refined["keep_indices"], len(LONG)
    want = min(length, max(math.ceil(rho * length - 1e-9), window))
    assert len(keep) == want and keep == sorted(set(keep))
    assert keep[len(keep) - min(window, length):] == list(range(length - window, length))
    assert refined["ratio_kept"] == pytest.approx(want / length)
    assert tokens(events) == tokens(full)  # scoring reads the cache only: same tokens
    again = assist(url, body(LONG, 6, rho=rho, window=window, ignore_eos=True))
    assert next(d for e, d in again if e == "refined") == refined


def test_refined_when_first_token_finishes(url: str) -> None:
    events = assist(url, body(LONG, 0, rho=0.25, window=4, g=1))
    assert [e for e, _ in events] == ["meta", "first", "refined", "end"]
    assert events[1][1]["finished"]
    assert len(events[2][1]["keep_indices"]) == math.ceil(0.25 * len(LONG))
    assert events[-1][1] == {"reason": "length", "cloud_tokens": 1}


def test_mismatches_are_409(url: str) -> None:
    prompt = TOK.encode(PROMPTS[0])
    r = httpx.post(url, json={**body(prompt, 2), "model": "other-model"}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 409 and err["code"] == "model_mismatch"
    assert "other-model" in err["message"] and MODEL in err["message"]
    r = httpx.post(url, json={**body(prompt, 2), "tokenizer_hash": "0" * 64}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 409 and err["code"] == "tokenizer_mismatch"
    assert "tokenizer" in err["message"] and err["param"] == "tokenizer_hash"


@pytest.mark.parametrize(("change", "param"), [
    ({"refine_ratio": 0.0}, "refine_ratio"), ({"refine_ratio": 1.5}, "refine_ratio"),
    ({"max_cloud_tokens": -1}, "max_cloud_tokens"), ({"prompt_token_ids": []}, "prompt_token_ids"),
    ({"surprise": 1}, "surprise"), ({"prompt_token_ids": [10 ** 7]}, "prompt_token_ids"),
    ({"sampling": {"max_tokens": 10 ** 6}}, "sampling.max_tokens"),
    ({"sampling": {"max_tokens": 8, "temperature": -1.0}}, "sampling")])
def test_bad_requests_are_400(url: str, change: dict[str, Any], param: str) -> None:
    r = httpx.post(url, json={**body(TOK.encode(PROMPTS[0]), 2), **change}, timeout=30)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param)


def test_closing_the_stream_early_frees_everything(url: str, cluster: PDCluster) -> None:
    assert cluster.frontend is not None
    decode = cluster.decodes[0]
    aborts = decode.stats()["engine"]["caller_aborts"]
    seen: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("POST", url, json=body(LONG, 1500, rho=0.5, g=1800, ignore_eos=True),
                      timeout=120) as r:
        for item in sse_lines(r):
            seen.append(item)
            if len(seen) == 6:
                break
    assert [e for e, _ in seen] == ["meta", "first", "refined", "token", "token", "token"]
    check_clean(cluster)
    rid = seen[0][1]["request_id"]
    tl = httpx.get(f"{cluster.frontend.url}/debug/requests/{rid}", timeout=10).json()
    assert tl["outcome"] == "cancelled" and tl["tokens"][-1]["completion_tokens"] < 1500
    assert decode.stats()["engine"]["caller_aborts"] == aborts + 1


@pytest.mark.slow
def test_mindspore_cloud_refines_like_torch(url: str, tmp_path_factory: pytest.TempPathFactory
                                            ) -> None:
    c = PDCluster(tmp_path_factory.mktemp("assist-ms"), "mindspore", threads=1)
    try:
        c.start()
        assert c.frontend is not None
        data = body(LONG, 8, rho=0.4, window=8, ignore_eos=True)
        ms, ref = assist(c.frontend.url + ASSIST_PATH, data), assist(url, data)
        assert tokens(ms) == tokens(ref)
        keep_ms, keep_ref = (next(d["keep_indices"] for e, d in ev if e == "refined")
                             for ev in (ms, ref))
        assert len(keep_ms) == len(keep_ref) == math.ceil(0.4 * len(LONG))
        assert len(set(keep_ms) & set(keep_ref)) >= 0.95 * len(keep_ref)  # near-ties may swap
        check_clean(c)
    except Exception:
        print(c.logs())
        raise
    finally:
        c.stop()
