"""The prefill side of a simulated engine, batched as the real scheduler batches
(pd_serve.engine.scheduler): each step first continues the requests whose prefill is
unfinished, then admits waiting requests in FIFO order while the token budget
(`max_num_batched_tokens`) and the sequence limit allow; a prompt longer than the budget left
is computed in chunks over several steps; the head of the queue is never skipped.

Lifecycle (caller: one simulated instance):
1. `add(req)` queues an admitted request;
2. `compose(seq_room, admit)` picks the next step's chunks (None when there is no prefill work);
   the prefix cache is looked up when a request is admitted into a batch;
3. after the step's duration (`duration`), `complete(chunks)` records the computed tokens and
   returns the requests whose prefill is done (their blocks go into the prefix cache).
What is abstracted: token ids (only counts matter), the prefill instance's own KV blocks (its
`b_p` slots bound them), and preemption.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from pd_serve.sim.config import InstanceSpec
from pd_serve.sim.latency import PrefillModel
from pd_serve.sim.prefix_cache import PrefixCache
from pd_serve.sim.request import SimRequest

Chunks = tuple[list[SimRequest], list[int]]  # requests and the tokens each computes this step
Noise = Callable[[], float]


class PrefillWork:
    __slots__ = ("waiting", "running", "budget", "model", "cache", "block_tokens", "noise")

    def __init__(self, spec: InstanceSpec, model: PrefillModel, noise: Noise | None) -> None:
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []  # prefill started, not finished; admission order
        self.budget = spec.max_num_batched_tokens
        self.model = model
        self.cache = PrefixCache(spec.prefix_cache_blocks) if spec.prefix_cache_blocks else None
        self.block_tokens = spec.hash_block_tokens
        self.noise = noise

    def add(self, req: SimRequest) -> None:
        self.waiting.append(req)

    @property
    def busy(self) -> int:
        """Requests queued or mid-prefill."""
        return len(self.waiting) + len(self.running)

    def compose(self, seq_room: int,
                admit: Callable[[SimRequest], bool] | None = None) -> Chunks | None:
        """The next step's chunks; `seq_room`: sequences the engine may still admit; `admit`
        (aggregated engines) may refuse the queue head (no KV blocks), which then waits."""
        budget = self.budget
        reqs: list[SimRequest] = []
        tokens: list[int] = []
        for req in self.running:
            if budget <= 0:
                break
            n = min(req.input_len - req.computed, budget)
            reqs.append(req)
            tokens.append(n)
            budget -= n
        waiting = self.waiting
        while waiting and budget > 0 and seq_room > 0:
            req = waiting[0]
            if admit is not None and not admit(req):
                break
            waiting.popleft()
            self._lookup(req)
            self.running.append(req)
            seq_room -= 1
            n = min(req.input_len - req.computed, budget)
            reqs.append(req)
            tokens.append(n)
            budget -= n
        return (reqs, tokens) if reqs else None

    def _lookup(self, req: SimRequest) -> None:
        if self.cache is None or not req.hash_ids:
            return
        hit = self.cache.match(req.hash_ids) * self.block_tokens
        req.cached = req.computed = min(hit, req.input_len - 1)  # one token is always computed

    def duration(self, chunks: Chunks) -> float:
        reqs, tokens = chunks
        model = self.model
        if model.padded:
            t = max(tokens)
            c = max(r.computed + n for r, n in zip(reqs, tokens))
            seconds = model.time(len(reqs), len(reqs) * t, len(reqs) * t * c)
        else:
            attn = sum(n * (r.computed + (n + 1) / 2) for r, n in zip(reqs, tokens))
            seconds = model.time(len(reqs), sum(tokens), attn)
        return seconds * self.noise() if self.noise is not None else seconds

    def complete(self, chunks: Chunks) -> list[SimRequest]:
        """Records the step's computed tokens; the requests whose prefill is now done."""
        done: list[SimRequest] = []
        for req, n in zip(*chunks):
            req.computed += n
            if req.computed >= req.input_len:
                done.append(req)
        if done:
            for req in done:
                self.running.remove(req)
                if self.cache is not None and req.hash_ids:
                    self.cache.insert(req.hash_ids, req.input_len // self.block_tokens)
        return done


def lognormal_noise(rng_lognorm: Callable[[float, float], float], cv: float) -> Noise | None:
    """A mean-1 multiplicative noise with coefficient of variation `cv` (None when 0)."""
    if cv <= 0:
        return None
    sigma = math.sqrt(math.log1p(cv * cv))
    mu = -sigma * sigma / 2
    return lambda: rng_lognorm(mu, sigma)
