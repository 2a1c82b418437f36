"""Gateway metrics per scenario, aggregated from finished request timelines: TTFT, TPOT, E2E,
TTFT-SLO success rate, rejections per request, terminations; as JSON (`/stats`, percentiles
over a bounded window of recent samples) and in Prometheus text format (`/metrics`; names in
docs/metrics.md).

Lifecycle: `GatewayMetrics(scenarios, max_samples)` at start; `record(timeline)` once per
finished request; `snapshot()` and `prometheus()` at any time.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

from pd_serve.gateway.timeline import TERMINATED, Timeline

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REJECT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
PERCENTILES = (50, 90, 99)


def percentiles(samples: Iterable[float], ps: Sequence[int] = PERCENTILES) -> dict[str, float]:
    """Nearest-rank percentiles plus mean and count; empty input gives {"count": 0}."""
    xs = sorted(samples)
    if not xs:
        return {"count": 0}
    out: dict[str, float] = {"count": len(xs), "mean": sum(xs) / len(xs)}
    for p in ps:
        out[f"p{p}"] = xs[min(len(xs) - 1, max(0, -(-p * len(xs) // 100) - 1))]
    return out


@dataclass
class ScenarioStats:
    """Counts since start and the latest `max_samples` latency samples of one scenario."""

    max_samples: int
    outcomes: Counter[str] = field(default_factory=Counter)
    slo_met: int = 0
    slo_judged: int = 0
    rejections: int = 0
    ttft: deque[float] = field(init=False)
    tpot: deque[float] = field(init=False)
    e2e: deque[float] = field(init=False)
    rejects: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.ttft, self.tpot, self.e2e, self.rejects = (deque(maxlen=self.max_samples)
                                                        for _ in range(4))

    def record(self, tl: Timeline) -> None:
        self.outcomes[tl.outcome or "unknown"] += 1
        self.rejections += tl.rejections
        self.rejects.append(float(tl.rejections))
        slo = tl.in_slo()
        if slo is not None and tl.outcome != "cancelled":
            self.slo_judged += 1
            self.slo_met += int(slo)
        for samples, value in ((self.ttft, tl.ttft()), (self.tpot, tl.tpot()),
                               (self.e2e, tl.e2e())):
            if value is not None:
                samples.append(value)

    def snapshot(self) -> dict[str, Any]:
        requests = sum(self.outcomes.values())
        return {
            "requests": requests, "outcomes": dict(self.outcomes),
            "terminations": self.outcomes.get(TERMINATED, 0),
            "ttft_slo_success_rate": self.slo_met / self.slo_judged if self.slo_judged else None,
            "rejections": self.rejections,
            "rejections_per_request": percentiles(self.rejects),
            "ttft_s": percentiles(self.ttft), "tpot_s": percentiles(self.tpot),
            "e2e_s": percentiles(self.e2e),
        }


class GatewayMetrics:
    def __init__(self, scenarios: Sequence[str], max_samples: int) -> None:
        self.stats = {s: ScenarioStats(max_samples) for s in scenarios}
        self.registry = CollectorRegistry()
        r = self.registry
        self.p_requests = PromCounter("pd_gateway_requests", "Finished requests by outcome",
                                      ["scenario", "outcome"], registry=r)
        self.p_slo = PromCounter("pd_gateway_ttft_slo", "Requests judged against their TTFT "
                                 "deadline", ["scenario", "met"], registry=r)
        self.p_slo_rate = Gauge("pd_gateway_ttft_slo_success_rate", "Share of judged requests "
                                "that met their TTFT deadline since start", ["scenario"],
                                registry=r)
        self.p_rejects = Histogram("pd_gateway_rejections_per_request", "Prefill rejections "
                                   "per request", ["scenario"], buckets=REJECT_BUCKETS, registry=r)
        self.p_lat = {name: Histogram(f"pd_gateway_{name}_seconds", help_, ["scenario"],
                                      buckets=LATENCY_BUCKETS, registry=r)
                      for name, help_ in (("ttft", "Time to first token"),
                                          ("tpot", "Time per output token after the first"),
                                          ("e2e", "End-to-end latency of finished requests"))}

    def record(self, tl: Timeline) -> None:
        st = self.stats.get(tl.scenario)
        if st is None:
            return
        st.record(tl)
        self.p_requests.labels(tl.scenario, tl.outcome or "unknown").inc()
        self.p_rejects.labels(tl.scenario).observe(tl.rejections)
        slo = tl.in_slo()
        if slo is not None and tl.outcome != "cancelled":
            self.p_slo.labels(tl.scenario, str(slo).lower()).inc()
            self.p_slo_rate.labels(tl.scenario).set(st.slo_met / st.slo_judged)
        for name, value in (("ttft", tl.ttft()), ("tpot", tl.tpot()), ("e2e", tl.e2e())):
            if value is not None:
                self.p_lat[name].labels(tl.scenario).observe(value)

    def snapshot(self) -> dict[str, Any]:
        return {name: st.snapshot() for name, st in self.stats.items()}

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)
