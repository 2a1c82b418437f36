"""`pd-serve bench`: load generator for any OpenAI-compatible endpoint with the metrics of
`vllm bench serve` (`run`), and DistServe-style maximum goodput per instance (`sweep`).

    pd-serve bench run --base-url http://127.0.0.1:8000 --trace conversation_trace.jsonl \
        --num-prompts 200 --spread --time-scale 0.1 --goodput ttft:2000,tpot:100 \
        --result run.json --plot run.png
    pd-serve bench sweep --base-url ... --num-prompts 200 --input-len 256 --output-len 64 \
        --request-rate-list 1,2,4,8 --goodput ttft:500,tpot:50 --instances 3 --refine 2 \
        --result sweep.json --plot sweep.png
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from pd_serve.bench import options as o
from pd_serve.bench import report
from pd_serve.bench.runner import run_point
from pd_serve.bench.sweep import SweepSpec, geometric_rates, run_sweep
from pd_serve.cli_errors import or_exit

T = TypeVar("T")
bench_app = typer.Typer(help="Benchmark an OpenAI-compatible endpoint (vLLM bench serve metrics).",
                        no_args_is_help=True, add_completion=False)
SaveReq = Annotated[bool, o.Opt(help="Include every request's record in the JSON.")]
Rates = Annotated[str | None, o.Opt(help="Comma-separated offered rates (req/s).")]
RateGeo = Annotated[str | None, o.Opt(help="Geometric rates START:FACTOR:MAX, e.g. 0.5:2:16.")]
Target = Annotated[float, o.Opt(help="SLO attainment a rate must reach (fraction).")]
Refine = Annotated[int, o.Opt(help="Bisection steps after the ladder.")]
Instances = Annotated[int, o.Opt(help="Instances (GPUs) serving: goodput is divided by this.")]
StopBelow = Annotated[float | None, o.Opt(help="Stop the ladder below this attainment "
                                             "(default: the target).")]
Cooldown = Annotated[float, o.Opt(help="Pause (s) between load points.")]


_or_exit = or_exit  # bad options or input: one line and exit status 2


def _write(path: Path | None, data: dict[str, Any], console: Console) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=1, allow_nan=False, default=str))
        console.print(f"results: {path}")


@bench_app.command()
def run(base_url: o.Url = "http://127.0.0.1:8000", endpoint: o.Endpoint = "completions",
        model: o.Model = None, api_key: o.ApiKey = None, trace: o.Traces = None,
        trace_format: o.TraceFormat = None, num_prompts: o.NumPrompts = None,
        input_len: o.InputLen = 1024, output_len: o.OutputLen = 128,
        range_ratio: o.RangeRatio = 0.0, scale_policy: o.ScalePolicy = "auto",
        scale_factor: o.ScaleFactor = None, block_tokens: o.BlockTokens = None,
        max_model_len: o.MaxModelLen = None, max_output: o.MaxOutput = None,
        prompt: o.PromptMode = None, vocab_size: o.Vocab = 1024,
        system_prompt_len: o.SystemPrompt = 0, scenario: o.Scenario = None,
        tag_scenarios: o.Tag = None, send_scenario: o.SendScenario = True,
        arrival: o.Arrival = None, request_rate: o.Rate = None, burstiness: o.Burst = 1.0,
        time_scale: o.TimeScale = 1.0, spread: o.Spread = False, seed: o.Seed = 0,
        max_concurrency: o.Conc = None, ignore_eos: o.IgnoreEos = True,
        temperature: o.Temp = None, percentiles: o.Pct = "50,90,99",
        goodput: o.Goodput = None, slo_file: o.SloFile = None, result: o.Result = None,
        save_requests: SaveReq = False, plot: o.Plot = None, label: o.Label = "bench",
        metadata: o.Meta = None, progress: o.Progress = True, timeout: o.Timeout = 600.0,
        ready_timeout: o.Ready = 0.0) -> None:
    """Send one workload and report TTFT / TPOT / ITL / E2EL, throughput and goodput."""
    console = Console()
    opts = dict(locals())
    settings, server, loaded = _or_exit(lambda: o.build_settings(opts))
    meta = _or_exit(lambda: o.parse_metadata(metadata))
    res = _or_exit(lambda: run_point(settings, loaded, label=label))
    report.print_run(console, res)
    base = {**report.header(label, meta), "server": server,
            "config": o.config_dict(settings, loaded)}
    _write(result, report.run_json(base, res, save_requests), console)
    if plot is not None:
        console.print(f"plot: {report.plot_cdfs(res, plot, label)}")


@bench_app.command()
def sweep(base_url: o.Url = "http://127.0.0.1:8000", endpoint: o.Endpoint = "completions",
          model: o.Model = None, api_key: o.ApiKey = None, trace: o.Traces = None,
          trace_format: o.TraceFormat = None, num_prompts: o.NumPrompts = None,
          input_len: o.InputLen = 1024, output_len: o.OutputLen = 128,
          range_ratio: o.RangeRatio = 0.0, scale_policy: o.ScalePolicy = "auto",
          scale_factor: o.ScaleFactor = None, block_tokens: o.BlockTokens = None,
          max_model_len: o.MaxModelLen = None, max_output: o.MaxOutput = None,
          prompt: o.PromptMode = None, vocab_size: o.Vocab = 1024,
          system_prompt_len: o.SystemPrompt = 0, scenario: o.Scenario = None,
          tag_scenarios: o.Tag = None, send_scenario: o.SendScenario = True,
          arrival: o.Arrival = None, burstiness: o.Burst = 1.0, spread: o.Spread = False,
          seed: o.Seed = 0, max_concurrency: o.Conc = None, ignore_eos: o.IgnoreEos = True,
          temperature: o.Temp = None, percentiles: o.Pct = "50,90,99", goodput: o.Goodput = None,
          slo_file: o.SloFile = None, request_rate_list: Rates = None,
          request_rate_geometric: RateGeo = None, target: Target = 0.9, refine: Refine = 0,
          instances: Instances = 1, stop_below: StopBelow = None, cooldown: Cooldown = 1.0,
          result: o.Result = None, plot: o.Plot = None, label: o.Label = "sweep",
          metadata: o.Meta = None, progress: o.Progress = True, timeout: o.Timeout = 600.0,
          ready_timeout: o.Ready = 0.0) -> None:
    """Maximum goodput per instance (DistServe): the highest offered rate whose SLO attainment
    (all requests, failed ones included, meeting every SLO) reaches the target, over a rate
    ladder refined by bisection. With `--arrival trace` a timed trace keeps its shape,
    compressed to each rate; otherwise Poisson (or gamma with --burstiness) arrivals."""
    console = Console()
    opts = dict(locals(), request_rate=1.0, time_scale=1.0,
                arrival=arrival or ("poisson" if burstiness == 1.0 else "gamma"))

    def parse() -> tuple[Any, ...]:
        rates = _rates(request_rate_list, request_rate_geometric)
        s, server, loaded = o.build_settings(opts)
        if s.slos.empty:
            raise ValueError("a sweep needs an SLO: --goodput or --slo-file")
        return s, server, loaded, SweepSpec(rates, target, refine, instances, stop_below)

    settings, server, loaded, spec = _or_exit(parse)
    meta = _or_exit(lambda: o.parse_metadata(metadata))
    outcome = _or_exit(lambda: run_sweep(spec, _point_runner(settings, loaded, cooldown,
                                                               console)))
    console.print(report.sweep_table(outcome))
    best, per = outcome.max_rate, outcome.max_rate_per_instance
    console.print(f"max goodput: {'-' if best is None else f'{best:g}'} req/s, per instance "
                  f"{'-' if per is None else f'{per:.3g}'} req/s"
                  f"{'' if outcome.bounded else ' (a lower bound: no rate missed the target)'}"
                  f"; interpolated crossing: {_g(outcome.interpolated_rate)} req/s")
    base = {**report.header(label, meta), "server": server,
            "config": o.config_dict(settings, loaded)}
    _write(result, report.sweep_json(base, outcome), console)
    if plot is not None:
        console.print(f"plot: {report.plot_sweep(outcome, plot, label)}")


def _point_runner(settings: Any, loaded: Any, cooldown: float,
                  console: Console) -> Callable[[float], tuple[float, Any]]:
    """The sweep's measurement of one offered rate: (SLO attainment, run result)."""
    count = 0

    def measure(rate: float) -> tuple[float, Any]:
        nonlocal count
        if count:
            time.sleep(cooldown)
        count += 1  # a new salt per point: no prefix-cache carry-over between points
        res = run_point(settings, loaded, replace(settings.arrivals, rate=rate), salt=count,
                        label=f"{rate:g} req/s")
        attainment = res.metrics.slo_attainment or 0.0
        console.print(f"{rate:g} req/s: attainment {100 * attainment:.1f} %, goodput "
                      f"{res.metrics.request_goodput or 0.0:.2f} req/s, failed "
                      f"{res.metrics.failed}")
        return attainment, res

    return measure


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _rates(listed: str | None, geometric: str | None) -> tuple[float, ...]:
    if (listed is None) == (geometric is None):
        raise ValueError("give exactly one of --request-rate-list and --request-rate-geometric")
    try:
        if listed is not None:
            return tuple(float(r) for r in listed.split(",") if r.strip())
        start, factor, stop = (float(x) for x in (geometric or "").split(":"))
    except ValueError:
        raise ValueError("rates: expected numbers (list: 1,2,4; geometric: START:FACTOR:MAX)"
                         ) from None
    return geometric_rates(start, factor, stop)


if __name__ == "__main__":
    bench_app()
