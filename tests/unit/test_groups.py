"""The pure group reconcile (pd_serve.orchestrator.groups): formation from spares, re-roling
when no spare is left, release of surplus, failed instances replaced, meta info listing only
instances that serve."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.orchestrator.groups import Assign, Target, View, reconcile, spares
from pd_serve.orchestrator.records import Assignment, Health, InstanceRecord


def rec(iid: str, role: str | None = None, scenario: str | None = None, epoch: int = 0,
        state: str | None = None, ok: bool = True) -> InstanceRecord:
    return InstanceRecord(id=iid, url=f"http://h/{iid}", role=role,  # type: ignore[arg-type]
                          scenario=scenario, epoch=epoch,
                          state=state or ("ready" if role else "stateless"),  # type: ignore[arg-type]
                          health=Health(ok=ok))


def serving(iid: str, role: str, scenario: str = "s", epoch: int = 1) -> tuple[
        InstanceRecord, Assignment]:
    return (rec(iid, role, scenario, epoch),
            Assignment(role=role, scenario=scenario, epoch=epoch))  # type: ignore[arg-type]


def view(pairs: Sequence[tuple[InstanceRecord, Assignment | None]], targets: dict[str, Target],
         failed: set[str] | None = None, drained: set[str] | None = None) -> View:
    return View({r.id: r for r, _ in pairs}, {r.id: a for r, a in pairs if a is not None},
                targets, failed or set(), drained or set())


def test_forms_groups_from_stateless_instances() -> None:
    v = view([(rec(f"i{k}"), None) for k in range(5)], {"a": Target(1, 1), "b": Target(2, 1)})
    plan = reconcile(v)
    roles = {(x.scenario, x.role) for x in plan.actions}
    assert roles == {("a", "prefill"), ("a", "decode"), ("b", "prefill"), ("b", "decode")}
    assert len(plan.actions) == 5 and len({x.instance for x in plan.actions}) == 5
    assert all(not m.prefill and not m.decode for m in plan.metas.values())  # none ready yet
    assert plan.short == {}


def test_meta_lists_only_serving_instances() -> None:
    p, d = serving("p", "prefill"), serving("d", "decode")
    loading = (rec("p2", None, None, 0, "loading"),
               Assignment(role="prefill", scenario="s", epoch=2))
    sick = (rec("d2", "decode", "s", 3, ok=False), Assignment(role="decode", scenario="s",
                                                               epoch=3))
    plan = reconcile(view([p, d, loading, sick], {"s": Target(2, 2)}))
    assert [m.id for m in plan.metas["s"].prefill] == ["p"]
    assert [m.id for m in plan.metas["s"].decode] == ["d"]
    assert plan.actions == [] and plan.short == {}


def test_prefill_not_listed_without_a_serving_decode() -> None:
    plan = reconcile(view([serving("p", "prefill")], {"s": Target(1, 1)}))
    assert plan.metas["s"].prefill == [] and plan.short == {"s": {"decode": 1}}


def test_failed_instance_is_replaced_by_a_spare_and_left_out() -> None:
    pairs = [serving("p", "prefill"), serving("d", "decode"), (rec("spare"), None)]
    plan = reconcile(view(pairs, {"s": Target(1, 1)}, failed={"d"}))
    assert plan.actions == [Assign("spare", "decode", "s")]
    assert plan.metas["s"].decode == [] and plan.metas["s"].prefill == []


def test_ratio_change_reroles_surplus_in_place_without_spares() -> None:
    pairs = [serving("p1", "prefill"), serving("p2", "prefill"), serving("d", "decode")]
    plan = reconcile(view(pairs, {"s": Target(1, 2)}))
    assert plan.actions == [Assign("p2", "decode", "s")]
    assert [m.id for m in plan.metas["s"].prefill] == ["p1"]  # p2 is leaving prefill


def test_surplus_released_and_orphans_of_removed_scenarios() -> None:
    pairs = [serving("p", "prefill"), serving("d1", "decode"), serving("d2", "decode"),
             serving("x", "prefill", "gone")]
    plan = reconcile(view(pairs, {"s": Target(1, 1)}))
    assert set(plan.actions) == {Assign("d2", None, None), Assign("x", None, None)}


def test_replaced_instance_serves_until_its_successor_does() -> None:
    pairs = [serving("p", "prefill"), serving("d", "decode"), (rec("spare"), None)]
    v = view(pairs, {"s": Target(1, 1)})
    v.leaving = {"d"}
    plan = reconcile(v)
    assert plan.actions == [Assign("spare", "decode", "s")]  # not yet released
    assert [m.id for m in plan.metas["s"].decode] == ["d"] and plan.metas["s"].prefill
    successor = serving("spare", "decode", epoch=2)
    v = view([pairs[0], pairs[1], successor], {"s": Target(1, 1)})
    v.leaving = {"d"}
    plan = reconcile(v)
    assert plan.actions == [Assign("d", None, None)]  # successor serves: release
    assert [m.id for m in plan.metas["s"].decode] == ["spare"]


def test_drained_instance_is_kept_but_not_listed() -> None:
    pairs = [serving("p", "prefill"), serving("d", "decode")]
    plan = reconcile(view(pairs, {"s": Target(1, 1)}, drained={"d"}))
    assert plan.actions == [] and plan.metas["s"].decode == []


def test_instance_moves_between_scenarios_when_needed() -> None:
    pairs = [serving("p", "prefill", "a"), serving("d", "decode", "a"),
             serving("d2", "decode", "a")]
    plan = reconcile(view(pairs, {"a": Target(1, 1), "b": Target(0, 1)}))
    assert plan.actions == [Assign("d2", "decode", "b")]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 12), targets=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                                              min_size=1, max_size=3))
def test_never_assigns_one_instance_twice_nor_more_than_exists(
        n: int, targets: list[tuple[int, int]]) -> None:
    v = view([(rec(f"i{k}"), None) for k in range(n)],
             {f"s{k}": Target(p, d) for k, (p, d) in enumerate(targets)})
    plan = reconcile(v)
    assigned = [a.instance for a in plan.actions if a.role is not None]
    assert len(assigned) == len(set(assigned)) == min(n, sum(p + d for p, d in targets))
    missing = sum(x for roles in plan.short.values() for x in roles.values())
    assert len(assigned) + missing == sum(p + d for p, d in targets)
    assert len(spares(v)) == n
