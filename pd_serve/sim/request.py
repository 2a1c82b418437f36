"""One simulated request: its trace fields plus where it is (gateway attempt, prefill instance
and slot, decode instance) and its timestamps; mutable, slotted (a million may be in flight).

Lifecycle: created at arrival by the driver; the gateway forwards it; a prefill (or aggregated)
instance computes it and emits the first token; a decode instance generates the rest; exactly
one `Recorder.end` call records its outcome, after which nothing refers to it.
"""

from __future__ import annotations

import math
from typing import Any

from pd_serve.gateway import policy as pol


class SimRequest:
    __slots__ = (
        "idx", "scenario", "input_len", "output_len", "hash_ids", "arrival",
        "attempt", "verdict", "wait_origin", "wait_k", "park_token",
        "prefill", "slot", "deadline", "queued", "computed", "cached", "first_token",
        "candidates", "peer", "decode", "finish_step", "ctx_key", "ended",
    )

    def __init__(self, idx: int, scenario: Any, input_len: int, output_len: int,
                 hash_ids: tuple[int, ...], arrival: float) -> None:
        self.idx = idx
        self.scenario = scenario  # the gateway's _Scenario
        self.input_len = input_len
        self.output_len = output_len
        self.hash_ids = hash_ids
        self.arrival = arrival
        self.attempt: pol.Attempt = pol.Attempt(arrival, math.inf)
        self.verdict = ""  # the instance's answer to the last offer
        self.wait_origin = 0.0  # consecutive Waits sleep until wait_origin + wait_k * interval
        self.wait_k = 0
        self.park_token = 0
        self.prefill: Any = None  # the instance that accepted it
        self.slot = -1
        self.deadline: float | None = None  # TTFT budget on the instance (queued offers)
        self.queued = False  # in a prefill instance's local FIFO
        self.computed = 0  # prompt tokens whose KV exists (cached + computed)
        self.cached = 0
        self.first_token = math.nan  # when the first token reached the gateway
        self.candidates: list[str] = []  # decode peers not yet offered the hand-off
        self.peer = ""  # decode peer holding the hand-off
        self.decode: Any = None
        self.finish_step = 0  # decode step (of its instance's count) producing its last token
        self.ctx_key = 0  # context - instance step count (constant while it decodes)
        self.ended = False
