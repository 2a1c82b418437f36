"""The online adjuster in the simulator: every `interval_s` of simulated time each scenario's
finished requests since the last pass (count, TTFT and E2E sums) feed the real `Adjuster`; a
recommendation moves the scenario's target by one instance exactly as the orchestrator does
(pd_serve.orchestrator.adjusting.adjust_once), and a reconcile pass re-roles an instance.

Lifecycle: `SimAdjuster(...)` hooks the recorder's finished-request callback; `start()`
schedules the first pass; a pass reschedules itself while `active()` says requests remain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pd_serve.orchestrator import groups
from pd_serve.orchestrator.adjuster import ADD_PREFILL, Adjuster, WindowStats
from pd_serve.sim.cluster import Cluster
from pd_serve.sim.config import AdjustSpec
from pd_serve.sim.events import EventLoop
from pd_serve.sim.records import Recorder
from pd_serve.sim.request import SimRequest


class SimAdjuster:
    def __init__(self, loop: EventLoop, cluster: Cluster, spec: AdjustSpec, recorder: Recorder,
                 active: Callable[[], bool]) -> None:
        self.loop = loop
        self.cluster = cluster
        self.spec = spec
        self.active = active
        self.adjuster = Adjuster(spec.adjuster)
        self.windows: dict[str, list[float]] = {s: [0, 0.0, 0.0] for s in cluster.targets}
        self.log: list[dict[str, Any]] = []
        recorder.on_finished = self._finished

    def start(self) -> None:
        self.loop.after(self.spec.interval_s, self._pass)

    def _finished(self, req: SimRequest, end: float) -> None:
        w = self.windows[req.scenario.name]
        w[0] += 1
        w[1] += req.first_token - req.arrival
        w[2] += end - req.arrival

    def _pass(self, _: object = None) -> None:
        now, cluster = self.loop.now, self.cluster
        spares = len(groups.spares(cluster.view()))
        changed = False
        for name, target in sorted(cluster.targets.items()):
            count, ttft, e2e = self.windows[name]
            self.windows[name] = [0, 0.0, 0.0]
            self.adjuster.observe_stats(now, name, WindowStats(int(count), ttft, e2e))
            adj = self.adjuster.decide(now, name, target.n_p, target.n_d, spares)
            if adj is None:
                continue
            n_p, n_d = target.n_p, target.n_d
            if adj.action == ADD_PREFILL:
                n_p, n_d = n_p + 1, n_d - (adj.source == "reassign")
            else:
                n_p, n_d = n_p - (adj.source == "reassign"), n_d + 1
            spares -= adj.source == "spare"
            cluster.targets[name] = groups.Target(n_p, n_d)
            self.log.append({**adj.to_dict(), "from": f"{target.n_p}:{target.n_d}",
                             "to": f"{n_p}:{n_d}"})
            changed = True
        if changed:
            cluster.reconcile()
        if self.active():
            self.loop.after(self.spec.interval_s, self._pass)
