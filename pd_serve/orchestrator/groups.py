"""Pure P/D group formation: from what the orchestrator sees (live instances, their
assignments, targets per scenario, failed and leaving instances) to the actions that move the
cluster toward the targets, and the meta info each scenario publishes. The orchestrator applies
the actions through the registry; the simulator can call the same function.

Rules (one reconcile pass; deterministic, instances in id order):
1. members of (scenario, role) = live, not failed instances assigned there;
2. a role short of its target takes, in order: a stateless spare; a surplus instance of the same
   scenario's other role (switched in place); a surplus instance of another scenario;
3. an instance beyond every target is released back to stateless (it drains first); one being
   replaced (`leaving`) keeps serving, listed, until its role's other members that serve
   cover the target again, and only then is released (make before break);
4. meta info lists only members that applied their assignment, are ready, healthy, undrained
   and not leaving, so gateways and prefill instances never see one that cannot serve; while a
   group has no serving decode instance its prefill instances are not listed either (they
   could not hand off), so new requests wait at the gateway, within their TTFT deadline, until
   the group can serve again instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pd_serve.orchestrator.records import Assignment, GroupMeta, InstanceRecord, Member

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class Target:
    n_p: int
    n_d: int

    def of(self, role: str) -> int:
        return self.n_p if role == "prefill" else self.n_d


@dataclass
class View:
    instances: Mapping[str, InstanceRecord]  # live (registered) instances
    assignments: Mapping[str, Assignment]
    targets: Mapping[str, Target]  # per scenario
    failed: set[str] = field(default_factory=set)  # failed health checks, still registered
    drained: set[str] = field(default_factory=set)  # operator-drained: out of meta, kept
    leaving: set[str] = field(default_factory=set)  # being replaced: serve until replaced


@dataclass(frozen=True)
class Assign:
    """Write `assignment` for `instance` (role None: release to stateless)."""

    instance: str
    role: str | None
    scenario: str | None


@dataclass
class Plan:
    actions: list[Assign]
    metas: dict[str, GroupMeta]
    short: dict[str, dict[str, int]]  # scenario -> role -> instances still missing


def members(view: View, scenario: str, role: str, leaving: bool = False) -> list[str]:
    """Live instances assigned to (scenario, role); `leaving`: those being replaced instead."""
    return sorted(i for i, a in view.assignments.items()
                  if a.role == role and a.scenario == scenario and i in view.instances
                  and i not in view.failed and (i in view.leaving) == leaving)


def spares(view: View) -> list[str]:
    """Live, healthy, stateless instances with no role assigned."""
    return sorted(i for i, rec in view.instances.items()
                  if i not in view.failed and rec.role is None and rec.state == "stateless"
                  and (view.assignments.get(i) is None or view.assignments[i].role is None))


def serving(view: View, iid: str, role: str) -> bool:
    """The instance applied its assignment and can take new work in `role`."""
    rec, a = view.instances.get(iid), view.assignments.get(iid)
    return (rec is not None and a is not None and iid not in view.failed
            and iid not in view.drained and rec.epoch >= a.epoch and rec.role == role
            and rec.state == "ready" and not rec.draining and rec.health.ok)


def reconcile(view: View) -> Plan:
    current = {(s, r): members(view, s, r) for s in view.targets for r in ROLES}
    surplus = {k: v[view.targets[k[0]].of(k[1]):] for k, v in current.items()}
    free = spares(view)
    actions: list[Assign] = []
    short: dict[str, dict[str, int]] = {}
    for (scenario, role), have in current.items():
        missing = view.targets[scenario].of(role) - len(have)
        for _ in range(max(0, missing)):
            pick = _take(free, surplus, scenario, role)
            if pick is None:
                short.setdefault(scenario, {})[role] = short.get(scenario, {}).get(role, 0) + 1
                continue
            actions.append(Assign(pick, role, scenario))
    taken = {a.instance for a in actions}
    for extra in surplus.values():
        actions += [Assign(i, None, None) for i in extra if i not in taken]
    kept: set[str] = set()
    for (scenario, role), have in current.items():  # make before break
        covered = sum(serving(view, i, role) for i in have) >= view.targets[scenario].of(role)
        for i in members(view, scenario, role, leaving=True):
            if covered:
                actions.append(Assign(i, None, None))
            else:
                kept.add(i)
    orphans = [i for i, a in view.assignments.items()
               if a.role is not None and a.scenario not in view.targets and i in view.instances]
    actions += [Assign(i, None, None) for i in sorted(orphans)]
    leaving = {a.instance for a in actions}
    metas = {}
    for s in view.targets:
        decode = _listed(view, s, "decode", leaving, kept)
        prefill = _listed(view, s, "prefill", leaving, kept) if decode else []
        metas[s] = GroupMeta(scenario=s, prefill=prefill, decode=decode)
    return Plan(actions, metas, short)


def _take(free: list[str], surplus: dict[tuple[str, str], list[str]], scenario: str,
          role: str) -> str | None:
    if free:
        return free.pop(0)
    other = "decode" if role == "prefill" else "prefill"
    order: Iterable[tuple[str, str]] = [(scenario, other)] + sorted(
        k for k in surplus if k[0] != scenario)
    for key in order:
        if surplus.get(key):
            return surplus[key].pop()
    return None


def _listed(view: View, scenario: str, role: str, leaving: set[str],
            kept: set[str]) -> list[Member]:
    ids = members(view, scenario, role) + sorted(
        kept & set(members(view, scenario, role, leaving=True)))
    return [Member(id=i, url=view.instances[i].url) for i in ids
            if i not in leaving and serving(view, i, role)]
