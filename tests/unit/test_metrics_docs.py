"""docs/metrics.md lists every metric name the Grafana dashboard queries and every name a real
prefill, decode and stateless instance and the gateway expose."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pd_serve.gateway.metrics import GatewayMetrics
from pd_serve.gateway.timeline import OK, Timeline
from pd_serve.instance.app import Instance
from pd_serve.instance.metrics import InstanceMetrics
from tests.inprocess_pd import PDPair, patch_runtime, pd_config

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "metrics.md"
DASHBOARD = REPO / "configs" / "grafana" / "pd-serve-dashboard.json"
SERIES_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def documented() -> set[str]:
    """Names in the first column of the doc's tables."""
    names = set(re.findall(r"^\| `(pd_[a-z0-9_]+)` \|", DOC.read_text(), re.MULTILINE))
    assert len(names) > 30, "the metric tables were not found"
    return names


def undocumented(names: set[str]) -> set[str]:
    """Names that are neither documented nor a series of a documented histogram (`_bucket`,
    `_sum`, `_count`, `_created`) or counter (`_created`)."""
    docs = documented()

    def series_of_documented(name: str) -> bool:
        for suffix in SERIES_SUFFIXES:
            base = name.removesuffix(suffix)
            if name.endswith(suffix) and (base in docs or (
                    suffix == "_created" and f"{base}_total" in docs)):
                return True
        return False

    return {n for n in names if n not in docs and not series_of_documented(n)}


def exposed(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_dashboard_queries_only_documented_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    used = {m for e in exprs for m in re.findall(r"\bpd_[a-z0-9_]+", e)}
    assert not undocumented(used)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_gateway_exposes_only_documented_metrics() -> None:
    m = GatewayMetrics(["chat"], 10)
    tl = Timeline("r", "chat", 0.0, 10, 1.0)
    tl.offer(0.01, "p0", "all slots busy")
    tl.offer(0.02, "p0", "accepted")
    tl.token(0.2, 1)
    tl.token(0.3, 2)
    tl.finish(OK, 0.3)
    m.record(tl)
    names = exposed(m.prometheus().decode())
    assert "pd_gateway_ttft_slo_success_rate" in names
    assert not undocumented(names)


def test_instances_expose_only_documented_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    stateless = exposed(InstanceMetrics().render(Instance(pd_config(), "http://s.test")).decode())
    assert not undocumented(stateless)
    wire = patch_runtime(monkeypatch)

    async def main() -> set[str]:
        pair = await PDPair.start(wire, pd_config())
        try:
            await pair.run_request("r1", list(range(10, 24)))
            await pair.wait_idle()
            names: set[str] = set()
            for inst in (pair.prefill, pair.decode):
                while "pd_kv_blocks_total" not in names:  # the first engine stats snapshot
                    names |= exposed(InstanceMetrics().render(inst).decode())
                    await asyncio.sleep(0.02)
                names |= exposed(InstanceMetrics().render(inst).decode())
            return names
        finally:
            await pair.close()

    names = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert {"pd_slots_in_use", "pd_handoff_bytes_total", "pd_prefill_seconds_bucket"} <= names
    assert not undocumented(names)


def test_orchestrator_exposes_only_documented_metrics() -> None:
    from pd_serve.orchestrator.metrics import OrchestratorMetrics

    m = OrchestratorMetrics()
    for role in ("prefill", "decode"):
        m.instances.labels("chat", role).set(1)
        m.targets.labels("chat", role).set(1)
        m.failures.labels(role).inc()
    m.ratio.labels("chat").set(1.0)
    m.recoveries.inc()
    m.recovery_s.observe(1.5)
    m.adjustments.labels("chat", "add_decode").inc()
    m.registry_up.set(1)
    names = exposed(m.render().decode())
    assert {"pd_scenario_instances", "pd_recovery_seconds_count", "pd_registry_up"} <= names
    assert not undocumented(names)
