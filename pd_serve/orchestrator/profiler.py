"""Measures a scenario's `ScenarioProfile` on a live deployment through its gateway (OpenAI
API, streaming, token-id prompts so lengths are exact), for the planner (papers.md §1.4:
"T_p, T_d, b_p and b_d come from profiling a prompt pattern in advance").

Method (all requests use `ignore_eos`, temperature 0 and prompts of random token ids that share
nothing unless stated, so no prefix-cache hit helps them):
1. warm-up: one full request (first compilations, connections); discarded;
2. T_p: for each prefill batch b, `repeats` bursts of b requests sent at once with
   `max_tokens=1` (prefill only: no hand-off, no decode load). The gateway spreads requests
   as its policy says, so the batch is not assumed: each request's timeline names the prefill
   instance that accepted it, and each instance that took k of a burst's requests gives one
   *makespan* keyed k: from the earliest gateway arrival to the last first token among those
   k requests (`prefill_makespans`). `ttft_by_batch[k]` is the mean makespan at k over all
   bursts. The makespan, not a request's own TTFT, is what the E2E model needs: T_p is the
   time an instance takes to prefill a batch of b_p prompts (capacity n_p * b_p / T_p), and
   an engine whose chunked prefill (max_num_batched_tokens) serialises long prompts returns
   the burst's first tokens one by one, so the first finisher's TTFT would understate T_p by
   up to b times (and a per-request "effective batch" would key it to the wrong batch). For a
   burst that is prefilled as one batch the makespan is every request's TTFT, as before. The
   table is the *cold* TTFT of the perf model (`ttft_by_batch` with `r_pre`, T_p = TTFT *
   r_pre), read as "time to the batch's last first token". Prefilling b+1 prompts cannot be
   faster than b on the same instance, so a measured drop is noise (or a burst the gateway
   split unevenly): the table is made non-decreasing in b with a running max, and the drop is
   reported in the notes with the raw means. Under the default `forwarding` policy a burst of
   b <= b_p lands on one instance (batch forwarding), so k = b; policies that spread a burst
   give smaller k, so profile those with one prefill instance in the scenario;
3. TPOT and xi: for each decode batch b, one burst of b * `decode_instances` requests with
   `output_tokens` each (decode picks the least busy decode instance, so the burst spreads
   over the group). A request's TPOT is its decode span (first to last decode delta) over
   the tokens in it, keyed by its *effective batch* on its decode instance: the time-averaged
   number of the burst's requests decoding there during its span (`effective_batches`). xi is
   the gap from the first token to the first decode delta minus the decode steps in it,
   averaged over the smallest decode batch. Requests whose prefills finish one by one (long
   prompts) reach decode staggered and may never decode b_d together: when the largest
   effective batch measured is below b_d, TPOT(b_d) is clamped to it (the perf model does not
   extrapolate), which overstates decode capacity; the report's notes say so (and it is
   logged). Raise `output_tokens` so that the decode spans overlap;
4. r_pre (only when `prefix_tokens` > 0): one burst of prompts sharing a `prefix_tokens`
   prefix warms it, then every prefill burst of step 2 is repeated with such prompts; r_pre =
   the mean over their per-instance makespans of warm makespan / cold makespan at the same k
   (the published `ttft_by_batch`, so TTFT * r_pre is the warm makespan), capped at 1. This
   is the benefit this deployment gives the scenario's prompts, its cache hit rate included;
5. G = mean completion tokens - 1 (the first comes from prefill).

`ScenarioProfile` has no room for remarks, so `measure` and `profile_report` return a
`ProfileReport`: the profile, the notes (each also logged as a warning) and the raw prefill
means; `profile_scenario` returns the profile alone.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import httpx

from pd_serve.orchestrator.perf_model import ScenarioProfile, interpolate
from pd_serve.orchestrator.profile_client import GatewayProbe, ProfileError, Sample

__all__ = ["Probe", "ProfileError", "ProfileReport", "ProfileWorkload", "default_batches",
           "effective_batches", "measure", "monotone", "prefill_makespans", "profile_report",
           "profile_scenario"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileWorkload:
    """The prompt pattern of a scenario and the batch sizes to profile up to."""

    prompt_tokens: int = 128
    prefix_tokens: int = 0  # shared prefix of the scenario's prompts (0: r_pre = 1)
    output_tokens: int = 16  # completion tokens per request (>= 3: TPOT needs decode deltas)
    b_p: int = 4  # the prefill instances' batch slots
    b_d: int = 8  # the decode batch to profile up to
    decode_instances: int = 1  # decode instances of the group (decode bursts scale by it)
    repeats: int = 2  # bursts per prefill batch size
    token_id_max: int = 256  # prompt token ids are drawn from [1, token_id_max)
    seed: int = 0
    timeout_s: float = 300.0  # one request, end to end

    def __post_init__(self) -> None:
        for key, low in (("prompt_tokens", 1), ("output_tokens", 3), ("b_p", 1), ("b_d", 1),
                         ("decode_instances", 1), ("repeats", 1), ("token_id_max", 2),
                         ("prefix_tokens", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key}: expected an integer >= {low}, got {value!r}")
        if self.prefix_tokens >= self.prompt_tokens:
            raise ValueError(f"prefix_tokens: must be below prompt_tokens "
                             f"({self.prefix_tokens} >= {self.prompt_tokens})")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number, got {self.timeout_s!r}")


@dataclass(frozen=True)
class ProfileReport:
    """What profiling measured: the `profile`, `notes` on its limits (why a number in it is
    less trustworthy than it looks; empty when none) and `raw_ttft_by_batch`, the mean prefill
    makespans per batch before the running max that made `profile.ttft_by_batch`
    non-decreasing."""

    profile: ScenarioProfile
    notes: tuple[str, ...] = ()
    raw_ttft_by_batch: Mapping[int, float] = field(
        default_factory=lambda: MappingProxyType({}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (table keys become strings)."""
        return {"profile": self.profile.to_dict(), "notes": list(self.notes),
                "raw_ttft_by_batch": {str(b): v for b, v in self.raw_ttft_by_batch.items()}}


