"""Prometheus metrics of one instance (`GET /metrics`): gauges and counters read from the
Instance at scrape time, plus event metrics the role objects observe where things happen.
Names, types and labels are listed in docs/metrics.md.

Lifecycle:
1. each role object creates its event holder when it is built (`PrefillEvents` in PrefillRole,
   `DecodeEvents` in DecodeRole); their histograms belong to no registry, so any number of
   instances share one test process without name clashes; a role switch starts new holders
   (their counters restart at zero, which Prometheus treats as a counter reset);
2. `InstanceMetrics()` per Instance holds a private CollectorRegistry with one collector;
3. `render(inst)` reads the instance (role, group, draining, the engine's stats snapshot, slots,
   the roles' counters and event holders) and returns the Prometheus text exposition.
Nothing here blocks or touches the engine thread: engine numbers come from the snapshot the
engine thread refreshes (every 16 steps and when idle).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFILL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HANDOFF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
# pd_prefill_rejections_total{reason}: the 429 answers plus budgets gone before a slot came up.
REJECTION_REASONS = ("draining", "no_decode_peer", "no_free_slot", "queue_full",
                     "deadline_exceeded")
# pd_handoff_failures_total{reason}, per side (each failure is counted by one side only).
PREFILL_HANDOFF_FAILURES = ("stage_failed", "not_accepted", "confirm_timeout", "peer_lost")
DECODE_HANDOFF_FAILURES = ("reserve_failed", "fetch_failed")


class PrefillEvents:
    """What PrefillRole observes: prefill time to first token and hand-off failures."""

    def __init__(self) -> None:
        self.prefill_seconds = Histogram(
            "pd_prefill_seconds", "Time from a request's start in a slot to its first token",
            buckets=PREFILL_BUCKETS, registry=None)
        self.handoff_failures: Counter[str] = Counter()

    def handoff_failed(self, reason: str) -> None:
        self.handoff_failures[reason] += 1


class DecodeEvents:
    """What DecodeRole observes: hand-offs received (time, bytes), failures, decoded tokens."""

    def __init__(self) -> None:
        self.handoff_seconds = Histogram(
            "pd_handoff_seconds", "Decode side: from the hand-off request's arrival to its KV "
            "written into the reserved blocks", buckets=HANDOFF_BUCKETS, registry=None)
        self.handoff_bytes = 0
        self.handoff_failures: Counter[str] = Counter()
        self.decode_tokens = 0

    def handoff_done(self, num_bytes: int, arrived: float | None) -> None:
        """One hand-off's KV landed; `arrived`: time.monotonic() at accept (None: unknown)."""
        self.handoff_bytes += num_bytes
        if arrived is not None:
            self.handoff_seconds.observe(time.monotonic() - arrived)

    def handoff_failed(self, reason: str) -> None:
        self.handoff_failures[reason] += 1


