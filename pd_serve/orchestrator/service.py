"""The orchestrator: forms each scenario's P/D group from stateless instances through the
registry, publishes the meta info, checks health, replaces lost instances, and applies ratio
changes (operator or online adjuster) and rolling model updates.

Lifecycle:
1. `Orchestrator(cfg, registry, registry_url)`; `await start(self_url)` loads persisted targets
   (/pd/plan), announces itself (/pd/orchestrator), watches /pd/instances and starts the loops:
   reconcile (on every registry change and each second), health checks, sample collection from
   the gateways, the online adjuster (when on);
2. reconcile (on a worker thread, one at a time; nothing is assigned or published during the
   first session timeout, while instances of a previous orchestrator re-register and are
   adopted): read instances and assignments, open a
   recovery event for every assigned instance that vanished or failed, run the pure
   `groups.reconcile`, write the assignments it asks for (each with a new epoch) and every
   changed meta info;
3. operator actions (`set_target`, `drain`, `replace`, `rollout`, ...) change the inputs and
   poke the reconcile loop; `await stop()` cancels the loops (the registry is the caller's).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

import httpx

from pd_serve.config import ServeConfig
from pd_serve.orchestrator import groups
from pd_serve.orchestrator.collector import SampleCollector
from pd_serve.orchestrator.health import HealthChecker
from pd_serve.orchestrator.metrics import OrchestratorMetrics
from pd_serve.orchestrator.records import Assignment, GroupMeta, InstanceRecord
from pd_serve.orchestrator.recovery import RecoveryLog
from pd_serve.orchestrator.registry import (
    ASSIGN,
    GATEWAYS,
    INSTANCES,
    META,
    ORCHESTRATOR,
    PLAN,
    Registry,
    RegistryError,
    child,
)

log = logging.getLogger(__name__)
# An instance that leaves the meta info keeps its role this long before it is re-roled or
# released: longer than a registry watch takes to reach prefill instances and gateways, so none
# of them hands it new work after it stopped serving (make before break).
UNLIST_SETTLE_S = 2.0


class Orchestrator:
    def __init__(self, cfg: ServeConfig, registry: Registry, registry_url: str) -> None:
        self.cfg = cfg
        self.ocfg = cfg.orchestrator
        self.registry = registry
        self.registry_url = registry_url
        self.targets = {g.scenario: groups.Target(g.prefill, g.decode) for g in self.ocfg.groups}
        self.failed: dict[str, str] = {}  # id -> reason (lost health, or replaced by operator)
        self.drained: set[str] = set()
        self.leaving: dict[str, str] = {}  # id -> reason: replaced, serving until its successor
        self.model_path: str | None = None
        self.epoch = 0
        self.instances: dict[str, InstanceRecord] = {}
        self.assignments: dict[str, Assignment] = {}
        self.assignments_written: dict[str, Assignment] = {}  # the last this process wrote
        self.metas: dict[str, GroupMeta] = {}
        self.short: dict[str, dict[str, int]] = {}
        self.gateways: list[str] = []
        self.recoveries = RecoveryLog()
        self.adjustments: list[dict[str, Any]] = []
        self.collector = SampleCollector(max(60.0, self.ocfg.adjust_window_s * 3))
        self.health = HealthChecker(self.ocfg.health_failures,
                                    max(0.5, min(2.0, self.ocfg.health_interval_s * 2)))
        self.metrics = OrchestratorMetrics()
        self.started = time.time()
        self.registry_ok = True
        self.rollout_state: dict[str, Any] | None = None
        self.plans: dict[str, dict[str, Any]] = {}  # scenario -> last planner result
        self._lock = threading.Lock()
        self._failures: deque[tuple[str, str]] = deque()
        self._unlisted_at: dict[str, float] = {}  # when a listed instance left the meta info
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._cancels: list[Any] = []
        self.http = httpx.AsyncClient(timeout=5.0)
        self.adjuster: Any = None  # pd_serve.orchestrator.adjuster.Adjuster when adjust is on

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, self_url: str) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load_targets)
        await asyncio.to_thread(self.registry.put, ORCHESTRATOR, {"url": self_url},
                                ephemeral=True)
        self._cancels.append(self.registry.watch(INSTANCES, self.poke))
        from pd_serve.orchestrator.adjusting import make_adjuster

        self.adjuster = make_adjuster(self.ocfg)
        for coro in (self._reconcile_loop(), self._health_loop(), self._collect_loop()):
            self._tasks.append(self._loop.create_task(coro))
        if self.adjuster is not None:
            from pd_serve.orchestrator.adjusting import adjust_loop

            self._tasks.append(self._loop.create_task(adjust_loop(self)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for cancel in self._cancels:
            cancel()
        await self.http.aclose()

    def poke(self) -> None:
        """Thread-safe: run a reconcile pass soon."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def _load_targets(self) -> None:
        for name in self.registry.children(PLAN):
            data = self.registry.get(child(PLAN, name)) or {}
            if isinstance(data.get("n_p"), int) and isinstance(data.get("n_d"), int):
                self.targets[name] = groups.Target(data["n_p"], data["n_d"])
                log.info("target of %s from the registry: %d:%d", name, data["n_p"], data["n_d"])
        self.model_path = (self.registry.get(child(PLAN, "_model")) or {}).get("path")

    # -- loops ----------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await asyncio.to_thread(self.reconcile_once)
                self.registry_ok = True
            except RegistryError as exc:
                self.registry_ok = False
                log.warning("orchestrator: registry unavailable (%s); retrying", exc)
            except Exception:
                log.exception("reconcile failed")
            self.metrics.registry_up.set(1 if self.registry_ok else 0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ocfg.health_interval_s)
            urls = {i: r.url for i, r in self.instances.items() if i not in self.failed}
            for iid, reason in await self.health.check(self.http, urls):
                self.mark_failed(iid, reason)

    async def _collect_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.collector.poll(self.http, list(self.gateways))

    # -- reconcile ------------------------------------------------------------------------------

    def reconcile_once(self) -> groups.Plan:
        with self._lock:
            reg = self.registry
            instances = _read_all(reg, INSTANCES, InstanceRecord)
            assignments = _read_all(reg, ASSIGN, Assignment)
            self.gateways = [str(g["url"]) for g in (reg.get(child(GATEWAYS, n))
                                                     for n in reg.children(GATEWAYS))
                             if g and isinstance(g.get("url"), str)]
            self.epoch = max([self.epoch, *(a.epoch for a in assignments.values()),
                              *(r.epoch for r in instances.values())])
            self._adopt(instances, assignments)
            for iid, a in list(assignments.items()):
                if iid not in instances:
                    if a.role is not None and iid not in self.failed:
                        self._open_recovery(iid, a, "registry session ended (process gone or "
                                            "unreachable)")
                    reg.delete(child(ASSIGN, iid))
                    del assignments[iid]
            self.instances, self.assignments = instances, assignments
            if time.time() - self.started < self.ocfg.session_timeout_s:
                # Instances of a previous orchestrator re-register within a session timeout;
                # acting earlier would replace the ones not back yet (and flap the meta info).
                return groups.Plan([], {}, {})
            self._take_failures()
            self._settle_failed(instances, assignments)
            plan = groups.reconcile(groups.View(instances, assignments, dict(self.targets),
                                                set(self.failed), set(self.drained),
                                                set(self.leaving)))
            listed_before = {m.id for meta in self.metas.values()
                             for m in (*meta.prefill, *meta.decode)}
            self._publish(plan.metas)  # first: who leaves the meta info stops getting work
            now = time.monotonic()
            listed_now = {m.id for meta in plan.metas.values()
                          for m in (*meta.prefill, *meta.decode)}
            for iid in listed_before - listed_now:
                self._unlisted_at.setdefault(iid, now)
            for act in plan.actions:
                since = self._unlisted_at.get(act.instance)
                if since is not None and now - since < UNLIST_SETTLE_S:
                    continue  # prefill instances and gateways may not have seen it go yet
                self._assign(act.instance, act.role, act.scenario)
            self.short = plan.short
            self._update_metrics()
            return plan

    def _adopt(self, instances: dict[str, InstanceRecord],
               assignments: dict[str, Assignment]) -> None:
        """An instance serving a role with no assignment (the orchestrator restarted and its
        embedded registry started empty) keeps its role: the assignment is written as it
        reports it, with its own epoch, so it applies nothing and no request is disturbed."""
        for iid, rec in instances.items():
            if rec.role is not None and iid not in assignments and rec.scenario is not None:
                a = Assignment(role=rec.role, scenario=rec.scenario, model_path=rec.model_path,
                               drain=rec.draining, epoch=rec.epoch)
                self.registry.put(child(ASSIGN, iid), a.to_json())
                assignments[iid] = a
                log.warning("adopted %s as %s/%s (it served without an assignment)", iid,
                            rec.scenario, rec.role)

    def _settle_failed(self, instances: dict[str, InstanceRecord],
                       assignments: dict[str, Assignment]) -> None:
        """A failed instance is released; once it reports stateless again it is healthy and
        becomes a spare. A replaced (leaving) one is done once it is gone or stateless."""
        for iid in list(self.leaving):
            rec, a = instances.get(iid), assignments.get(iid)
            if rec is None or (a is not None and a.role is None and rec.epoch >= a.epoch
                               and rec.state == "stateless"):
                del self.leaving[iid]
        for iid in list(self.failed):
            rec, a = instances.get(iid), assignments.get(iid)
            if rec is None:
                del self.failed[iid]
                self.health.forget(iid)
            elif a is not None and a.role is not None:
                self._assign(iid, None, None)
                assignments[iid] = self.assignments_written[iid]
            elif a is not None and rec.epoch >= a.epoch and rec.state == "stateless":
                log.info("instance %s is back as a stateless spare", iid)
                del self.failed[iid]

    def _assign(self, iid: str, role: str | None, scenario: str | None) -> None:
        self.epoch += 1
        a = Assignment(role=role, scenario=scenario,  # type: ignore[arg-type]
                       model_path=self.model_path, drain=iid in self.drained, epoch=self.epoch)
        self.registry.put(child(ASSIGN, iid), a.to_json())
        self.assignments_written[iid] = a
        if role is not None:
            self.recoveries.note_assign(iid, role, scenario)
        log.info("assign %s -> %s/%s (epoch %d)", iid, scenario, role or "stateless", a.epoch)

    def _publish(self, metas: dict[str, GroupMeta]) -> None:
        listed_ids = {m.id for meta in metas.values() for m in (*meta.prefill, *meta.decode)}
        for iid in listed_ids:
            self._unlisted_at.pop(iid, None)
        for name, meta in metas.items():
            old = self.metas.get(name)
            if old is None or (old.prefill, old.decode) != (meta.prefill, meta.decode) or \
                    self.registry.get(child(META, name)) is None:
                self.epoch += 1
                meta = meta.model_copy(update={"epoch": self.epoch})
                self.registry.put(child(META, name), meta.to_json())
                log.info("meta %s: prefill %s decode %s", name, [m.id for m in meta.prefill],
                         [m.id for m in meta.decode])
            self.metas[name] = meta
            for role, listed in (("prefill", meta.prefill), ("decode", meta.decode)):
                for ev in self.recoveries.note_serving(name, role, {m.id for m in listed}):
                    self.metrics.recoveries.inc()
                    assert ev.recovery_s is not None
                    self.metrics.recovery_s.observe(ev.recovery_s)
                    log.warning("recovered %s/%s: %s replaced %s in %.2f s", name, role,
                                ev.replacement, ev.failed, ev.recovery_s)
        for gone in set(self.metas) - set(metas):
            self.registry.delete(child(META, gone))
            del self.metas[gone]

    def replace(self, iid: str, reason: str, record: bool = True) -> None:
        """Blocking. Make before break: a spare (or the next instance to register) takes the
        role; the instance keeps serving until then, then drains and becomes stateless.
        `record`: log it as a recovery event (operator replacements; not rolling updates)."""
        with self._lock:
            a = self.assignments.get(iid)
            if iid in self.leaving or iid in self.failed or a is None or a.role is None:
                return
            self.leaving[iid] = reason
            if record:
                self._open_recovery(iid, a, reason)

    def reassign(self, iid: str) -> int:
        """Blocking. Rewrites the instance's assignment (same role and scenario) with the current
        drain flag and model path; returns the new epoch."""
        with self._lock:
            a = self.assignments.get(iid)
            self._assign(iid, a.role if a else None, a.scenario if a else None)
            return self.epoch

    def _open_recovery(self, iid: str, a: Assignment, reason: str) -> None:
        log.warning("instance %s (%s/%s) lost: %s", iid, a.scenario, a.role, reason)
        self.recoveries.open(iid, a.role or "?", a.scenario or "?", reason)
        self.metrics.failures.labels(a.role or "none").inc()

    def mark_failed(self, iid: str, reason: str) -> None:
        """A registered instance failed its health checks (or the operator replaces it): out of
        the meta info at the next reconcile, released, replaced from the spares. Never blocks
        (the reconcile pass takes it from a queue)."""
        self._failures.append((iid, reason))
        self.poke()

    def _take_failures(self) -> None:
        while self._failures:
            iid, reason = self._failures.popleft()
            if iid in self.failed or iid not in self.instances:
                continue
            self.failed[iid] = reason
            a = self.assignments.get(iid)
            if a is not None and a.role is not None:
                self._open_recovery(iid, a, reason)

    def _update_metrics(self) -> None:
        m = self.metrics
        for name, meta in self.metas.items():
            t = self.targets.get(name)
            m.instances.labels(name, "prefill").set(len(meta.prefill))
            m.instances.labels(name, "decode").set(len(meta.decode))
            if t is not None:
                m.targets.labels(name, "prefill").set(t.n_p)
                m.targets.labels(name, "decode").set(t.n_d)
            m.ratio.labels(name).set(len(meta.prefill) / len(meta.decode) if meta.decode else 0)


def _read_all(reg: Registry, parent: str, cls: Any) -> dict[str, Any]:
    out = {}
    for name in reg.children(parent):
        path = child(parent, name)
        rec = cls.parse(reg.get(path), path)
        if rec is not None:
            out[name] = rec
    return out
