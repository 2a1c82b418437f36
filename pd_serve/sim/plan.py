"""Sizing groups for a simulation with the real planner: a scenario's E2E profile
(orchestrator.perf_model.ScenarioProfile) derived from the latency models and the scenario's
mean prompt and output lengths, then `planner.plan_ratio` over an instance budget.

T_p(b) is the time b prompts of the mean length take through the chunked prefill steps (plus
the offer round trip), TPOT(b) one decode step of b sequences at the mean mid-decode context,
xi the hand-off of the mean prompt's KV, G the mean output minus the first token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pd_serve.bench.traces import TraceRequest
from pd_serve.orchestrator import planner
from pd_serve.orchestrator.perf_model import ScenarioProfile
from pd_serve.sim.config import InstanceSpec
from pd_serve.sim.latency import LatencyProfile, PrefillModel


@dataclass
class LengthStats:
    """Mean prompt and output lengths of one scenario's requests."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0

    def add(self, r: TraceRequest) -> None:
        self.requests += 1
        self.prompt_tokens += r.input_len
        self.output_tokens += max(1, r.output_len)

    @property
    def mean_prompt(self) -> float:
        return self.prompt_tokens / self.requests if self.requests else 1.0

    @property
    def mean_output(self) -> float:
        return self.output_tokens / self.requests if self.requests else 1.0


def length_stats(trace: Iterable[TraceRequest]) -> dict[str, LengthStats]:
    out: dict[str, LengthStats] = {}
    for r in trace:
        out.setdefault(r.scenario, LengthStats()).add(r)
    return out


def batch_prefill_time(model: PrefillModel, budget: int, batch: int, length: int) -> float:
    """Time until `batch` prompts of `length` tokens, queued together, are all computed, in
    steps of at most `budget` tokens (FIFO, chunked, as the scheduler batches them)."""
    remaining = [length] * batch
    done = [0] * batch
    total = 0.0
    while any(remaining):
        left, chunks = budget, []
        for i, r in enumerate(remaining):
            if r and left > 0:
                n = min(r, left)
                chunks.append((done[i], n))
                remaining[i] -= n
                done[i] += n
                left -= n
        total += model.time_of(chunks)
    return total


def scenario_profile(name: str, profile: LatencyProfile, spec: InstanceSpec, rtt_s: float,
                     mean_prompt: float, mean_output: float) -> ScenarioProfile:
    length = max(1, round(mean_prompt))
    g = max(mean_output - 1.0, 1e-3)
    tp = {b: batch_prefill_time(profile.prefill, spec.max_num_batched_tokens, b, length) + rtt_s
          for b in range(1, spec.b_p + 1)}
    sizes = sorted({1, spec.max_num_seqs} | {2 ** i for i in range(12)
                                             if 2 ** i < spec.max_num_seqs})
    tpot = {b: profile.decode.time(b, b * (length + 1 + g / 2)) for b in sizes}
    xi = profile.handoff.time(length * profile.kv_bytes_per_token)
    return ScenarioProfile(name=name, b_p=spec.b_p, b_d=spec.max_num_seqs, tpot_by_batch=tpot,
                           xi=xi, G=g, tp_by_batch=tp, prompt_tokens=mean_prompt,
                           output_tokens=mean_output)


def plan_groups(stats: dict[str, LengthStats], profile: LatencyProfile, spec: InstanceSpec,
                rtt_s: float, budget: int, min_per_role: int = 1) -> dict[str, planner.Plan]:
    """The real planner's split of `budget` instances for each scenario."""
    return {name: planner.plan_ratio(
        scenario_profile(name, profile, spec, rtt_s, s.mean_prompt, s.mean_output), budget,
        min_per_role=min_per_role) for name, s in sorted(stats.items())}
