"""Operator actions on a running orchestrator (what the console's commands call through the
HTTP API) and its status report. Actions validate their input (APIError 400/404/409 with a
clear message), change the orchestrator's inputs, persist targets in the registry and poke the
reconcile loop; they never touch an instance directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from pd_serve.api.errors import APIError, bad_request
from pd_serve.orchestrator import groups
from pd_serve.orchestrator.registry import PLAN, child

if TYPE_CHECKING:
    from pd_serve.orchestrator.service import Orchestrator

log = logging.getLogger(__name__)


def _scenario(orch: Orchestrator, name: str) -> groups.Target:
    t = orch.targets.get(name)
    if t is None:
        raise APIError(404, f"The scenario `{name}` has no P/D group (known: "
                       f"{', '.join(sorted(orch.targets))}).", param="scenario",
                       code="scenario_not_found")
    return t


def _count(value: Any, name: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise bad_request(f"{name}: expected an integer >= {minimum}, got {value!r}", param=name)
    return value


async def set_target(orch: Orchestrator, name: str, n_p: Any, n_d: Any,
                     why: str = "operator") -> dict[str, Any]:
    _scenario(orch, name)
    t = groups.Target(_count(n_p, "n_p", 1), _count(n_d, "n_d", 1))
    orch.targets[name] = t
    await asyncio.to_thread(orch.registry.put, child(PLAN, name), {"n_p": t.n_p, "n_d": t.n_d})
    log.info("target of %s set to %d:%d (%s)", name, t.n_p, t.n_d, why)
    orch.poke()
    return {"scenario": name, "target": {"n_p": t.n_p, "n_d": t.n_d}}


async def scale(orch: Orchestrator, name: str, instances: Any) -> dict[str, Any]:
    """Group-level scaling with the P/D ratio kept (rounded; at least one per role)."""
    t = _scenario(orch, name)
    n = _count(instances, "instances", 2)
    n_p = min(n - 1, max(1, round(n * t.n_p / (t.n_p + t.n_d))))
    return await set_target(orch, name, n_p, n - n_p, why=f"scale to {n}")


def _instance(orch: Orchestrator, iid: str) -> None:
    if iid not in orch.instances:
        raise APIError(404, f"no registered instance `{iid}` (known: "
                       f"{', '.join(sorted(orch.instances)) or 'none'})", param="id",
                       code="instance_not_found")


async def drain(orch: Orchestrator, iid: str, on: bool) -> dict[str, Any]:
    """Out of the meta info (no new requests) and refusing offers; its work finishes."""
    _instance(orch, iid)
    (orch.drained.add if on else orch.drained.discard)(iid)
    await asyncio.to_thread(orch.reassign, iid)
    orch.poke()
    return {"id": iid, "state": "draining" if on else "serving"}


async def replace(orch: Orchestrator, iid: str) -> dict[str, Any]:
    """Gives the instance's role to a spare; the instance keeps serving until the spare does,
    then drains and becomes a spare itself."""
    _instance(orch, iid)
    a = orch.assignments.get(iid)
    if a is None or a.role is None:
        raise APIError(409, f"instance `{iid}` has no role to hand over", param="id",
                       code="not_assigned")
    await asyncio.to_thread(orch.replace, iid, "replaced by the operator")
    await asyncio.to_thread(orch.reconcile_once)
    repl = next((ev.replacement for ev in reversed(orch.recoveries.events)
                 if ev.failed == iid), None)
    return {"id": iid, "replacement": repl}


async def rollout(orch: Orchestrator, model_path: Any) -> dict[str, Any]:
    """Rolling model update, group by group and one instance at a time; the ratio stays. With a
    spare, make before break: the spare loads the new model and takes the instance's role, the
    instance drains and becomes the next spare; without one, the instance drains, reloads and
    rejoins (a role with a single instance then pauses: its requests wait at the gateway).
    Progress in status()["rollout"]."""
    if not isinstance(model_path, str) or not model_path.strip():
        raise bad_request("model_path: expected a model directory", param="model_path")
    if orch.rollout_state is not None and orch.rollout_state.get("done") is None:
        raise APIError(409, "a rollout is already running", code="rollout_running")
    orch.model_path = model_path
    await asyncio.to_thread(orch.registry.put, child(PLAN, "_model"), {"path": model_path})
    orch.rollout_state = {"model_path": model_path, "started": time.time(), "updated": [],
                          "done": None, "error": None}
    asyncio.get_running_loop().create_task(_roll(orch, model_path))
    return {"started": True}


async def _roll(orch: Orchestrator, model_path: str) -> None:
    state = orch.rollout_state
    assert state is not None
    try:
        for name in sorted(orch.targets):
            for iid in sorted(i for i, a in orch.assignments.items() if a.scenario == name
                              and a.role is not None):
                view = groups.View(orch.instances, orch.assignments, orch.targets,
                                   set(orch.failed), leaving=set(orch.leaving))
                if groups.spares(view):
                    await asyncio.to_thread(orch.replace, iid, "rolling update", False)
                    orch.poke()
                    await _wait_released(orch, iid)
                else:
                    epoch = await asyncio.to_thread(orch.reassign, iid)
                    await _wait_serving(orch, iid, epoch)
                state["updated"].append(iid)
    except Exception as exc:  # reported in status
        state["error"] = f"{type(exc).__name__}: {exc}"
        log.exception("rollout failed")
    state["done"] = time.time()


async def _wait_released(orch: Orchestrator, iid: str) -> None:
    """Until the replaced instance has handed over its role (its successor serves)."""
    deadline = time.monotonic() + orch.ocfg.drain_timeout_s + 600.0
    while iid in orch.leaving:
        if time.monotonic() > deadline:
            raise TimeoutError(f"instance {iid} was not replaced within the rollout timeout")
        await asyncio.sleep(0.2)


async def _wait_serving(orch: Orchestrator, iid: str, epoch: int) -> None:
    deadline = time.monotonic() + orch.ocfg.drain_timeout_s + 600.0
    while time.monotonic() < deadline:
        rec = orch.instances.get(iid)
        if rec is None:
            return  # lost during the update: recovery takes over
        if rec.epoch >= epoch and rec.state == "ready":
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"instance {iid} did not come back within the rollout timeout")


def status(orch: Orchestrator) -> dict[str, Any]:
    now = time.time()
    scenarios = {}
    for name, t in sorted(orch.targets.items()):
        meta = orch.metas.get(name)
        p = [m.id for m in meta.prefill] if meta else []
        d = [m.id for m in meta.decode] if meta else []
        scenarios[name] = {"target": {"n_p": t.n_p, "n_d": t.n_d}, "prefill": p, "decode": d,
                           "ratio": f"{len(p)}:{len(d)}", "short": orch.short.get(name, {}),
                           "metrics": orch.collector.summary(name, now),
                           "plan": orch.plans.get(name)}
    instances = []
    for iid, rec in sorted(orch.instances.items()):
        state = "failed" if iid in orch.failed else (
            "draining" if rec.draining or iid in orch.drained else
            "leaving" if iid in orch.leaving else rec.state)
        instances.append({
            "id": iid, "url": rec.url, "role": rec.role, "scenario": rec.scenario,
            "state": state, "slots_used": rec.health.slots_used,
            "slots_total": rec.health.slots_total, "kv_blocks_used": rec.health.kv_blocks_used,
            "kv_blocks_total": rec.health.kv_blocks_total, "running": rec.health.running,
            "healthy": iid not in orch.failed and rec.health.ok,
            "last_report_s": max(0.0, now - rec.reported_at), "error": rec.error})
    view = groups.View(orch.instances, orch.assignments, orch.targets, set(orch.failed))
    return {"registry": orch.registry_url, "registry_ok": orch.registry_ok,
            "uptime_s": now - orch.started, "scenarios": scenarios, "instances": instances,
            "spares": groups.spares(view), "gateways": list(orch.gateways),
            "recoveries": orch.recoveries.to_json()[-20:],
            "adjustments": orch.adjustments[-20:], "rollout": orch.rollout_state}
