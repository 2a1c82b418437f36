"""`pd-serve sim`: the simulator's commands, a typer sub-app (`sim_app`).

* `profile`: measures a real ModelRunner in this process and writes a latency profile JSON;
* `profile-steps`: fits the same models on the steps of a real deployment (step traces);
* `run`: replays a workload (built from the same options as `pd-serve bench run`) through a
  simulated deployment (groups given per scenario or planned from an instance budget) and
  prints and saves the summary.
Exit status 0 ok, 2 bad arguments or input (one-line error).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from pd_serve.bench import options as bo
from pd_serve.cli_errors import or_exit
from pd_serve.orchestrator.adjuster import AdjusterConfig
from pd_serve.sim.config import (
    AdjustSpec,
    GatewaySpec,
    HostSpec,
    InstanceSpec,
    ScenarioSpec,
    SimConfig,
)
from pd_serve.sim.latency import HandoffModel, LatencyProfile
from pd_serve.sim.summary import clean

T = TypeVar("T")
sim_app = typer.Typer(help="Discrete-event simulator driving the real policy code at scale.",
                      no_args_is_help=True, add_completion=False)
console = Console()
if not console.is_terminal:  # pipes and logs: room for the summary table
    console = Console(width=150)


def _or_exit(fn: Callable[[], T]) -> T:
    """Bad options, input or files: one line and exit status 2."""
    return or_exit(fn, (ValueError, OSError))


@sim_app.command()
def profile(
        out: Annotated[Path, typer.Option(help="Where to write the profile JSON.")],
        backend: Annotated[str, typer.Option(help="torch | mindspore")] = "torch",
        model: Annotated[str, typer.Option(help="Model directory.")] = "models/shakespeare-llama",
        device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | ascend")] = "cpu",
        threads: Annotated[int | None, typer.Option(
            help="CPU threads (0: all cores). One thread keeps the measurements stable when "
                 "other processes share the cores.")] = 1,
        repeats: Annotated[int, typer.Option(min=1, help="Timed calls per shape.")] = 3,
        handoff_results: Annotated[Path | None, typer.Option(
            help="tools/bench_handoff.py results (default docs/results/handoff_BACKEND.json)")
        ] = None,
        handoff_gbps: Annotated[float | None, typer.Option(
            help="Use a hand-off bandwidth (GB/s) instead of measured results.")] = None,
        handoff_latency_ms: Annotated[float, typer.Option(
            help="Fixed hand-off latency with --handoff-gbps.")] = 1.0) -> None:
    """Measure prefill and decode step times of a real model and fit the latency models."""
    from pd_serve.backends.base import RunnerConfig
    from pd_serve.sim.profile import ProfileGrid, handoff_samples, profile_runner

    root = Path(__file__).resolve().parents[2]
    model_dir = model if Path(model).is_dir() else str(root / model)
    handoff: Any
    if handoff_gbps is not None:
        handoff = _or_exit(lambda: HandoffModel(handoff_latency_ms / 1000, handoff_gbps * 1e9))
        source = f"--handoff-gbps {handoff_gbps} --handoff-latency-ms {handoff_latency_ms}"
    else:
        path = handoff_results or root / "docs" / "results" / f"handoff_{backend}.json"
        handoff = _or_exit(lambda: handoff_samples(path))
        source = f"{_relative(path, root)} (mode bulk, total_ms)"
    cfg = _or_exit(lambda: RunnerConfig(model_dir=model_dir, backend=backend, device=device,
                                        threads=threads or None))
    argv = sys.argv[sys.argv.index("profile") + 1:] if "profile" in sys.argv else []
    prof = _or_exit(lambda: profile_runner(cfg, ProfileGrid(repeats=repeats), handoff,
                                           " ".join(["pd-serve sim profile", *argv]),
                                           lambda m: console.print(f"[dim]{m}[/dim]")))
    prof.provenance["handoff_source"] = source
    prof.save(out)
    console.print(f"prefill {prof.prefill}\ndecode  {prof.decode}\nhandoff {prof.handoff}\n"
                  f"fit errors {prof.provenance['fit_errors']}\nwrote {out} "
                  f"({prof.provenance['profiling_s']} s of profiling)")


@sim_app.command("profile-steps")
def profile_steps(
        steps: Annotated[list[Path], typer.Argument(
            help="Step traces (server.step_trace_dir: steps-<role>-<pid>.jsonl), or "
                 "directories of them.")],
        base: Annotated[Path, typer.Option(
            help="Profile giving the hand-off model, KV bytes per token and the model forms "
                 "(pd-serve sim profile).")],
        out: Annotated[Path, typer.Option(help="Where to write the profile JSON.")],
        since: Annotated[float | None, typer.Option(
            help="Only steps that started at or after this wall-clock time (Unix s).")] = None,
        until: Annotated[float | None, typer.Option(
            help="Only steps that started before this wall-clock time (Unix s).")] = None,
        step_time: Annotated[bool, typer.Option(
            "--step-time", help="Time each step by its own duration, not its period (which "
                                "adds the engine thread's work up to the next step).")] = False,
) -> None:
    """Fit the prefill and decode models on the steps a serving deployment really ran."""
    from pd_serve.sim.steps import profile_from_steps, trace_files

    files = _or_exit(lambda: trace_files(steps))
    base_prof = _or_exit(lambda: LatencyProfile.load(base))
    prof = _or_exit(lambda: profile_from_steps(files, base_prof, since, until, not step_time))
    prof.save(out)
    prov = prof.provenance
    console.print(f"prefill {prof.prefill}\ndecode  {prof.decode}\nsteps {prov['steps']} "
                  f"({prov['timing']} timing), fit errors {prov['fit_errors']}\nwrote {out}")


def _relative(path: Path, root: Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _groups(requests: list[Any], prof: LatencyProfile, spec: InstanceSpec, rtt_s: float,
            groups: str | None, budget: int | None) -> dict[str, tuple[int, int]]:
    from pd_serve.sim.options import parse_groups
    from pd_serve.sim.plan import length_stats, plan_groups

    names = sorted({r.scenario for r in requests})
    if (groups is None) == (budget is None):
        raise ValueError("give exactly one of --groups and --budget")
    if groups is not None:
        return parse_groups(groups, names)
    assert budget is not None
    plans = plan_groups(length_stats(requests), prof, spec, rtt_s, budget)
    for name, plan in plans.items():
        console.print(f"[dim]planner {name}: {plan.reason}[/dim]")
    return {name: (p.n_p, p.n_d) for name, p in plans.items()}


ProfileOpt = Annotated[Path, typer.Option("--profile", help="Latency profile JSON "
                                          "(pd-serve sim profile).")]
GroupsOpt = Annotated[str | None, typer.Option(help="n_p:n_d for every scenario, or "
                                               "name=n_p:n_d,...")]
BudgetOpt = Annotated[int | None, typer.Option(help="Instances per scenario, split n_p:n_d "
                                               "by the planner.")]
ModeOpt = Annotated[str, typer.Option(help="disaggregated | aggregated (n_p + n_d aggregated "
                                      "instances: equal hardware).")]
PolicyOpt = Annotated[str, typer.Option(help="Gateway policy: forwarding | fifo | "
                                        "round_robin.")]
IntOpt = Annotated[int, typer.Option()]
RecordsOpt = Annotated[Path | None, typer.Option(help="Per-request records (JSONL).")]
HostFactorOpt = Annotated[float, typer.Option(help="With --host-size: a step of this role "
                                              "stretches by 1 + (f - 1) k while k co-located "
                                              "instances compute.")]
VllmOpt = Annotated[bool, typer.Option(help="Also compute pd-serve bench's (vLLM) metrics from "
                                       "the simulated requests.")]


@sim_app.command()
def run(profile_path: ProfileOpt, trace: bo.Traces = None, trace_format: bo.TraceFormat = None,
        num_prompts: bo.NumPrompts = None, input_len: bo.InputLen = 1024,
        output_len: bo.OutputLen = 128, range_ratio: bo.RangeRatio = 0.0,
        scale_policy: bo.ScalePolicy = "auto", scale_factor: bo.ScaleFactor = None,
        block_tokens: bo.BlockTokens = None, max_model_len: bo.MaxModelLen = None,
        max_output: bo.MaxOutput = None, scenario: bo.Scenario = None,
        tag_scenarios: bo.Tag = None, arrival: bo.Arrival = None,
        request_rate: bo.Rate = None, burstiness: bo.Burst = 1.0,
        time_scale: bo.TimeScale = 1.0, spread: bo.Spread = False, seed: bo.Seed = 0,
        goodput: bo.Goodput = None, slo_file: bo.SloFile = None,
        groups: GroupsOpt = None, budget: BudgetOpt = None, mode: ModeOpt = "disaggregated",
        policy: PolicyOpt = "forwarding", b_p: IntOpt = 4, max_num_seqs: IntOpt = 16,
        max_num_batched_tokens: IntOpt = 2048, kv_blocks: IntOpt = 4096,
        block_size: IntOpt = 16, prefix_cache_blocks: Annotated[int, typer.Option(
            help="Prefill prefix-cache capacity in trace hash blocks (0: off).")] = 0,
        rtt_ms: Annotated[float, typer.Option(help="Offer round trip (ms).")] = 1.0,
        retry_interval_ms: Annotated[float, typer.Option()] = 20.0,
        noise_cv: Annotated[float, typer.Option(help="Lognormal noise on step times.")] = 0.0,
        spares: Annotated[int, typer.Option(help="Stateless spare instances.")] = 0,
        adjust: Annotated[bool, typer.Option(help="Run the online P/D adjuster.")] = False,
        adjust_window_s: Annotated[float, typer.Option(help="Adjuster window.")] = 30.0,
        switch_s: Annotated[float, typer.Option(help="Time an instance takes to switch "
                                                "role (or a spare to load).")] = 5.0,
        host_size: Annotated[int, typer.Option(help="Instances per shared host, filled in id "
                                               "order (0: every instance has its own).")] = 0,
        host_prefill_factor: HostFactorOpt = 1.0, host_decode_factor: HostFactorOpt = 1.0,
        host_first_token_delay_ms: Annotated[float, typer.Option(
            help="With --host-size: extra first-token latency while a neighbour computes.")
        ] = 0.0,
        result: bo.Result = None, records: RecordsOpt = None, vllm_metrics: VllmOpt = False,
        ) -> None:
    """Replay a workload (the options of `pd-serve bench run`) through a simulated deployment
    and summarise TTFT/TPOT/E2E, throughput and SLO success per scenario."""
    from pd_serve.sim.options import slo_table, workload
    from pd_serve.sim.run import simulate

    values = dict(locals())
    prof = _or_exit(lambda: LatencyProfile.load(profile_path))
    reqs, fitted, arrivals = _or_exit(lambda: workload(values))
    slos = _or_exit(lambda: slo_table(goodput, slo_file))
    cfg = _or_exit(lambda: _sim_config(values, reqs, fitted.block_size, prof, slos))
    res = _or_exit(lambda: simulate(reqs, cfg, prof))
    console.print(summary_table(res.summary, f"pd-serve sim: {fitted.name}, {mode}, {policy}"))
    for a in res.adjustments:
        console.print(f"adjuster at {a['at']:.1f} s: {a['scenario']} {a['from']} -> {a['to']} "
                      f"({a['reason']})")
    console.print(f"[dim]{res.events:,} events in {res.wall_s:.1f} s "
                  f"({res.events / max(res.wall_s, 1e-9):,.0f} events/s), "
                  f"simulated {res.sim_end_s:.1f} s[/dim]")
    data = res.to_json() | {"profile": prof.provenance, "slo": slos.describe(),
                            "workload": {"trace": fitted.name, "notes": list(fitted.notes),
                                         "requests": len(reqs), "arrivals": asdict(arrivals)}}
    if vllm_metrics:
        data["vllm_metrics"] = _vllm_metrics(res.recorder, slos)
    _write(res, data, result, records)


def _sim_config(v: dict[str, Any], reqs: Any, hash_block: int | None, prof: LatencyProfile,
                slos: Any) -> SimConfig:
    """The SimConfig the `run` options `v` describe (ValueError for bad values)."""
    from pd_serve.sim.options import gateway_slo

    spec = InstanceSpec(v["b_p"], v["max_num_seqs"], v["max_num_batched_tokens"],
                        v["kv_blocks"], v["block_size"],
                        prefix_cache_blocks=v["prefix_cache_blocks"],
                        hash_block_tokens=hash_block or 512)
    gw = GatewaySpec(v["rtt_ms"] / 1000, v["retry_interval_ms"] / 1000)
    split = _groups(reqs, prof, spec, gw.rtt_s, v["groups"], v["budget"])
    window = v["adjust_window_s"]
    adjust = AdjustSpec(AdjusterConfig(window_s=window, cooldown_s=4 * window),
                        interval_s=min(5.0, window), switch_s=v["switch_s"])
    if v["host_size"] < 0:
        raise ValueError(f"--host-size: expected >= 0, got {v['host_size']}")
    host = HostSpec(v["host_size"], v["host_prefill_factor"], v["host_decode_factor"],
                    v["host_first_token_delay_ms"] / 1000) if v["host_size"] else None
    return SimConfig(tuple(ScenarioSpec(n, p, d, v["policy"], *gateway_slo(slos.of(n)))
                           for n, (p, d) in sorted(split.items())),
                     v["mode"], spec, gw, v["spares"], adjust if v["adjust"] else None,
                     v["noise_cv"], v["seed"], host)


def _write(res: Any, data: dict[str, Any], result: Path | None, records: Path | None) -> None:
    if result is not None:
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(clean(data), indent=1) + "\n")
        console.print(f"results: {result}")
    if records is not None:
        with records.open("w") as f:
            for rec in res.recorder.records():
                f.write(json.dumps(clean(rec)) + "\n")


def _vllm_metrics(recorder: Any, slos: Any) -> dict[str, Any]:
    from pd_serve.bench import report
    from pd_serve.bench.metrics import compute_metrics, per_scenario
    from pd_serve.sim.bench_records import duration_s, request_records

    recs, dur = request_records(recorder), duration_s(recorder)
    overall, scenarios = compute_metrics(recs, dur, slos=slos), per_scenario(recs, dur, slos=slos)
    console.print(report.summary_table(overall, "Simulated run, pd-serve bench metrics"))
    if len(scenarios) > 1:
        console.print(report.scenario_table(scenarios))
    return {"overall": overall.to_dict(),
            "scenarios": {n: m.to_dict() for n, m in scenarios.items()}}


def _f(x: Any, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def summary_table(summary: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    cols = ("scenario", "requests", "finished", "terminated", "failed", "TTFT p50/p99 s",
            "TPOT p50/p99 ms", "E2E p50/p99 s", "req/s", "tok/s", "SLO ok")
    for c in cols:
        table.add_column(c, justify="right")
    rows = [*summary["scenarios"].items(), ("all", summary["overall"])]
    for name, s in rows:
        table.add_row(
            name, str(s["requests"]), str(s["finished"]), str(s["terminated"]),
            str(s["failed"]), f"{_f(s.get('ttft_p50_s'))}/{_f(s.get('ttft_p99_s'))}",
            f"{_f(s.get('tpot_p50_s'), 1000, 1)}/{_f(s.get('tpot_p99_s'), 1000, 1)}",
            f"{_f(s.get('e2e_p50_s'))}/{_f(s.get('e2e_p99_s'))}",
            _f(s.get("throughput_rps"), digits=2), _f(s.get("output_tokens_per_s"), digits=1),
            f"{_f(s.get('slo_success_rate'), 100, 1)}%")
    return table
