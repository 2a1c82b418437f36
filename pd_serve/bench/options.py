"""The options `pd-serve bench run` and `sweep` share (typer `Annotated` types) and
`build_settings`, which turns their values into the run's settings, the server's identity and
the loaded workload, and `config_dict`, the settings as recorded in the results JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from pd_serve.bench.arrivals import ArrivalSpec
from pd_serve.bench.client import ENDPOINTS, ClientConfig
from pd_serve.bench.runner import BenchSettings, discover
from pd_serve.bench.scaling import POLICIES
from pd_serve.bench.slo import SLOTable, load_slo_file, parse_goodput
from pd_serve.bench.tagging import MODES
from pd_serve.bench.trace_formats import FORMATS
from pd_serve.bench.traces import Trace
from pd_serve.bench.workload import WorkloadSpec, fit, load_workload

Opt = typer.Option
Url = Annotated[str, Opt(help="Server root (http://HOST:PORT; a trailing /v1 is dropped).")]
Endpoint = Annotated[str, Opt(help=f"One of {', '.join(ENDPOINTS)}.")]
Model = Annotated[str | None, Opt(help="Model id (default: the first of GET /v1/models).")]
ApiKey = Annotated[str | None, Opt(envvar="OPENAI_API_KEY", help="Bearer token.")]
Traces = Annotated[list[Path] | None, Opt(
    "--trace", help="Trace file or ServeGen folder; repeat to merge (one scenario each). "
                    "Default: random lengths (vLLM `random`).")]
TraceFormat = Annotated[str | None, Opt(help=f"One of {', '.join(FORMATS)} (default: "
                                             "detected).")]
NumPrompts = Annotated[int | None, Opt(help="Requests (default: the whole trace).")]
InputLen = Annotated[int, Opt(help="Random lengths: mean input tokens.")]
OutputLen = Annotated[int, Opt(help="Random lengths: mean output tokens.")]
RangeRatio = Annotated[float, Opt(help="Random lengths: uniform in L*(1 +- r).")]
ScalePolicy = Annotated[str, Opt(help=f"Fit lengths to the context: {', '.join(POLICIES)}.")]
ScaleFactor = Annotated[float | None, Opt(help="Lengths times this (policy factor).")]
BlockTokens = Annotated[int | None, Opt(help="Tokens per hash-id block after scaling (policy "
                                             "blocks; default: the largest that fits p99).")]
MaxModelLen = Annotated[int | None, Opt(help="Context (default: GET /v1/models).")]
MaxOutput = Annotated[int | None, Opt(help="Cap every request's output tokens.")]
PromptMode = Annotated[str | None, Opt(help="tokens | text (default: tokens; chat: text).")]
Vocab = Annotated[int, Opt(help="Token ids of synthetic prompts are < this.")]
SystemPrompt = Annotated[int, Opt(help="Shared per-scenario prompt prefix (tokens) of "
                                       "requests without hash ids.")]
Scenario = Annotated[str | None, Opt(help="Put every request in this scenario.")]
Tag = Annotated[str | None, Opt(help=f"Tag scenarios from the trace: {', '.join(MODES)}.")]
SendScenario = Annotated[bool, Opt(help="Send X-PD-Scenario for non-default scenarios.")]
Arrival = Annotated[str | None, Opt(help="trace | poisson | gamma | constant (default: trace "
                                         "times if the trace has them and no rate is given).")]
Rate = Annotated[float | None, Opt(help="Requests/s (default inf: all at once).")]
Burst = Annotated[float, Opt(help="Gamma shape (1: Poisson, <1 burstier), as vLLM.")]
TimeScale = Annotated[float, Opt(help="Trace timestamps times this (0.5: twice as fast).")]
Spread = Annotated[bool, Opt(help="Spread requests sharing a quantised trace timestamp.")]
Seed = Annotated[int, Opt(help="Seed of arrivals and random lengths.")]
Conc = Annotated[int | None, Opt(help="Cap on in-flight requests (client-side queue).")]
IgnoreEos = Annotated[bool, Opt(help="Send ignore_eos (exact output lengths).")]
Temp = Annotated[float | None, Opt(help="temperature (not sent unless given).")]
Pct = Annotated[str, Opt(help="Comma-separated percentiles of every metric.")]
Goodput = Annotated[list[str] | None, Opt(help="SLO in ms: ttft:500,tpot:50,e2el:8000, or "
                                                "for one scenario chat:ttft:300; repeatable.")]
SloFile = Annotated[Path | None, Opt(help="SLO YAML/JSON (per scenario, TTFT bands) or a "
                                          "pd-serve config (its gateway ttft_slo).")]
Result = Annotated[Path | None, Opt(help="Write the results JSON here.")]
Plot = Annotated[Path | None, Opt(help="Write plots to this PNG.")]
Label = Annotated[str, Opt(help="Label recorded in the results.")]
Meta = Annotated[list[str] | None, Opt(help="KEY=VALUE recorded in the results; repeatable.")]
Progress = Annotated[bool, Opt(help="Show a progress bar.")]
Timeout = Annotated[float, Opt(help="HTTP timeout (s).")]
Ready = Annotated[float, Opt(help="Wait up to this long (s) for GET /v1/models.")]


def build_settings(o: dict[str, Any]) -> tuple[BenchSettings, dict[str, Any], Trace]:
    """(settings, server identity, loaded and fitted workload) from a command's option values
    (keyed by parameter name); ValueError for bad values."""
    url = o["base_url"].rstrip("/").removesuffix("/v1")
    found, mlen = discover(url, o["api_key"], o["ready_timeout"])
    model = o["model"] or found
    if model is None:
        raise ValueError(f"{url}/v1/models gave no model; pass --model")
    workload = WorkloadSpec(
        tuple(str(t) for t in o["trace"] or ()), o["trace_format"], o["num_prompts"],
        o["input_len"], o["output_len"], o["range_ratio"], o["scale_policy"],
        o["scale_factor"], o["block_tokens"], o["max_model_len"] or mlen, o["max_output"],
        o["prompt"] or ("text" if o["endpoint"] == "chat" else "tokens"), o["vocab_size"],
        o["system_prompt_len"], o["scenario"], o["tag_scenarios"], o["seed"])
    trace = fit(load_workload(workload), workload)
    arrivals = arrival_spec(o, trace)
    slos = load_slo_file(o["slo_file"]) if o["slo_file"] is not None else SLOTable()
    client = ClientConfig(url, model, o["endpoint"], o["api_key"], o["ignore_eos"],
                          o["temperature"], o["timeout"], o["max_concurrency"],
                          send_scenario=o["send_scenario"])
    pct = tuple(float(p) for p in o["percentiles"].split(",") if p.strip())
    settings = BenchSettings(client, workload, arrivals, pct,
                             parse_goodput(o["goodput"] or [], slos), o["progress"])
    return settings, {"base_url": url, "model": model, "max_model_len": mlen}, trace


def config_dict(s: BenchSettings, trace: Trace) -> dict[str, Any]:
    c, w, a = s.client, s.workload, s.arrivals
    return {"endpoint": c.endpoint, "model": c.model, "num_prompts": len(trace.requests),
            "burstiness": a.burstiness, "max_concurrency": c.max_concurrency,
            "ignore_eos": c.ignore_eos, "temperature": c.temperature,
            "percentiles": list(s.percentiles), "slo": s.slos.describe(),
            "arrivals": {"process": a.process, "time_scale": a.time_scale, "spread": a.spread,
                         "seed": a.seed, "normalize": a.normalize},
            "workload": {"traces": list(w.traces), "trace_name": trace.name,
                         "trace_format": trace.fmt, "timed": trace.timed,
                         "trace_notes": list(trace.notes), "input_len": w.input_len,
                         "output_len": w.output_len, "range_ratio": w.range_ratio,
                         "scale_policy": w.scale_policy, "scale_factor": w.scale_factor,
                         "block_tokens": w.block_tokens, "max_model_len": w.max_model_len,
                         "max_output": w.max_output, "prompt_mode": w.prompt_mode,
                         "vocab_size": w.vocab_size, "system_prompt_len": w.system_prompt_len,
                         "scenario": w.scenario, "tag_scenarios": w.tag_scenarios,
                         "send_scenario": c.send_scenario}}


def parse_metadata(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def arrival_spec(o: dict[str, Any], trace: Trace) -> ArrivalSpec:
    """The arrival process the options ask for: `--arrival`, else the trace's own times when it
    has them and no rate is given, else Poisson (gamma when `--burstiness` is not 1) at
    `--request-rate` (infinite: all at once). The simulator uses the same rule."""
    rate, arrival = o["request_rate"], o["arrival"]
    if arrival == "trace" and not trace.timed:
        raise ValueError("--arrival trace needs a --trace with arrival times")
    process = arrival or ("trace" if trace.timed and rate is None else
                          "poisson" if o["burstiness"] == 1.0 else "gamma")
    return ArrivalSpec(process, rate if rate is not None or process == "trace" else math.inf,
                       o["burstiness"], o["time_scale"], o["spread"], seed=o["seed"])
