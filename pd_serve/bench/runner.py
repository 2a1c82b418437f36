"""One benchmark run end to end: find the served model, build the workload, send it with a
progress bar, and compute the metrics overall and per scenario.

Lifecycle:
1. `discover(base_url, ...)` waits for `GET /v1/models` (up to `ready_timeout_s`) and returns
   the first model's id and `max_model_len` (None when the server does not report one);
2. `run_point(settings, loaded, arrivals, salt)` builds the requests, runs them (a rich progress
   bar on stderr unless `progress` is off) and returns a `RunResult`;
3. nothing is kept open between runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pd_serve.bench.arrivals import ArrivalSpec
from pd_serve.bench.client import ClientConfig, LoadResult, RequestRecord, run_load
from pd_serve.bench.metrics import DEFAULT_PERCENTILES, BenchMetrics, compute_metrics, per_scenario
from pd_serve.bench.slo import SLOTable
from pd_serve.bench.traces import Trace
from pd_serve.bench.workload import WorkloadSpec, build_requests


@dataclass(frozen=True)
class BenchSettings:
    """Everything one run needs besides the arrival process."""

    client: ClientConfig
    workload: WorkloadSpec
    arrivals: ArrivalSpec
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    slos: SLOTable = SLOTable()
    progress: bool = True


@dataclass(frozen=True)
class RunResult:
    arrivals: ArrivalSpec
    load: LoadResult
    metrics: BenchMetrics
    scenarios: dict[str, BenchMetrics]
    errors: dict[str, int]


def discover(base_url: str, api_key: str | None = None,
             ready_timeout_s: float = 0.0) -> tuple[str | None, int | None]:
    """(first model id, its max_model_len) from /v1/models, retried until `ready_timeout_s`;
    (None, None) if the server never answers a usable list."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10.0)
            if r.status_code == 200:
                data = r.json().get("data") or []
                if data and isinstance(data[0], dict):
                    mlen = data[0].get("max_model_len")
                    return data[0].get("id"), mlen if isinstance(mlen, int) else None
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(0.5)


def error_counts(records: list[RequestRecord]) -> dict[str, int]:
    """Failed requests by error text, most frequent first."""
    counts: dict[str, int] = {}
    for r in records:
        if r.error:
            counts[r.error] = counts.get(r.error, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _progress_hook(progress: Progress | None, task: Any) -> Callable[[RequestRecord], None]:
    failed = 0

    def done(rec: RequestRecord) -> None:
        nonlocal failed
        failed += not rec.success
        if progress is not None:
            progress.update(task, advance=1, failed=failed)

    return done


def run_point(settings: BenchSettings, loaded: Trace | None = None,
              arrivals: ArrivalSpec | None = None, salt: int = 0, label: str = "bench",
              ) -> RunResult:
    """One run of the workload under `arrivals` (default: the settings'); `salt` changes every
    prompt (no prefix-cache carry-over between runs) while keeping the sharing structure."""
    arr = arrivals or settings.arrivals
    requests = build_requests(settings.workload, arr, salt, loaded)
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn())
    progress = Progress(*columns, console=Console(stderr=True), transient=False,
                        disable=not settings.progress)
    with progress:
        task = progress.add_task(label, total=len(requests), failed=0)
        load = asyncio.run(run_load(settings.client, requests, _progress_hook(progress, task)))
    pct, slos = settings.percentiles, settings.slos
    return RunResult(arr, load, compute_metrics(load.records, load.duration_s, pct, slos),
                     per_scenario(load.records, load.duration_s, pct, slos),
                     error_counts(load.records))


def at_rate(spec: ArrivalSpec, rate: float) -> ArrivalSpec:
    """`spec` with its rate set (a trace keeps its shape, compressed to that mean rate)."""
    return replace(spec, rate=rate)
