"""Calibration probes of tools/validate_sim.py: small workloads sent to the real deployment with
the bench client (pd_serve.bench.client), never the validation requests. `run_probes` returns
the raw measurements only (profile-independent); tools/validate_sim_calibrate.py fits them.

Probes, in order: warm-up; bare RTT (GET /health of the prefill instance); first-token path
(lone prompts of 16 and 64 tokens, one output token); lone prefills of 256, 512 and 1,024
tokens; steady decode steps for B = 1, 2, 4, 8, 16 at context ~64 and for 16 at context ~1,100;
co-location (a small decode batch alone, then while prefill-only requests run back to back).
Prompts are random token ids from one seeded generator, so a run sends the same prompts.
The decode and co-location probes are repeated until two repetitions agree within the
tolerance (tools/validate_sim_checks.py); `consistency` in the result reports every try.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np
from validate_sim_checks import repeat_until_agree
from validate_sim_lib import MODEL, VOCAB, Deployment

from pd_serve.bench.client import (
    BenchRequest,
    ClientConfig,
    LoadResult,
    RequestRecord,
    run_load,
)

COLOC_DECODE = (256, 600, 2)  # prompt, output, batch of the co-location probe's decode batch
COLOC_PREFILL = (16, 512)  # prompt tokens of its prefill loop (short: path; long: compute)

_rng = np.random.default_rng(12345)


def _prompt(n: int) -> list[int]:
    return [int(x) for x in _rng.integers(3, VOCAB, n)]


def _reqs(shapes: list[tuple[int, int]]) -> list[BenchRequest]:
    return [BenchRequest(i, _prompt(n), n, o) for i, (n, o) in enumerate(shapes)]


def _client(url: str) -> ClientConfig:
    return ClientConfig(url, MODEL, temperature=0.0, request_id_prefix="probe-")


def send_load(url: str, shapes: list[tuple[int, int]]) -> LoadResult:
    """`shapes` (prompt, output tokens) sent at once (all must succeed)."""
    res = asyncio.run(run_load(_client(url), _reqs(shapes)))
    check(res)
    return res


def check(res: LoadResult) -> None:
    bad = [r.error for r in res.records if not r.success]
    if bad:
        raise RuntimeError(f"probe failed: {bad[0]}")


def send(url: str, shapes: list[tuple[int, int]]) -> list[RequestRecord]:
    return send_load(url, shapes).records


def ttft(r: RequestRecord) -> float:
    assert r.ttft_s is not None
    return r.ttft_s


def steady_window(res: LoadResult) -> tuple[float, float]:
    """(start, end), unix seconds, of the part of a batch's run in which every request of it
    is decoding: from the last one's first decode chunk (its 2nd) to the first one's last."""
    t0 = res.started_unix
    return (t0 + max(r.chunk_s[1] for r in res.records),
            t0 + min(r.chunk_s[-1] for r in res.records))


def steady_steps(res: LoadResult) -> dict[str, Any]:
    """The decode batch's inter-chunk gaps (one chunk per token) inside its steady window:
    mean step time (TPOT is a mean of gaps, so the occasional slow step counts), median, and
    the mean context at mid-window."""
    a, b = steady_window(res)
    t0 = res.started_unix
    gaps = [y - x for r in res.records for x, y in zip(r.chunk_s, r.chunk_s[1:])
            if t0 + x >= a and t0 + y <= b]
    mid = (a + b) / 2
    ctx = [r.prompt_tokens + sum(1 for c in r.chunk_s if t0 + c <= mid) for r in res.records]
    one_per_token = all(len(r.chunk_s) == r.output_tokens for r in res.records)
    if not gaps:
        raise RuntimeError("probe: no steady decode window (raise the output length)")
    return {"batch": len(res.records), "step_s": float(np.mean(gaps)),
            "median_step_s": float(np.median(gaps)), "gaps": len(gaps),
            "context": float(np.mean(ctx)), "max_context": int(max(ctx)),
            "one_chunk_per_token": one_per_token}


async def _decode_under_prefill(url: str, batch: list[tuple[int, int]], prompts: list[int],
                                ) -> tuple[LoadResult, list[LoadResult]]:
    """The decode batch while prefill-only requests of `prompts` tokens (in turn) run back to
    back."""
    cfg = _client(url)
    prefills: list[LoadResult] = []
    task = asyncio.create_task(run_load(cfg, _reqs(batch)))
    while not task.done():
        n = prompts[len(prefills) % len(prompts)]
        prefills.append(await run_load(cfg, _reqs([(n, 1)])))
    return await task, prefills


def measure_rtt(url: str, n: int = 60) -> float:
    """Median time of GET /health (the first 10 are warm-up)."""
    with httpx.Client() as c:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            c.get(f"{url}/health")
            times.append(time.perf_counter() - t0)
    return float(np.median(times[10:]))


def run_probes(dep: Deployment, quick: bool, tol: float) -> dict[str, Any]:
    """Raw probe measurements (profile-independent; the fits are made in `calibrate`)."""
    url, reps, tries = dep.url, (2 if quick else 6), (2 if quick else 4)
    send(url, [(64, 16)] * 4)  # warm-up: first requests pay connection and allocator costs
    out: dict[str, Any] = {"rtt_bare_s": measure_rtt(dep.prefill.url)}
    path: dict[str, list[float]] = {"16": [], "64": []}
    for _ in range(reps):
        for n in (16, 64):
            path[str(n)].append(ttft(send(url, [(n, 1)])[0]))
    out["first_token_path"] = path
    out["prefill_lone_s"] = {str(n): [ttft(send(url, [(n, 1)])[0])
                                      for _ in range(2 if quick else 3)]
                             for n in (256, 512, 1024)}
    consistency: dict[str, Any] = {}
    out["decode_ctx64"] = [decode_probe(url, [(64, 128)] * b, tol, tries, consistency,
                                        f"decode_b{b}_ctx64") for b in (1, 2, 4, 8, 16)]
    out["decode_b16_ctx1024"] = decode_probe(url, [(1024, 200)] * 16, tol, tries, consistency,
                                             "decode_b16_ctx1024")
    out["colocation"], consistency["colocation"] = colocation_probe(url, tol, tries)
    out["consistency"] = consistency
    return out


def decode_probe(url: str, shapes: list[tuple[int, int]], tol: float, tries: int,
                 report: dict[str, Any], name: str) -> dict[str, Any]:
    """`steady_steps` of a decode batch, repeated until two repetitions agree (mean step
    within `tol`); the kept repetitions merged (mean step, summed gaps)."""
    kept, report[name] = repeat_until_agree(lambda: steady_steps(send_load(url, shapes)),
                                            lambda s: {"step_s": s["step_s"]}, tol,
                                            max_tries=tries)
    return {"batch": kept[0]["batch"], "step_s": float(np.mean([s["step_s"] for s in kept])),
            "median_step_s": float(np.mean([s["median_step_s"] for s in kept])),
            "gaps": sum(s["gaps"] for s in kept),
            "context": float(np.mean([s["context"] for s in kept])),
            "max_context": max(s["max_context"] for s in kept),
            "one_chunk_per_token": all(s["one_chunk_per_token"] for s in kept),
            "repetitions": kept}


def colocation_probe(url: str, tol: float, tries: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Co-location at the validation workload's operating point: a small decode batch (short,
    Python-heavy steps, many SSE events) alone and while prefill-only requests of mid-length
    prompts (where TTFT p50 lies) run back to back; the prefills' TTFTs inside the batch's
    steady window. Repeated until two repetitions agree within `tol` on the decode step alone,
    the step under the prefill loop and the long prompt's median TTFT under decode (the
    quantities f_d and f_p come from); the kept ones are pooled. Returns (the probe, the
    consistency report)."""
    batch = [(COLOC_DECODE[0], COLOC_DECODE[1])] * COLOC_DECODE[2]
    kept, report = repeat_until_agree(lambda: _colocation_rep(url, batch), _colocation_summary,
                                      tol, max_tries=tries)
    pre: dict[str, list[float]] = {str(n): [] for n in COLOC_PREFILL}
    for rep in kept:
        for n, ts in rep["prefill_ttft_s"].items():
            pre[n].extend(ts)
    return {"decode_batch": f"{COLOC_DECODE[2]} x ({COLOC_DECODE[0]} prompt, "
                            f"{COLOC_DECODE[1]} output)",
            "prefill_loop": f"prompts of {COLOC_PREFILL} tokens in turn, 1 "
                            "output token, back to back",
            "decode_alone": [r["alone"] for r in kept],
            "decode_with_prefill": [r["loaded"] for r in kept],
            "prefill_with_decode_ttft_s": pre,
            # every prefill of the loop against the decode batch's steady window (seconds from
            # its start): how much of the window prefill computed, which a host model's f_d needs
            "prefill_loops": [r["loop"] for r in kept]}, report


