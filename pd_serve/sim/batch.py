"""A decode batch advanced analytically between membership changes, so the simulator spends
events on requests joining and finishing, never on individual tokens.

Between changes the batch size B is fixed and every step adds one token to each member, so the
step time a + b*B + c*X grows linearly (X, the context term, gains B per step: packed
X = sum of contexts, padded X = B * max context). The time of the k-th step boundary after
`t0` is then closed-form: t0 + f * (k*D + c*B*k*(k-1)/2), with D the first step's time and f
the segment's noise factor.

Lifecycle (caller: one decode or aggregated instance):
1. `restart(t)` starts a segment at a step boundary `t` (new noise factor);
2. `add(req, remaining)` makes `req` a member that needs `remaining` more steps;
3. `boundary(k)` / `steps_to(t)` / `steps_to_finish()` locate boundaries; `advance(k, t)`
   moves to the k-th boundary (at time t), then `pop_finished()` returns members done there.
"""

from __future__ import annotations

import heapq
import math

from pd_serve.sim.engine import Noise
from pd_serve.sim.latency import DecodeModel
from pd_serve.sim.request import SimRequest


class DecodeRun:
    __slots__ = ("a", "b", "c", "padded", "noise", "t0", "factor", "steps", "size",
                 "key_sum", "_finish", "_maxkey", "_seq")

    def __init__(self, model: DecodeModel, noise: Noise | None) -> None:
        if model.time(1, 1) <= 0:
            raise ValueError("decode model: a step must take positive time")
        self.a, self.b, self.c = model.intercept_s, model.per_seq_s, model.per_context_s
        self.padded = model.padded
        self.noise = noise
        self.t0 = 0.0
        self.factor = 1.0
        self.steps = 0  # boundaries passed since the instance started
        self.size = 0
        self.key_sum = 0  # sum over members of (context - steps)
        self._finish: list[tuple[int, int, SimRequest]] = []  # (finish step, seq, req)
        self._maxkey: list[tuple[int, int, SimRequest]] = []  # (-key, seq, req), lazy
        self._seq = 0

    def restart(self, t: float) -> None:
        self.t0 = t
        self.factor = self.noise() if self.noise is not None else 1.0

    def add(self, req: SimRequest, remaining: int) -> None:
        """`req` decodes from the next step on, with its prompt and first token as context."""
        self._seq += 1
        req.finish_step = self.steps + remaining
        req.ctx_key = req.input_len + 1 - self.steps
        self.size += 1
        self.key_sum += req.ctx_key
        heapq.heappush(self._finish, (req.finish_step, self._seq, req))
        if self.padded:
            heapq.heappush(self._maxkey, (-req.ctx_key, self._seq, req))

    def _context(self) -> float:
        if not self.padded:
            return self.key_sum + self.size * self.steps
        top = self._maxkey
        while top and top[0][2].finish_step <= self.steps:  # left the batch
            heapq.heappop(top)
        return self.size * (self.steps - top[0][0]) if top else 0.0

    def boundary(self, k: int) -> float:
        """Time of the k-th step boundary after t0 (k >= 1)."""
        d = self.a + self.b * self.size + self.c * self._context()
        return self.t0 + self.factor * (k * d + self.c * self.size * k * (k - 1) / 2)

    def steps_to(self, t: float) -> int:
        """The smallest k >= 1 whose boundary is at or after `t`."""
        delta = (t - self.t0) / self.factor
        d = self.a + self.b * self.size + self.c * self._context()
        s = self.c * self.size
        if delta <= 0:
            k = 1
        elif s == 0:
            k = math.ceil(delta / d)
        else:
            h = d - s / 2
            k = math.ceil((-h + math.sqrt(h * h + 2 * s * delta)) / s)
        k = max(1, k)
        while self.boundary(k) < t:
            k += 1
        while k > 1 and self.boundary(k - 1) >= t:
            k -= 1
        return k

    def steps_to_finish(self) -> int:
        """Steps until the next member finishes (the batch must not be empty)."""
        return self._finish[0][0] - self.steps

    def advance(self, k: int, t: float) -> None:
        self.steps += k
        self.t0 = t

    def pop_finished(self) -> list[SimRequest]:
        done: list[SimRequest] = []
        heap = self._finish
        while heap and heap[0][0] <= self.steps:
            req = heapq.heappop(heap)[2]
            self.size -= 1
            self.key_sum -= req.ctx_key
            done.append(req)
        return done