def default_batches(b: int) -> tuple[int, ...]:
    """1, 2, 4, ... below b, then b."""
    out = [1 << i for i in range(b.bit_length()) if 1 << i < b]
    return (*out, b)


def _check_batches(key: str, batches: Iterable[int], top: int) -> tuple[int, ...]:
    out = tuple(batches)
    if not out or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= top
                      for b in out):
        raise ValueError(f"{key}: expected batch sizes in 1..{top}, got {out!r}")
    return tuple(sorted(set(out)))


def effective_batches(spans: Sequence[tuple[float, float]]) -> list[float]:
    """For each (start, end) span: the time-averaged number of spans open during it, itself
    included (an instant span counts the spans that contain it)."""
    out: list[float] = []
    for s0, s1 in spans:
        if s1 <= s0:
            out.append(float(sum(1 for o0, o1 in spans if o0 <= s0 <= o1)))
            continue
        overlap = sum(max(0.0, min(s1, o1) - max(s0, o0)) for o0, o1 in spans)
        out.append(overlap / (s1 - s0))
    return out


def prefill_makespans(burst: Sequence[Sample]) -> list[tuple[int, float]]:
    """One (k, makespan) per prefill instance that took k of the burst's requests: from the
    earliest gateway arrival to the last first token among them."""
    by_instance: dict[str, list[Sample]] = defaultdict(list)
    for s in burst:
        by_instance[s.instance].append(s)
    return [(len(members), max(s.first_token_at for s in members)
             - min(s.arrived_at for s in members)) for members in by_instance.values()]


def monotone(table: Mapping[int, float]) -> dict[int, float]:
    """`table` made non-decreasing in the batch size with a running max."""
    out: dict[int, float] = {}
    top = 0.0
    for b, v in sorted(table.items()):
        top = max(top, v)
        out[b] = top
    return out


def _fmt(table: Mapping[int, float]) -> str:
    return "{" + ", ".join(f"{b}: {v:.4g}" for b, v in sorted(table.items())) + "}"