def _colocation_rep(url: str, batch: list[tuple[int, int]]) -> dict[str, Any]:
    """One repetition of the co-location probe: the batch alone, then under the prefill loop."""
    alone = steady_steps(send_load(url, batch))
    d, ps = asyncio.run(_decode_under_prefill(url, batch, list(COLOC_PREFILL)))
    check(d)
    a, b = steady_window(d)
    loop: dict[str, Any] = {"window_s": b - a, "prefills": []}
    pre: dict[str, list[float]] = {str(n): [] for n in COLOC_PREFILL}
    for p in ps:
        check(p)
        r = p.records[0]
        loop["prefills"].append({"prompt": r.input_len, "ttft_s": ttft(r),
                                 "sent_s": p.started_unix + r.send_s - a})
        if a <= p.started_unix + r.send_s and p.started_unix + ttft(r) + r.send_s <= b:
            pre[str(r.input_len)].append(ttft(r))
    return {"alone": alone, "loaded": steady_steps(d), "loop": loop, "prefill_ttft_s": pre}


def _colocation_summary(rep: dict[str, Any]) -> dict[str, float]:
    """The checked quantities of a co-location repetition (the long prompt's TTFT over the
    whole loop if none fell inside the steady window)."""
    n = str(max(COLOC_PREFILL))
    long = rep["prefill_ttft_s"][n] or [p["ttft_s"] for p in rep["loop"]["prefills"]
                                        if str(p["prompt"]) == n]
    return {"decode_alone_step_s": rep["alone"]["step_s"],
            "decode_loaded_step_s": rep["loaded"]["step_s"],
            "long_prefill_ttft_s": float(np.median(long)) if long else float("nan")}
