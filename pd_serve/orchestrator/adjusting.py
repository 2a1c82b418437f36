"""Glue between the orchestrator and its pure planning code: the online adjuster loop (samples
from the gateways in, target changes out) and profile-then-plan for one scenario.

Online adjustment: every `adjust_interval_s` each scenario's newly finished requests feed the
Adjuster (pd_serve.orchestrator.adjuster); a standing recommendation changes the scenario's
target by one instance: from a spare when one exists, else by re-roling one instance of the
other role in place (the reconcile loop drains it, switches it and lists it again), so no
request is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from pd_serve.config import OrchestratorConfig
from pd_serve.orchestrator import control, groups
from pd_serve.orchestrator.adjuster import ADD_PREFILL, Adjuster, AdjusterConfig

if TYPE_CHECKING:
    from pd_serve.orchestrator.service import Orchestrator

log = logging.getLogger(__name__)


def make_adjuster(ocfg: OrchestratorConfig) -> Adjuster | None:
    if not ocfg.adjust:
        return None
    return Adjuster(AdjusterConfig(
        window_s=ocfg.adjust_window_s, min_samples=ocfg.adjust_min_samples,
        e2e_rise=ocfg.adjust_e2e_rise, share_delta=ocfg.adjust_share_delta,
        hysteresis=ocfg.adjust_hysteresis, cooldown_s=ocfg.adjust_cooldown_s,
        min_per_role=ocfg.min_per_role))


async def adjust_loop(orch: Orchestrator) -> None:
    adjuster = orch.adjuster
    assert adjuster is not None
    while True:
        await asyncio.sleep(orch.ocfg.adjust_interval_s)
        try:
            await adjust_once(orch, adjuster, time.monotonic())
        except Exception:
            log.exception("adjuster pass failed")


async def adjust_once(orch: Orchestrator, adjuster: Adjuster, now: float) -> None:
    view = groups.View(orch.instances, orch.assignments, orch.targets, set(orch.failed))
    spares = len(groups.spares(view))
    for name, t in sorted(orch.targets.items()):
        fresh = orch.collector.take_fresh(name)
        adjuster.observe(now, name, [(s["ttft_s"], s["e2e_s"]) for s in fresh
                                     if s.get("outcome") == "finished"
                                     and s.get("ttft_s") is not None
                                     and s.get("e2e_s") is not None])
        adj = adjuster.decide(now, name, t.n_p, t.n_d, spares)
        if adj is None:
            continue
        n_p, n_d = t.n_p, t.n_d
        if adj.action == ADD_PREFILL:
            n_p += 1
            n_d -= adj.source == "reassign"
        else:
            n_d += 1
            n_p -= adj.source == "reassign"
        spares -= adj.source == "spare"
        entry = {**adj.to_dict(), "at": time.time(), "from": f"{t.n_p}:{t.n_d}",
                 "to": f"{n_p}:{n_d}"}
        orch.adjustments.append(entry)
        orch.metrics.adjustments.labels(name, adj.action).inc()
        log.warning("adjuster: %s %s -> %d:%d (%s)", name, adj.action, n_p, n_d, adj.reason)
        await control.set_target(orch, name, n_p, n_d, why=f"adjuster: {adj.action}")


async def profile_and_plan(orch: Orchestrator, name: str, body: dict[str, Any]) -> dict[str, Any]:
    raise NotImplementedError  # replaced below once the profiler lands
