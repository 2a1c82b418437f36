"""Benchmark metrics from per-request records, with exactly the definitions of `vllm bench
serve` (`calculate_metrics`), plus SLO attainment (DistServe) and per-scenario views; pure.

* Latency statistics are over successful requests only; all reported in ms.
* TTFT: first chunk - send. E2EL: last chunk - send (not `[DONE]`).
* TPOT_i = (E2EL_i - TTFT_i) / (output_tokens_i - 1), only for output_tokens_i > 1 (request-
  weighted; a one-token request has no TPOT, and TPOT 0 for goodput).
* ITL: every gap between consecutive chunks of every request, pooled (chunk-weighted).
* mean, median, std (population, ddof 0) and `np.percentile` (linear); an empty list gives 0.
* duration: from just before the first dispatch until every request ended.
* request_throughput = completed / duration; output_throughput = sum output tokens / duration;
  total_token_throughput = (sum prompt + sum output tokens) / duration, over completed ones.
* A request is *good* iff it succeeded and meets every limit of its scenario's SLO (`<=`);
  request_goodput = good / duration (vLLM, null without SLO); slo_attainment = good / all
  requests, failed ones included (DistServe's attainment); ttft_slo_attainment likewise with the
  TTFT limit only (the gateway's TTFT-SLO success rate).
* max_output_tokens_per_s: chunk arrivals bucketed into 1-s bins from the first send (vLLM);
  max_concurrent_requests: exact sweep over the [send, last chunk) intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pd_serve.bench.client import RequestRecord
from pd_serve.bench.slo import SLO, SLOTable

METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True)
class Stats:
    """mean / median / std / percentiles of one metric, in ms."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]

    @staticmethod
    def of_seconds(values: Sequence[float], percentiles: Sequence[float]) -> Stats:
        ms = np.asarray(values, dtype=float) * 1000.0
        if ms.size == 0:
            return Stats(0.0, 0.0, 0.0, tuple((p, 0.0) for p in percentiles))
        return Stats(float(np.mean(ms)), float(np.median(ms)), float(np.std(ms)),
                     tuple((p, float(np.percentile(ms, p))) for p in percentiles))


@dataclass(frozen=True)
class BenchMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None
    slo_attainment: float | None
    ttft_slo_attainment: float | None
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    mean_client_queue_ms: float
    stats: tuple[tuple[str, Stats], ...]

    def stat(self, metric: str) -> Stats:
        return dict(self.stats)[metric]

    def to_dict(self) -> dict[str, Any]:
        """Flat dict with vLLM's result-JSON key names (`mean_ttft_ms`, `p99_itl_ms`, ...)."""
        out: dict[str, Any] = {
            "duration": self.duration_s, "completed": self.completed, "failed": self.failed,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "slo_attainment": self.slo_attainment,
            "ttft_slo_attainment": self.ttft_slo_attainment,
            "max_output_tokens_per_s": self.max_output_tokens_per_s,
            "max_concurrent_requests": self.max_concurrent_requests,
            "mean_client_queue_ms": self.mean_client_queue_ms}
        for name, s in self.stats:
            out[f"mean_{name}_ms"] = s.mean
            out[f"median_{name}_ms"] = s.median
            out[f"std_{name}_ms"] = s.std
            for p, v in s.percentiles:
                out[f"p{percentile_label(p)}_{name}_ms"] = v
        return out


def percentile_label(p: float) -> str:
    """vLLM's spelling: 99 -> '99', 99.9 -> '99.9'."""
    return str(int(p)) if float(p).is_integer() else str(p)


def tpot_s(rec: RequestRecord) -> float | None:
    """(E2EL - TTFT) / (output_tokens - 1) for a successful request with > 1 output tokens."""
    ttft, e2el = rec.ttft_s, rec.e2el_s
    if not rec.success or ttft is None or e2el is None or rec.output_tokens <= 1:
        return None
    return (e2el - ttft) / (rec.output_tokens - 1)


def meets(rec: RequestRecord, slo: SLO, ttft_only: bool = False) -> bool:
    """Whether a request is good under `slo` (failed: never; TPOT of <= 1 token: 0)."""
    ttft, e2el = rec.ttft_s, rec.e2el_s
    if not rec.success or ttft is None or e2el is None:
        return False
    limit = slo.ttft_limit_ms(rec.prompt_tokens)
    if limit is not None and ttft * 1000.0 > limit:
        return False
    if ttft_only:
        return True
    if slo.tpot_ms is not None and (tpot_s(rec) or 0.0) * 1000.0 > slo.tpot_ms:
        return False
    return slo.e2el_ms is None or e2el * 1000.0 <= slo.e2el_ms


def max_tokens_per_s(ok: Sequence[RequestRecord]) -> float:
    if not ok:
        return 0.0
    start = min(r.send_s for r in ok)
    end = max(r.chunk_s[-1] for r in ok)
    bins = np.zeros(int(np.ceil(end - start)) + 1)
    for r in ok:
        for t in r.chunk_s:
            bins[int(t - start)] += 1
    return float(bins.max())


def max_concurrency(ok: Sequence[RequestRecord]) -> int:
    events = sorted([(r.send_s, 1) for r in ok] + [(r.chunk_s[-1], -1) for r in ok])
    best = live = 0
    for _, delta in events:  # at equal times -1 sorts first: [start, end) intervals
        live += delta
        best = max(best, live)
    return best


def _per_s(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


def compute_metrics(records: Sequence[RequestRecord], duration_s: float,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                    slos: SLOTable | None = None) -> BenchMetrics:
    """Metrics of one run (or of one scenario's records, with the run's duration)."""
    ok = [r for r in records if r.success and r.chunk_s]
    values: dict[str, list[float]] = {
        "ttft": [r.chunk_s[0] - r.send_s for r in ok],
        "tpot": [t for t in map(tpot_s, ok) if t is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2el": [r.chunk_s[-1] - r.send_s for r in ok]}
    n_in = sum(r.prompt_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    goodput = attain = ttft_attain = None
    if slos is not None and not slos.empty:
        good = sum(meets(r, slos.of(r.scenario)) for r in ok)
        goodput = _per_s(good, duration_s)
        attain = good / len(records) if records else None
        with_ttft = [r for r in records if slos.of(r.scenario).has_ttft]
        if with_ttft:
            ttft_attain = sum(meets(r, slos.of(r.scenario), True) for r in with_ttft) / len(
                with_ttft)
    queue = [r.queue_s for r in records]
    return BenchMetrics(
        len(ok), len(records) - len(ok), duration_s, n_in, n_out, _per_s(len(ok), duration_s),
        _per_s(n_out, duration_s), _per_s(n_in + n_out, duration_s), goodput, attain,
        ttft_attain, max_tokens_per_s(ok), max_concurrency(ok),
        float(np.mean(queue) * 1000.0) if queue else 0.0,
        tuple((m, Stats.of_seconds(values[m], percentiles)) for m in METRICS))


def per_scenario(records: Sequence[RequestRecord], duration_s: float,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                 slos: SLOTable | None = None) -> dict[str, BenchMetrics]:
    """`compute_metrics` of each scenario's records (throughputs over the whole run)."""
    names = sorted({r.scenario for r in records})
    return {n: compute_metrics([r for r in records if r.scenario == n], duration_s,
                               percentiles, slos) for n in names}
