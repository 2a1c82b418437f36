"""Arrival processes of the load generator: send times (s from the start of a run) from a
trace's timestamps or from a Poisson, gamma or constant process at a rate; pure and seeded.

Definitions follow `vllm bench serve` (`get_request`):
* gamma: inter-arrival gaps i.i.d. `Gamma(shape=burstiness, scale=1 / (rate * burstiness))`,
  so the mean gap is `1 / rate` and the coefficient of variation `1 / sqrt(burstiness)`;
  burstiness 1 is Poisson, < 1 burstier, > 1 smoother. The first request is also delayed by
  one gap. With `normalize` (vLLM's default) the cumulative times are rescaled so the last
  request is sent at exactly `n / rate`, which removes the seed-dependent drift of duration.
* rate `inf`: every request at t = 0 (a throughput test: TTFT then measures queueing).
* constant: request i at `(i + 1) / rate`.
* trace: timestamps minus the first one (vLLM uses them as absolute offsets; we start a slice
  at its first request), times `time_scale`; `spread` first spreads requests that share a
  quantised timestamp evenly over the gap to the next one (`traces.spread_buckets`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pd_serve.bench.traces import TraceRequest, spread_buckets

PROCESSES = ("trace", "poisson", "gamma", "constant")


@dataclass(frozen=True)
class ArrivalSpec:
    """How send times are drawn. `rate` (req/s) drives poisson/gamma/constant; for `trace` it is
    optional: when set, the trace's timestamps are compressed or stretched so its mean rate is
    `rate` (shape kept), else they are multiplied by `time_scale`."""

    process: str = "poisson"
    rate: float | None = math.inf
    burstiness: float = 1.0
    time_scale: float = 1.0
    spread: bool = False
    bucket_s: float = 3.0
    seed: int = 0
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.process not in PROCESSES:
            raise ValueError(f"arrival process must be one of {PROCESSES}, got {self.process!r}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 req/s (or inf), got {self.rate}")
        if self.rate is None and self.process != "trace":
            raise ValueError(f"the {self.process} process needs a rate")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        if not self.bucket_s > 0:
            raise ValueError(f"bucket_s must be > 0, got {self.bucket_s}")


def gamma_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0,
                normalize: bool = True) -> list[float]:
    """Send times of `n` requests with gamma gaps (burstiness 1: Poisson); rate inf: all 0."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    if normalize and times[-1] > 0:
        times *= (n / rate) / times[-1]
    return [float(t) for t in times]


def poisson_times(n: int, rate: float, seed: int = 0, normalize: bool = True) -> list[float]:
    """Send times of a Poisson process (exponential gaps of mean `1 / rate`)."""
    return gamma_times(n, rate, 1.0, seed, normalize)


def constant_times(n: int, rate: float) -> list[float]:
    """Request i at `(i + 1) / rate` (rate inf: all at 0)."""
    if math.isinf(rate):
        return [0.0] * max(n, 0)
    return [(i + 1) / rate for i in range(max(n, 0))]


def native_rate(times: Sequence[float]) -> float | None:
    """Mean rate of a timestamp sequence, `(n - 1) / span`; None when it has no span."""
    if len(times) < 2:
        return None
    span = max(times) - min(times)
    rate = (len(times) - 1) / span if span > 0 else math.inf
    return rate if math.isfinite(rate) else None


def trace_times(requests: Sequence[TraceRequest], time_scale: float = 1.0,
                rate: float | None = None, spread: bool = False,
                bucket_s: float = 3.0) -> list[float]:
    """Send times from the requests' timestamps (see the module docstring); with `rate` the
    scale is `native rate / rate` instead of `time_scale` (a trace without span: all at 0)."""
    if not requests:
        return []
    reqs = spread_buckets(requests, bucket_s) if spread else list(requests)
    stamps = [r.arrival_s for r in reqs]
    first = min(stamps)
    if rate is not None:
        native = native_rate(stamps)
        time_scale = 0.0 if native is None or math.isinf(rate) else native / rate
    return [(t - first) * time_scale for t in stamps]


def schedule(spec: ArrivalSpec, requests: Sequence[TraceRequest]) -> list[float]:
    """Send time of every request (same order), by `spec`."""
    n = len(requests)
    if spec.process == "trace":
        return trace_times(requests, spec.time_scale, spec.rate, spec.spread, spec.bucket_s)
    assert spec.rate is not None  # checked in ArrivalSpec
    if spec.process == "constant":
        return constant_times(n, spec.rate)
    burst = 1.0 if spec.process == "poisson" else spec.burstiness
    return gamma_times(n, spec.rate, burst, spec.seed, spec.normalize)
