"""Per-request records of a simulation, stored by column (a million requests fit in tens of
MB), with the same fields a benchmark client records: arrival, first token, end, output tokens,
scenario, outcome (times in seconds on the simulated clock, from the trace's start).

Lifecycle: `Recorder(scenario_names)`; `start(req)` at arrival (request ids are arrival order);
`end(req, outcome, t, output_tokens)` exactly once per request (a second call is a bug);
`records()` yields one dict per request; `summary()` the aggregates (pd_serve.sim.summary).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from pd_serve.gateway import policy as pol
from pd_serve.sim.request import SimRequest

FINISHED, TERMINATED, FAILED = "finished", "terminated", "failed"
OUTCOMES = (FINISHED, TERMINATED, FAILED)
_CODE = {o: i for i, o in enumerate(OUTCOMES)}
OPEN = -1  # outcome code of a request that has not ended


class Recorder:
    def __init__(self, scenario_names: Sequence[str]) -> None:
        self.scenario_names = list(scenario_names)
        self.arrival = array("d")
        self.first_token = array("d")
        self.end_t = array("d")
        self.prompt_tokens = array("i")
        self.max_tokens = array("i")  # output tokens the request asked for
        self.cached_tokens = array("i")
        self.output_tokens = array("i")
        self.scenario = array("i")
        self.outcome = array("b")
        self.ttft_slo_met = array("b")
        self.rejections = array("i")
        self.open = 0
        self.on_finished: Callable[[SimRequest, float], None] | None = None

    def __len__(self) -> int:
        return len(self.arrival)

    def start(self, req: SimRequest, scenario_index: int) -> None:
        assert req.idx == len(self.arrival), "requests must start in id order"
        self.arrival.append(req.arrival)
        self.first_token.append(math.nan)
        self.end_t.append(math.nan)
        self.prompt_tokens.append(req.input_len)
        self.max_tokens.append(req.output_len)
        self.cached_tokens.append(0)
        self.output_tokens.append(0)
        self.scenario.append(scenario_index)
        self.outcome.append(OPEN)
        self.ttft_slo_met.append(0)
        self.rejections.append(0)
        self.open += 1

    def end(self, req: SimRequest, outcome: str, t: float, output_tokens: int) -> None:
        """Records how `req` ended at `t` (already shifted to when the gateway saw it)."""
        assert not req.ended, f"request {req.idx} ended twice"
        req.ended = True
        i = req.idx
        self.end_t[i] = t
        self.first_token[i] = req.first_token
        self.cached_tokens[i] = req.cached
        self.output_tokens[i] = output_tokens
        self.outcome[i] = _CODE[outcome]
        self.ttft_slo_met[i] = (not math.isnan(req.first_token)
                                and pol.first_token_in_slo(req.attempt, req.first_token))
        self.rejections[i] = len(req.attempt.rejections)
        self.open -= 1
        if outcome == FINISHED and self.on_finished is not None:
            self.on_finished(req, t)

    def columns(self) -> dict[str, np.ndarray]:
        """Zero-copy numpy views of the columns."""
        return {"arrival_s": np.frombuffer(self.arrival, dtype=np.float64),
                "first_token_s": np.frombuffer(self.first_token, dtype=np.float64),
                "end_s": np.frombuffer(self.end_t, dtype=np.float64),
                "prompt_tokens": np.frombuffer(self.prompt_tokens, dtype=np.int32),
                "max_tokens": np.frombuffer(self.max_tokens, dtype=np.int32),
                "cached_tokens": np.frombuffer(self.cached_tokens, dtype=np.int32),
                "output_tokens": np.frombuffer(self.output_tokens, dtype=np.int32),
                "scenario": np.frombuffer(self.scenario, dtype=np.int32),
                "outcome": np.frombuffer(self.outcome, dtype=np.int8),
                "ttft_slo_met": np.frombuffer(self.ttft_slo_met, dtype=np.int8),
                "rejections": np.frombuffer(self.rejections, dtype=np.int32)}

    def records(self) -> Iterator[dict[str, Any]]:
        """One JSON-safe dict per request, in arrival order."""
        for i in range(len(self.arrival)):
            code = self.outcome[i]
            first = self.first_token[i]
            yield {"index": i, "scenario": self.scenario_names[self.scenario[i]],
                   "arrival_s": self.arrival[i],
                   "first_token_s": None if math.isnan(first) else first,
                   "end_s": None if code == OPEN else self.end_t[i],
                   "prompt_tokens": self.prompt_tokens[i], "max_tokens": self.max_tokens[i],
                   "cached_tokens": self.cached_tokens[i],
                   "output_tokens": self.output_tokens[i],
                   "outcome": None if code == OPEN else OUTCOMES[code],
                   "ttft_slo_met": bool(self.ttft_slo_met[i]),
                   "rejections": self.rejections[i]}
