"""The simulated deployment: instances by id with registry-like records and assignments,
P/D groups formed by the real `groups.reconcile` (spares, re-roling, make before break, meta
info that lists only serving instances), meta info published to the gateway (prefill lists)
and to prefill instances (decode peers). Aggregated mode runs n_p + n_d aggregated instances
per scenario instead (no roles, no groups).

Lifecycle of an instance whose assignment changes (after the adjuster moved a target):
1. the new assignment (new epoch) takes it out of the meta info at once (it no longer
   "serves"); it drains: offers and hand-offs are refused, accepted work finishes;
2. once idle it switches, which takes `AdjustSpec.switch_s` (a spare: just the load time);
3. it serves its new role (or becomes a stateless spare) and another reconcile pass lists it.
At the start every assignment applies at once (the groups are formed before traffic).
"""

from __future__ import annotations

from typing import Any

from pd_serve.orchestrator import groups
from pd_serve.orchestrator.records import Assignment, GroupMeta, InstanceRecord
from pd_serve.sim.aggregated import SimAggregated
from pd_serve.sim.config import SimConfig
from pd_serve.sim.context import SimContext
from pd_serve.sim.decode import SimDecode
from pd_serve.sim.prefill import SimPrefill

ROLE_CLASSES: dict[str, Any] = {"prefill": SimPrefill, "decode": SimDecode}


class Cluster:
    def __init__(self, ctx: SimContext, cfg: SimConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.records: dict[str, InstanceRecord] = {}
        self.assignments: dict[str, Assignment] = {}
        self.targets = {s.name: groups.Target(s.n_p, s.n_d) for s in cfg.scenarios}
        self.epoch = 0
        self.reconciles = 0
        self.switches = 0
        self.switching: set[str] = set()  # drained or loading; `_become` applies the latest

    def form(self) -> None:
        if self.cfg.mode == "aggregated":
            for s in self.cfg.scenarios:
                objs = [SimAggregated(f"{s.name}/a{i}", self.ctx) for i in range(s.n_p + s.n_d)]
                self.ctx.instances.update((o.name, o) for o in objs)
                self.ctx.gateway.set_instances(s.name, objs)
            return
        total = sum(t.n_p + t.n_d for t in self.targets.values()) + self.cfg.spares
        for n in range(total):
            iid = f"i{n:05d}"
            self.records[iid] = InstanceRecord(id=iid, url=iid)
            if self.ctx.hosts is not None:  # shared hosts: filled in id order
                self.ctx.hosts.place(iid)
        self.reconcile(instant=True)

    def view(self) -> groups.View:
        return groups.View(self.records, self.assignments, self.targets)

    def reconcile(self, instant: bool = False) -> None:
        """One reconcile pass: applies its assignments and publishes its meta info."""
        self.reconciles += 1
        plan = groups.reconcile(self.view())
        for action in plan.actions:
            self.epoch += 1
            self.assignments[action.instance] = Assignment(
                role=action.role, scenario=action.scenario, epoch=self.epoch)  # type: ignore[arg-type]
            if instant:
                self._apply(action.instance)
            else:
                self._reassigned(action.instance)
        if instant and plan.actions:
            self.reconciles += 1
            plan = groups.reconcile(self.view())
        self.publish(plan.metas)

    def publish(self, metas: dict[str, GroupMeta]) -> None:
        instances = self.ctx.instances
        for name, meta in metas.items():
            prefill = [instances[m.id] for m in meta.prefill]
            peers = [m.id for m in meta.decode]
            for p in prefill:
                p.peers = peers
            self.ctx.gateway.set_instances(name, prefill)

    def _reassigned(self, iid: str) -> None:
        if iid in self.switching:
            return  # its pending switch applies the latest assignment
        obj = self.ctx.instances.get(iid)
        if obj is None:  # a spare: loads the model for its role
            self.switching.add(iid)
            self.ctx.loop.after(self._switch_s(), self._become, iid)
            return
        obj.draining = True
        obj.on_idle = self._drained
        if obj.idle:
            self._drained(obj)

    def _drained(self, obj: Any) -> None:
        if obj.on_idle is None:
            return
        obj.on_idle = None
        self.switching.add(obj.name)
        self.records[obj.name] = self.records[obj.name].model_copy(update={"state": "switching"})
        self.ctx.loop.after(self._switch_s(), self._become, obj.name)

    def _switch_s(self) -> float:
        return self.cfg.adjust.switch_s if self.cfg.adjust is not None else 0.0

    def _become(self, iid: str) -> None:
        """The switch is over: the instance serves its assignment and is listed again."""
        self.switching.discard(iid)
        self._apply(iid)
        self.reconcile()

    def _apply(self, iid: str) -> None:
        """The instance applies its latest assignment: a new role object, or a spare."""
        a = self.assignments[iid]
        self.ctx.instances.pop(iid, None)
        self.switches += 1
        if a.role is None:
            self.records[iid] = InstanceRecord(id=iid, url=iid, epoch=a.epoch)
        else:
            self.ctx.instances[iid] = ROLE_CLASSES[a.role](iid, self.ctx)
            self.records[iid] = InstanceRecord(id=iid, url=iid, role=a.role, scenario=a.scenario,
                                               state="ready", epoch=a.epoch)

    def roles(self) -> dict[str, dict[str, int]]:
        """Serving instances per scenario and role (from the assignments)."""
        out: dict[str, dict[str, int]] = {s: {"prefill": 0, "decode": 0} for s in self.targets}
        for a in self.assignments.values():
            if a.role is not None and a.scenario in out:
                out[a.scenario][a.role] += 1
        return out

    def leak_check(self) -> None:
        for obj in self.ctx.instances.values():
            obj.leak_check()
        hosts = self.ctx.hosts
        busy = [] if hosts is None else [n for n, c in hosts.by_name.items() if c.busy]
        if busy:
            raise AssertionError(f"still computing on their hosts at the end: {busy}")
        self.ctx.gateway.leak_check()
