"""A numbered log of finished requests (scenario, outcome, TTFT, TPOT, E2E, SLO) that readers
page through with a cursor: the orchestrator's online adjuster and profiler read it from
`GET /stats/samples?since=N` to see exactly the requests finished since their last look.

Lifecycle: `SampleLog(capacity)`; `add(timeline)` once per finished request (the oldest samples
fall off past `capacity`); `since(seq, limit)` returns samples numbered > seq and the cursor.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from pd_serve.gateway.timeline import Timeline


class SampleLog:
    def __init__(self, capacity: int) -> None:
        self._samples: deque[dict[str, Any]] = deque(maxlen=capacity)
        self.seq = 0

    def add(self, tl: Timeline) -> None:
        self.seq += 1
        self._samples.append({
            "seq": self.seq, "scenario": tl.scenario, "outcome": tl.outcome,
            "prompt_tokens": tl.prompt_tokens, "completion_tokens": tl.completion_tokens,
            "ttft_s": tl.ttft(), "tpot_s": tl.tpot(), "e2e_s": tl.e2e(),
            "ttft_slo_met": tl.in_slo(), "rejections": tl.rejections, "finished_at": time.time()})

    def since(self, seq: int, limit: int = 10000) -> dict[str, Any]:
        """Samples numbered above `seq` (oldest first, at most `limit`), with `next` (the
        cursor for the next call) and `dropped` (samples that fell off before being read)."""
        out = [s for s in self._samples if s["seq"] > seq][:max(0, limit)]
        oldest = self._samples[0]["seq"] if self._samples else self.seq + 1
        nxt = out[-1]["seq"] if out else min(seq, self.seq)  # a restarted gateway: resync
        return {"next": nxt, "samples": out, "dropped": max(0, oldest - seq - 1)}
