"""The simulation driver: a trace (any iterable of TraceRequest in arrival order, consumed
lazily) and a configuration in, per-request records and a summary out.

Lifecycle of `simulate`:
1. build the event loop, recorder, gateway (one scenario per ScenarioSpec), the shared hosts if
   any, and the cluster (groups formed by the real reconcile; aggregated instances in
   aggregated mode); start the adjuster;
2. feed arrivals one at a time (the next request is read when the previous one arrives, so a
   million-request trace never sits in memory as simulator objects);
3. run the event loop until no event is left (every request ended);
4. check conservation (every request ended exactly once) and leaks (every slot, KV block,
   open stream and waiting line back to empty), then summarise.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from pd_serve.bench.traces import TraceRequest
from pd_serve.sim.adjust import SimAdjuster
from pd_serve.sim.cluster import Cluster
from pd_serve.sim.config import SimConfig
from pd_serve.sim.context import SimContext
from pd_serve.sim.engine import lognormal_noise
from pd_serve.sim.events import EventLoop
from pd_serve.sim.gateway import GatewayScenario, SimGateway
from pd_serve.sim.host import Hosts
from pd_serve.sim.latency import LatencyProfile
from pd_serve.sim.records import Recorder
from pd_serve.sim.request import SimRequest
from pd_serve.sim.summary import clean, summarize_by_scenario


@dataclass
class SimResult:
    config: SimConfig
    recorder: Recorder
    summary: dict[str, Any]
    events: int
    wall_s: float
    sim_end_s: float
    offers: int
    rejections: int
    adjustments: list[dict[str, Any]] = field(default_factory=list)
    final_groups: dict[str, dict[str, int]] = field(default_factory=dict)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)  # final role, served

    def to_json(self) -> dict[str, Any]:
        return clean({"config": asdict(self.config), "summary": self.summary,
                      "sim": {"events": self.events, "wall_s": self.wall_s,
                              "sim_end_s": self.sim_end_s, "offers": self.offers,
                              "rejections": self.rejections,
                              "events_per_s": self.events / self.wall_s if self.wall_s else None,
                              "requests_per_s": (len(self.recorder) / self.wall_s
                                                 if self.wall_s else None)},
                      "adjustments": self.adjustments, "final_groups": self.final_groups,
                      "instances": self.instances})


class _Feeder:
    """Schedules each request's arrival when the previous one arrives."""

    def __init__(self, loop: EventLoop, trace: Iterator[TraceRequest], gateway: SimGateway,
                 recorder: Recorder) -> None:
        self.loop, self.trace, self.gateway, self.recorder = loop, trace, gateway, recorder
        self.scenarios: dict[str, GatewayScenario] = gateway.scenarios
        self.count = 0
        self.done = False
        self.last = 0.0

    def next(self, _: object = None) -> None:
        tr = next(self.trace, None)
        if tr is None:
            self.done = True
            return
        if not tr.arrival_s >= self.last:
            raise ValueError(f"{tr.source or f'request {self.count}'}: arrival {tr.arrival_s!r} "
                             f"is before the previous one ({self.last}); sort the trace")
        if tr.input_len < 1:
            raise ValueError(f"{tr.source or f'request {self.count}'}: input_len must be >= 1")
        sc = self.scenarios.get(tr.scenario)
        if sc is None:
            raise ValueError(f"{tr.source or f'request {self.count}'}: scenario {tr.scenario!r} "
                             f"has no group (known: {sorted(self.scenarios)})")
        self.last = tr.arrival_s
        req = SimRequest(self.count, sc, tr.input_len, max(1, tr.output_len), tr.hash_ids,
                         tr.arrival_s)
        self.count += 1
        self.loop.at(tr.arrival_s, self._arrive, req)

    def _arrive(self, req: SimRequest) -> None:
        self.recorder.start(req, req.scenario.index)
        self.gateway.arrive(req)
        self.next()


def simulate(trace: Iterable[TraceRequest], cfg: SimConfig, profile: LatencyProfile,
             check: bool = True) -> SimResult:
    """Runs the whole trace; `check`: conservation and leak checks at the end."""
    t_start = time.perf_counter()
    loop = EventLoop()
    recorder = Recorder([s.name for s in cfg.scenarios])
    gateway = SimGateway(loop, cfg.gateway, recorder)
    for s in cfg.scenarios:
        gateway.add_scenario(s.name, s.policy, s.ttft_slo)
    rng = random.Random(cfg.seed)
    ctx = SimContext(loop, cfg.instance, profile, gateway, cfg.gateway.rtt_s / 2,
                     lognormal_noise(rng.lognormvariate, cfg.noise_cv),
                     hosts=None if cfg.host is None else Hosts(loop, cfg.host),
                     first_token_delay=0.0 if cfg.host is None else cfg.host.first_token_delay_s)
    cluster = Cluster(ctx, cfg)
    cluster.form()
    feeder = _Feeder(loop, iter(trace), gateway, recorder)
    adjuster = None
    if cfg.adjust is not None:
        adjuster = SimAdjuster(loop, cluster, cfg.adjust, recorder,
                               lambda: not feeder.done or recorder.open > 0)
        adjuster.start()
    feeder.next()
    loop.run()
    if check:
        if recorder.open:
            raise AssertionError(f"{recorder.open} request(s) never ended")
        cluster.leak_check()
    summary = summarize_by_scenario(recorder.columns(), recorder.scenario_names,
                                    [(s.tpot_slo_s, s.e2e_slo_s) for s in cfg.scenarios])
    return SimResult(cfg, recorder, summary, loop.events, time.perf_counter() - t_start,
                     loop.now, gateway.offers, gateway.rejections,
                     adjuster.log if adjuster is not None else [],
                     cluster.roles() if cfg.mode == "disaggregated" else {},
                     {name: {"role": obj.role, "served": obj.served}
                      for name, obj in sorted(ctx.instances.items())})