class InstanceMetrics:
    """The instance's private registry; `render(inst)` is the body of `GET /metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._collector = _InstanceCollector()
        self.registry.register(self._collector)

    def render(self, inst: Any) -> bytes:
        """Prometheus text exposition of `inst` (a pd_serve.instance.app.Instance) now."""
        self._collector.inst = inst
        try:
            return generate_latest(self.registry)
        finally:
            self._collector.inst = None


class _InstanceCollector:
    """Builds every family from the instance handed to it by `render` (no `describe`: the
    registry does not ask for names up front)."""

    def __init__(self) -> None:
        self.inst: Any = None

    def collect(self) -> Iterator[Metric]:
        inst = self.inst
        if inst is None:
            return
        yield from _identity(inst)
        if inst.runtime is not None:
            yield from _engine(inst.runtime.engine.stats())
        if inst.prefill is not None:
            yield from _prefill(inst.prefill)
        if inst.decode is not None:
            yield from _decode(inst.decode)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _by_reason(name: str, doc: str, counts: Mapping[str, int],
               reasons: tuple[str, ...]) -> CounterMetricFamily:
    """Every known reason (zero included, so rate() works from the start) plus any other."""
    family = CounterMetricFamily(name, doc, labels=["reason"])
    for reason in dict.fromkeys([*reasons, *counts]):
        family.add_metric([reason], counts.get(reason, 0))
    return family


def _identity(inst: Any) -> Iterator[Metric]:
    info = GaugeMetricFamily("pd_instance_info", "Always 1; the instance's role and scenario "
                             "(its group) as labels, none while stateless",
                             labels=["role", "scenario"])
    info.add_metric([inst.role or "none", inst.group or "none"], 1)
    yield info
    state = getattr(inst, "state", None)
    if state is not None:
        fam = GaugeMetricFamily("pd_instance_state", "1 for the instance's current state "
                                "(stateless, loading, ready, switching, releasing)",
                                labels=["state"])
        fam.add_metric([state], 1)
        yield fam
    yield _gauge("pd_instance_draining", "1 while the instance refuses new work", inst.draining)
    switches = getattr(inst, "switches", None)
    if switches is not None:
        yield _counter("pd_instance_role_switches", "Role switches in place since start",
                       switches)


def _engine(stats: Mapping[str, Any]) -> Iterator[Metric]:
    """From the engine's stats snapshot; empty until the engine thread wrote its first one."""
    if "num_blocks" not in stats:
        return
    total = stats["num_blocks"]
    yield _gauge("pd_kv_blocks_total", "KV cache blocks", total)
    yield _gauge("pd_kv_blocks_in_use", "KV blocks held by requests, parked requests and "
                 "hand-off reservations", total - stats["num_free_blocks"])
    yield _gauge("pd_kv_blocks_cached", "KV blocks holding a hashed prefix (held or "
                 "evictable)", stats["num_cached_blocks"])
    yield _gauge("pd_requests_running", "Requests in the engine's running batch",
                 stats["num_running"])
    yield _gauge("pd_requests_waiting", "Requests waiting in the engine's scheduler",
                 stats["num_waiting"])
    yield _counter("pd_engine_preemptions", "Requests preempted for lack of KV blocks",
                   stats["num_preemptions"])
    yield _counter("pd_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix "
                   "cache", stats["prefix_query_tokens"])
    yield _counter("pd_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                   stats["prefix_hit_tokens"])


def _prefill(role: Any) -> Iterator[Metric]:
    yield _gauge("pd_slots_total", "Prefill batch slots (b_p)", role.slots.size)
    yield _gauge("pd_slots_in_use", "Prefill slots held (prefill running, or KV staged until "
                 "decode confirms the hand-off)", role.slots.busy)
    yield _gauge("pd_prefill_queue_length", "Requests in the local FIFO (baseline queueing)",
                 role.queue.queued)
    yield _by_reason("pd_prefill_rejections", "Offers refused without a prefill, by reason",
                     {**role.rejected, "deadline_exceeded": role.deadline_exceeded},
                     REJECTION_REASONS)
    yield _counter("pd_prefill_late_first_tokens", "First tokens produced after the "
                   "request's TTFT deadline", role.late)
    events: PrefillEvents = role.events
    yield from events.prefill_seconds.collect()
    failures = {**events.handoff_failures, "confirm_timeout": role.timed_out,
                "peer_lost": role.lost_to_dead_peers}
    yield _by_reason("pd_handoff_failures", "Hand-offs that failed, by reason",
                     failures, PREFILL_HANDOFF_FAILURES)


def _decode(role: Any) -> Iterator[Metric]:
    events: DecodeEvents = role.events
    yield from events.handoff_seconds.collect()
    yield _counter("pd_handoff_bytes", "KV bytes received by hand-offs", events.handoff_bytes)
    yield _by_reason("pd_handoff_failures", "Hand-offs that failed, by reason",
                     events.handoff_failures, DECODE_HANDOFF_FAILURES)
    yield _counter("pd_decode_tokens", "Tokens generated by decode steps", events.decode_tokens)
