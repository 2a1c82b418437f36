"""Pure forwarding policies of the gateway (forwarding with rejections, fifo, round-robin): state
and a clock in, decisions out, so the real gateway and the simulator run the same code.

Lifecycle of one request against a scenario's `RouterState`:
1. `Attempt.start(arrival, deadline_s)` when the request arrives (deadline from `ttft_deadline`);
2. loop: `decide(policy, state, attempt, now, retry_interval_s)` returns an `Offer` (send it,
   after `note_offer`), a `Wait` (a full round was rejected: sleep, then decide again) or a
   `Terminate` (the TTFT deadline passed with no acceptance);
3. the offer's answer: `note_accept` (the instance holds one more open stream and becomes the
   batch-forwarding target) or `note_reject` (recorded; the target is dropped if it rejected);
4. when the instance's stream closes, `note_close`; `first_token_in_slo` judges the first token;
5. `note_done` once the request stops forwarding (accepted, terminated or cancelled).

Waiting line (forwarding): requests that found every instance busy wait at the gateway in
arrival order. Only the head of the line retries; a newer request joins the line's tail instead
of offering while anyone is waiting, so a freed slot goes to the oldest waiting request, as a
prefill-local FIFO would give it, without any request waiting inside a prefill instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pd_serve.config import TTFTBand

FORWARDING, FIFO, ROUND_ROBIN = "forwarding", "fifo", "round_robin"


@dataclass
class RouterState:
    """Per scenario: its instances (configured order), open streams per instance, the
    batch-forwarding target (last instance that accepted) and the round-robin cursor."""

    instances: tuple[str, ...]
    open_streams: dict[str, int] = field(default_factory=dict)
    target: str | None = None
    rr_cursor: int = 0
    waiting: list[int] = field(default_factory=list)  # ids of attempts in line, oldest first
    next_id: int = 0

    def __post_init__(self) -> None:
        for inst in self.instances:
            self.open_streams.setdefault(inst, 0)


def set_instances(state: RouterState, instances: Sequence[str]) -> None:
    """The scenario's prefill instances changed (the orchestrator's meta info): new ones start
    with no open streams, streams still open on removed ones keep their counts until they close;
    the batch-forwarding target is dropped when it left. Requests in line keep their places."""
    state.instances = tuple(dict.fromkeys(instances))
    for inst in state.instances:
        state.open_streams.setdefault(inst, 0)
    if state.target not in state.instances:
        state.target = None
    if state.instances:
        state.rr_cursor %= len(state.instances)
    else:
        state.rr_cursor = 0


@dataclass
class Attempt:
    """One request's forwarding so far: deadline, instances offered this round, rejections."""

    arrival: float
    deadline: float
    tried: list[str] = field(default_factory=list)
    rejections: list[tuple[str, str]] = field(default_factory=list)
    accepted: str | None = None
    id: int = -1  # set by `join` (the gateway's arrival order), -1 until then

    @classmethod
    def start(cls, arrival: float, deadline_s: float) -> Attempt:
        return cls(arrival, arrival + deadline_s)


@dataclass(frozen=True)
class Offer:
    """Offer the request to `instance`; `queue`: the instance may queue it (baselines) with
    `deadline_s` seconds of TTFT budget left."""

    instance: str
    queue: bool
    deadline_s: float


@dataclass(frozen=True)
class Wait:
    """Every candidate rejected this round: wait `seconds`, then decide again."""

    seconds: float


@dataclass(frozen=True)
class Terminate:
    """The TTFT deadline passed with no acceptance: end the request with `reason`."""

    reason: str


Decision = Offer | Wait | Terminate


def ttft_deadline(bands: Sequence[TTFTBand], prompt_tokens: int) -> float:
    """The deadline of the first band the prompt fits; longer than all: the last band's."""
    for band in bands:
        if band.max_prompt_tokens is None or prompt_tokens <= band.max_prompt_tokens:
            return band.deadline_s
    return bands[-1].deadline_s


def rank(instances: Sequence[str], open_streams: Mapping[str, int]) -> list[str]:
    """Fewest open streams first, ties in configured order."""
    order = {u: i for i, u in enumerate(instances)}
    return sorted(instances, key=lambda u: (open_streams.get(u, 0), order[u]))


