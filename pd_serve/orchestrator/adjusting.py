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
    """Profiles `name` through the first registered gateway (body: ProfileWorkload fields,
    optional `budget` (default: the scenario's current target size), `traffic_rps`, `apply`)
    and plans its ratio (Eq. 1; Eq. 2 for the admitted traffic); with `apply` the plan becomes
    the scenario's target."""
    from pd_serve.api.errors import APIError, bad_request
    from pd_serve.orchestrator.planner import plan_ratio
    from pd_serve.orchestrator.profiler import ProfileError, ProfileWorkload, profile_report

    t = control._scenario(orch, name)
    if not orch.gateways:
        raise APIError(409, "no gateway is registered: profiling sends requests through one",
                       code="no_gateway")
    opts = dict(body)
    budget = opts.pop("budget", t.n_p + t.n_d)
    traffic = opts.pop("traffic_rps", None)
    apply = bool(opts.pop("apply", False))
    meta = orch.metas.get(name)
    opts.setdefault("decode_instances", max(1, len(meta.decode) if meta else 1))
    opts.setdefault("b_p", orch.cfg.pd.b_p)
    try:
        workload = ProfileWorkload(**opts)
        budget = control._count(budget, "budget", 2)
    except TypeError as exc:
        raise bad_request(f"profile: {exc}", param="body") from exc
    except ValueError as exc:
        raise bad_request(str(exc), param="body") from exc
    try:
        report = await profile_report(orch.gateways[0], name, workload)
    except ProfileError as exc:
        raise APIError(502, f"profiling {name} failed: {exc}", code="profile_failed") from exc
    profile = report.profile
    try:
        plan = plan_ratio(profile, budget, traffic, min_per_role=orch.ocfg.min_per_role)
    except ValueError as exc:
        raise bad_request(str(exc), param="budget") from exc
    orch.plans[name] = plan.to_dict()
    if apply:
        await control.set_target(orch, name, plan.n_p, plan.n_d, why="planner")
    return {"scenario": name, "profile": profile.to_dict(), "plan": plan.to_dict(),
            "notes": list(report.notes), "applied": apply}