def _keyed(samples: Sequence[Sample], group: Callable[[Sample], Hashable],
           span: Callable[[Sample], tuple[float, float]]) -> list[tuple[int, Sample]]:
    """(effective batch rounded, sample), computed among samples of the same group."""
    groups: dict[Hashable, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[group(s)].append(s)
    out: list[tuple[int, Sample]] = []
    for members in groups.values():
        eff = effective_batches([span(s) for s in members])
        out += [(max(1, int(e + 0.5)), s) for e, s in zip(eff, members)]
    return out


def _mean_table(pairs: Iterable[tuple[int, float]]) -> dict[int, float]:
    sums: dict[int, list[float]] = defaultdict(list)
    for k, v in pairs:
        sums[k].append(v)
    return {k: sum(vs) / len(vs) for k, vs in sorted(sums.items())}


def _decode_span(s: Sample) -> tuple[float, float]:
    return (s.tokens[1][0], s.tokens[-1][0])


def _tpot(s: Sample) -> float:
    (t0, n0), (t1, n1) = s.tokens[1], s.tokens[-1]
    return (t1 - t0) / (n1 - n0)


def _xi(s: Sample) -> float:
    t0, n0 = s.tokens[1]
    return max(0.0, t0 - s.first_token_at - (n0 - 1) * _tpot(s))


class Probe(Protocol):
    """What profiling needs of a gateway (GatewayProbe; a fake in unit tests)."""

    async def max_model_len(self) -> int: ...

    async def burst(self, prompts: list[list[int]], max_tokens: int) -> list[Sample]: ...


class _Prompts:
    def __init__(self, w: ProfileWorkload) -> None:
        self.w = w
        self.rng = random.Random(w.seed)
        self.prefix = self._ids(w.prefix_tokens)

    def _ids(self, n: int) -> list[int]:
        return [self.rng.randrange(1, self.w.token_id_max) for _ in range(n)]

    def cold(self, n: int) -> list[list[int]]:
        return [self._ids(self.w.prompt_tokens) for _ in range(n)]

    def warm(self, n: int) -> list[list[int]]:
        return [self.prefix + self._ids(self.w.prompt_tokens - len(self.prefix))
                for _ in range(n)]


async def profile_scenario(base_url: str, scenario: str, workload: ProfileWorkload,
                           batches: Iterable[int] | None = None,
                           decode_batches: Iterable[int] | None = None, *,
                           api_key: str | None = None,
                           client: httpx.AsyncClient | None = None) -> ScenarioProfile:
    """Profiles `scenario` through the gateway at `base_url` (see the module docstring).
    `batches` default to 1, 2, 4, ... b_p; `decode_batches` to 1, 2, 4, ... b_d. ValueError on
    a bad workload or batch list; ProfileError when the gateway fails a request. The notes of
    `profile_report` are logged as warnings (call that to keep them)."""
    report = await profile_report(base_url, scenario, workload, batches, decode_batches,
                                  api_key=api_key, client=client)
    return report.profile


async def profile_report(base_url: str, scenario: str, workload: ProfileWorkload,
                         batches: Iterable[int] | None = None,
                         decode_batches: Iterable[int] | None = None, *,
                         api_key: str | None = None,
                         client: httpx.AsyncClient | None = None) -> ProfileReport:
    """`profile_scenario` with its notes: the `ProfileReport`."""
    pb = _check_batches("batches", batches or default_batches(workload.b_p), workload.b_p)
    db = _check_batches("decode_batches", decode_batches or default_batches(workload.b_d),
                        workload.b_d)
    own = client is None
    http = client or httpx.AsyncClient(
        timeout=httpx.Timeout(30.0, read=workload.timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
    try:
        return await measure(GatewayProbe(base_url, scenario, http, api_key), scenario,
                              workload, pb, db)
    finally:
        if own:
            await http.aclose()


async def measure(probe: Probe, scenario: str, w: ProfileWorkload,
                  pb: tuple[int, ...], db: tuple[int, ...]) -> ProfileReport:
    """Steps 1-5 of the module docstring on any Probe (`pb`, `db`: sorted batch sizes)."""
    limit = await probe.max_model_len()
    if w.prompt_tokens + w.output_tokens > limit:
        raise ValueError(f"prompt_tokens: {w.prompt_tokens} + output_tokens {w.output_tokens} "
                         f"exceed the model's {limit} tokens")
    notes: list[str] = []

    def note(text: str) -> None:
        log.warning("profile of %s: %s", scenario, text)
        notes.append(text)

    prompts = _Prompts(w)
    await probe.burst(prompts.cold(1), w.output_tokens)
    raw, ttft = await _measure_prefill(probe, prompts, w, pb, note)
    decoded, tpot = await _measure_decode(probe, prompts, w, db, note)
    r_pre = await _measure_r_pre(probe, prompts, w, pb, ttft, note) if w.prefix_tokens else 1.0
    timed = [s for burst in decoded for s in burst]
    out_tokens = sum(s.completion_tokens for s in timed) / len(timed)
    profile = ScenarioProfile(
        name=scenario, b_p=w.b_p, b_d=w.b_d, ttft_by_batch=ttft, r_pre=r_pre,
        tpot_by_batch=tpot, xi=sum(_xi(s) for s in decoded[0]) / len(decoded[0]),
        G=out_tokens - 1, prompt_tokens=float(w.prompt_tokens), output_tokens=out_tokens)
    return ProfileReport(profile, tuple(notes), MappingProxyType(raw))


Note = Callable[[str], None]


async def _measure_prefill(probe: Probe, prompts: _Prompts, w: ProfileWorkload,
                           pb: tuple[int, ...], note: Note
                           ) -> tuple[dict[int, float], dict[int, float]]:
    """Step 2: mean prefill makespan per batch (raw) and its running max (published)."""
    spans: list[tuple[int, float]] = []
    for b in pb:
        for _ in range(w.repeats):
            spans += prefill_makespans(await probe.burst(prompts.cold(b), 1))
    raw = _mean_table(spans)
    ttft = monotone(raw)
    raised = [b for b in raw if ttft[b] > raw[b]]
    if raised:
        note(f"prefill makespans are not non-decreasing in the batch size (raw means "
             f"{_fmt(raw)} s); raised to the running max at batch {raised} (a batch cannot "
             f"prefill faster than a smaller one on the same instance: the drop is noise or "
             f"an unevenly split burst; more repeats would steady it)")
    if max(ttft) < w.b_p:
        note(f"prefill batches reached at most {max(ttft)} of b_p={w.b_p} (requested {pb}): "
             f"T_p(b_p) is clamped to T_p({max(ttft)}), so prefill capacity is overstated")
    return raw, ttft


async def _measure_decode(probe: Probe, prompts: _Prompts, w: ProfileWorkload,
                          db: tuple[int, ...], note: Note
                          ) -> tuple[list[list[Sample]], dict[int, float]]:
    """Step 3: the timed decode bursts (first: the smallest batch, for xi) and TPOT(b)."""
    decoded: list[list[Sample]] = []
    for b in db:
        burst = await probe.burst(prompts.cold(b * w.decode_instances), w.output_tokens)
        decoded.append([s for s in burst if len(s.tokens) >= 3
                        and s.tokens[-1][1] > s.tokens[1][1]])
    timed = [s for burst in decoded for s in burst]
    if not timed or not decoded[0]:
        raise ProfileError("no request produced two decode deltas to time TPOT; raise "
                           "output_tokens")
    tpot = _mean_table((k, _tpot(s)) for k, s in _keyed(timed, _decode_url, _decode_span))
    if max(tpot) < w.b_d:
        note(f"decode bursts reached an effective batch of at most {max(tpot)} of b_d={w.b_d} "
             f"(requested {db}): TPOT(b_d) is clamped to TPOT({max(tpot)}) = "
             f"{tpot[max(tpot)]:.4g} s, so decode capacity is overstated (long prompts reach "
             f"decode one by one; raise output_tokens so that their decodes overlap)")
    return decoded, tpot


async def _measure_r_pre(probe: Probe, prompts: _Prompts, w: ProfileWorkload,
                         pb: tuple[int, ...], ttft: dict[int, float], note: Note) -> float:
    """Step 4: warm over cold makespan at the same batch, capped at 1."""
    await probe.burst(prompts.warm(max(pb)), 1)
    ratios: list[float] = []
    for b in pb:
        for _ in range(w.repeats):
            ratios += [span / interpolate(ttft, k) for k, span
                       in prefill_makespans(await probe.burst(prompts.warm(b), 1))]
    mean = sum(ratios) / len(ratios)
    if mean > 1.0:
        note(f"prompts sharing the {w.prefix_tokens}-token prefix prefilled no faster than "
             f"cold ones (mean makespan ratio {mean:.3g}): r_pre capped at 1")
    return min(1.0, max(1e-3, mean))


def _instance(s: Sample) -> str:
    return s.instance


def _decode_url(s: Sample) -> str:
    return s.decode_url or "?"