def candidates(policy: str, state: RouterState) -> list[str]:
    """The order in which one round offers the instances under `policy`."""
    if policy == ROUND_ROBIN:
        n = len(state.instances)
        if n == 0:
            return []
        return [state.instances[(state.rr_cursor + i) % n] for i in range(n)]
    ranked = rank(state.instances, state.open_streams)
    if policy == FORWARDING and state.target in ranked:
        ranked.remove(state.target)  # batch forwarding: the last acceptor until it rejects
        ranked.insert(0, state.target)
    return ranked


def join(state: RouterState, attempt: Attempt) -> None:
    """Numbers a newly arrived attempt in arrival order (call once, before `decide`)."""
    attempt.id = state.next_id
    state.next_id += 1


def decide(policy: str, state: RouterState, attempt: Attempt, now: float,
           retry_interval_s: float) -> Decision:
    """The next step for `attempt` at time `now` (checked against the deadline first)."""
    if now >= attempt.deadline:
        return Terminate(_reason(attempt, now, state))
    if policy == FORWARDING and state.waiting and state.waiting[0] != attempt.id:
        if attempt.id not in state.waiting:
            state.waiting.append(attempt.id)  # others are waiting: no overtaking
        return _wait_or_end(attempt, now, retry_interval_s, state)
    untried = [c for c in candidates(policy, state) if c not in attempt.tried]
    if untried:
        return Offer(untried[0], policy != FORWARDING, attempt.deadline - now)
    if policy == FORWARDING and attempt.id not in state.waiting:
        state.waiting.append(attempt.id)  # a whole round rejected: wait in line
    return _wait_or_end(attempt, now, retry_interval_s, state)


def _wait_or_end(attempt: Attempt, now: float, retry_interval_s: float,
                 state: RouterState) -> Decision:
    if now + retry_interval_s >= attempt.deadline:
        return Terminate(_reason(attempt, now, state))
    return Wait(retry_interval_s)


def _reason(attempt: Attempt, now: float, state: RouterState | None = None) -> str:
    waited = now - attempt.arrival
    if state is not None and not state.instances:
        return (f"TTFT deadline passed after {waited:.3f} s: the scenario has no prefill "
                "instance serving right now")
    if not attempt.rejections:
        return (f"TTFT deadline passed after {waited:.3f} s waiting at the gateway behind "
                "earlier requests (every prefill slot busy); no instance was offered it")
    seen: dict[str, str] = {}
    for inst, why in attempt.rejections:
        seen[inst] = why
    detail = "; ".join(f"{i}: {w}" for i, w in seen.items())
    return (f"no prefill instance accepted the request within its TTFT deadline "
            f"({waited:.3f} s, {len(attempt.rejections)} rejection(s): {detail})")


def note_offer(policy: str, state: RouterState, attempt: Attempt, instance: str) -> None:
    """The offer of `instance` is being sent; round-robin moves its cursor past it."""
    attempt.tried.append(instance)
    if policy == ROUND_ROBIN:
        state.rr_cursor = (state.instances.index(instance) + 1) % len(state.instances)


def note_accept(state: RouterState, attempt: Attempt, instance: str) -> None:
    attempt.accepted = instance
    state.open_streams[instance] = state.open_streams.get(instance, 0) + 1
    state.target = instance


def note_reject(state: RouterState, attempt: Attempt, instance: str, reason: str) -> None:
    attempt.rejections.append((instance, reason))
    if state.target == instance:
        state.target = None


def note_wait(attempt: Attempt) -> None:
    """A Wait was slept: the next round may offer every instance again."""
    attempt.tried.clear()


def note_done(state: RouterState, attempt: Attempt) -> None:
    """The attempt stopped forwarding (accepted, terminated or cancelled): it leaves the line."""
    if attempt.id in state.waiting:
        state.waiting.remove(attempt.id)


def note_close(state: RouterState, instance: str) -> None:
    state.open_streams[instance] = max(0, state.open_streams.get(instance, 0) - 1)


def first_token_in_slo(attempt: Attempt, first_token_at: float) -> bool:
    """Checked after prefill: a first token after the deadline is an SLO failure."""
    return first_token_at <= attempt.deadline
