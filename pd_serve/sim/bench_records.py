"""Simulated requests as the benchmark client's RequestRecords, so `pd-serve bench`'s metrics
(pd_serve.bench.metrics: vLLM's definitions, SLO attainment, per scenario) apply unchanged to
a simulated run. The simulator does not resolve individual tokens: a finished request's
chunks are its output tokens evenly spaced from the first token to the last (TTFT, TPOT and
E2EL exact; ITL is each request's mean gap). A terminated request has no chunk and status
503 (`ttft_deadline_exceeded`, as the gateway answers); a failed one keeps its first token.
"""

from __future__ import annotations

import math

import numpy as np

from pd_serve.bench.client import RequestRecord
from pd_serve.sim.records import FAILED, OUTCOMES, TERMINATED, Recorder

_STATUS = {TERMINATED: 503, FAILED: 200}
_ERROR = {TERMINATED: "ttft_deadline_exceeded", FAILED: "the simulated request failed"}


def request_records(recorder: Recorder) -> list[RequestRecord]:
    """One RequestRecord per request, times in seconds from the trace's start."""
    c = recorder.columns()
    out = []
    for i in range(len(recorder)):
        outcome = OUTCOMES[c["outcome"][i]]
        first, end = float(c["first_token_s"][i]), float(c["end_s"][i])
        n = int(c["output_tokens"][i])
        if math.isnan(first):
            chunks: tuple[float, ...] = ()
        elif outcome == "finished" and n >= 2:
            chunks = tuple(float(t) for t in np.linspace(first, end, n))
        else:
            chunks = (first,)
        arrival = float(c["arrival_s"][i])
        out.append(RequestRecord(
            i, recorder.scenario_names[c["scenario"][i]], arrival, arrival, chunks, end,
            int(c["prompt_tokens"][i]), int(c["max_tokens"][i]), int(c["prompt_tokens"][i]),
            n, True, _STATUS.get(outcome, 200), _ERROR.get(outcome, "")))
    return out


def duration_s(recorder: Recorder) -> float:
    """From the first arrival until every request ended (the bench's run duration)."""
    c = recorder.columns()
    return float(np.nanmax(c["end_s"]) - c["arrival_s"].min()) if len(recorder) else 0.0
