"""The orchestrator's Prometheus metrics (names documented in docs/metrics.md): instances and
targets per scenario and role, the P/D ratio, failures, recoveries and their duration,
adjustments, and whether the registry answers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RECOVERY_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class OrchestratorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.instances = Gauge("pd_scenario_instances", "Instances serving (listed in the meta "
                               "info) per scenario and role", ["scenario", "role"], registry=r)
        self.targets = Gauge("pd_scenario_target_instances", "Target instances per scenario "
                             "and role", ["scenario", "role"], registry=r)
        self.ratio = Gauge("pd_scenario_pd_ratio", "Serving prefill over decode instances",
                           ["scenario"], registry=r)
        self.failures = Counter("pd_instance_failures", "Instances lost (session ended, "
                                "health checks failed or replaced)", ["role"], registry=r)
        self.recoveries = Counter("pd_recoveries", "Replacements that came to serve",
                                  registry=r)
        self.recovery_s = Histogram("pd_recovery_seconds", "From detecting a lost instance to "
                                    "its replacement serving", buckets=RECOVERY_BUCKETS,
                                    registry=r)
        self.adjustments = Counter("pd_adjustments", "Online adjuster actions",
                                   ["scenario", "action"], registry=r)
        self.registry_up = Gauge("pd_registry_up", "1 when the last registry read succeeded",
                                 registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
