"""P/D-Device evaluation: TTFT, the TPOT the user sees, cloud occupancy and quality vs rho of
P/D-Device against device-only and cloud-only serving, all measured in the same run on
prompt/output lengths from real traces (ShareGPT and arXiv) scaled to the demo model.

Phases (one at a time, never overlapping, so the device and the cloud share the host only
when a mode itself needs both):
1. workload: `--requests` per trace, lengths scaled to the context (policy quantile, outputs
   capped at `--max-output`), prompts cut from held-out corpus text;
2. profiles (`--profiles`, or measured now with tools/profile_device.py's functions) and the
   settings planner per request (class = its prompt length, loopback link), unless `--n-cloud`
   / `--rho` fix the settings;
3. serving: every request in the three modes through pd_device.DeviceRuntime (device backend
   thread-limited; mode order rotated per request): TTFT and gaps between displayed tokens;
4. cloud occupancy, two ways: the cloud busy time per request (send -> `end` event of a greedy
   assist request doing exactly that mode's cloud work: cloud-only N = G - 1, rho = 1;
   P/D-Device the N it used and its rho), one request at a time; and the requests/s the cloud
   (1 prefill + 1 decode instance behind one gateway) sustains with `--concurrency`
   closed-loop clients doing that work (requests planned device-only take no cloud work);
5. quality vs rho (tools/bench_device_lib.QUALITY_DEFINITION) on the workload's prompts.

    python tools/bench_device.py --start-cloud --out results/device_eval.json   # CPU here
    python tools/bench_device.py --quick --start-cloud                          # smoke
    python tools/bench_device.py --start-cloud --cloud-device cuda:0 ...        # GPU cloud
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_device_lib import (  # noqa: E402
    DEFAULT_CORPUS,
    DEFAULT_TRACES,
    REPO,
    AssistClient,
    LocalCloud,
    WorkItem,
    build_workload,
    held_out_tokens,
    lower_bound,
    measure_quality,
)
from bench_device_profile import band_lengths, cut_prompts, measured_profiles, quality_bands  # noqa: E402,I001
from bench_device_report import finish  # noqa: E402

from pd_device.planner import Grid, Plan, RequestClass, Targets, explain  # noqa: E402
from pd_device.profiles import Profiles  # noqa: E402
from pd_device.settings import Settings  # noqa: E402

MODES = ("cloud_only", "device_only", "pd_device")


def _workload_args(a: Any) -> None:
    a("--model", type=Path, default=REPO / "models" / "shakespeare-llama")
    a("--traces", nargs="+", default=[f"{k}={v}" for k, v in DEFAULT_TRACES.items()],
      help="NAME=PATH of length CSVs (pd_serve.bench.trace_formats 'lengths')")
    a("--corpus", type=Path, default=DEFAULT_CORPUS)
    a("--requests", type=int, default=8, help="requests per trace")
    a("--max-model-len", type=int, default=2048)
    a("--max-output", type=int, default=128)
    a("--seed", type=int, default=0)


def _deployment_args(a: Any) -> None:
    """The device, the cloud and the link between them."""
    a("--device-backend", default="mindspore")
    a("--device-threads", type=int, default=1)
    a("--device-slowdown", type=float, default=1.0, help="DeviceConfig.slowdown")
    a("--cloud-url", default=None, help="a running gateway (else --start-cloud)")
    a("--start-cloud", action="store_true", help="start gateway + prefill + decode here")
    a("--cloud-backend", default="torch")
    a("--cloud-device", default="cpu")
    a("--cloud-threads", type=int, default=1)
    a("--link-rtt", type=float, default=0.0, help="emulated device-cloud RTT (s)")
    a("--link-bandwidth", type=float, default=None, help="emulated link bits/s")
    a("--link-loss", type=float, default=0.0, help="emulated segment loss probability")
    a("--link-jitter", type=float, default=0.0, help="emulated one-way jitter (s)")


def _planner_args(a: Any) -> None:
    """Targets, the planner's margins and profiles, or fixed settings instead of it."""
    a("--profiles", type=Path, default=None, help="tools/profile_device.py output")
    a("--ttft-target", type=float, default=0.5)
    a("--max-tpot", type=float, default=0.1)
    a("--quality-floor", type=float, default=0.8)
    a("--plan-margin", type=float, default=0.02, help="Grid.margin_s (scheduling slack)")
    a("--plan-margin-frac", type=float, default=0.15,
      help="Grid.margin_frac: relative safety margin on the predicted catch-up")
    a("--profile-repeats", type=int, default=5, help="device profile repeats per length")
    a("--profile-quality-prompts", type=int, default=4,
      help="quality profile prompts per length band (held out from the evaluation's)")
    a("--quality-bands", nargs="*", type=int, default=[512, 1024],
      help="prompt-length band edges of the quality profile (tokens)")
    a("--display-jitter", type=float, default=0.01,
      help="configured display wake-up allowance (s); the run uses the larger of it and the "
           "largest lateness measured in the warm-up pass")
    a("--profile-quality-output", type=int, default=32)
    a("--profile-rhos", nargs="+", type=float, default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.75])
    a("--planner-device-only", action="store_true",
      help="let the planner send requests device-only in the P/D-Device slot")
    a("--n-cloud", type=int, default=None, help="fixed N instead of the planner's")
    a("--rho", type=float, default=None, help="fixed rho instead of the planner's")
    a("--pace", type=float, default=None, help="fixed pace (s) instead of the planner's")


def _evaluation_args(a: Any) -> None:
    a("--concurrency", type=int, default=4)
    a("--rhos", nargs="+", type=float, default=[0.1, 0.25, 0.5, 0.75])
    a("--quality-requests", type=int, default=8)
    a("--quality-output", type=int, default=32)
    a("--no-warmup-pass", action="store_true", help="skip the unrecorded warm-up pass")
    a("--quick", action="store_true", help="1 request per trace, short outputs, few rhos")
    a("--out", type=Path, default=None)
    a("--plot", type=Path, default=None, help="PNG (default: --out with .png)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for group in (_workload_args, _deployment_args, _planner_args, _evaluation_args):
        group(p.add_argument)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.max_output, args.max_model_len = 1, 24, 512
        args.rhos, args.quality_requests, args.quality_output = [0.5], 2, 16
        args.concurrency = 2
        args.profile_quality_prompts, args.profile_quality_output = 2, 16
        args.profile_rhos, args.profile_repeats = [0.3, 0.5], 3
    if args.out is None:
        args.out = Path(os.environ.get("OUT", "results")) / "device_eval.json"
    return args


def device_runner(args: argparse.Namespace) -> Any:
    """The device's runner (thread-limited), shared by its runtimes and the quality scoring."""
    from pd_serve.backends import create_runner
    from pd_serve.backends.base import RunnerConfig
    return create_runner(RunnerConfig(str(args.model), backend=args.device_backend,
                                      threads=args.device_threads, block_size=16,
                                      num_blocks=-(-args.max_model_len // 16) + 2))


def plan_all(items: list[WorkItem], prof: Profiles, args: argparse.Namespace,
             jitter_s: float) -> tuple[list[Plan], list[str]]:
    """The planner's settings per request (class: its own prompt length, loopback link; gaps
    planned within max TPOT less the display wake-up allowance `jitter_s`), with
    device-only excluded unless `--planner-device-only` (so the P/D-Device slot measures
    P/D-Device; the modes the unrestricted planner would pick come second). `--n-cloud` /
    `--rho` / `--pace` override the planner's choice."""
    targets = Targets(args.ttft_target, args.max_tpot, args.quality_floor)
    grid = Grid(margin_s=args.plan_margin, margin_frac=args.plan_margin_frac,
                n_max=args.max_output, display_jitter_s=jitter_s)
    plans, free_modes = [], []
    for it in items:
        cls = RequestClass((it.input_len, it.input_len), args.link_rtt,
                           args.link_bandwidth or float("inf"), prof.device)
        free = explain(cls, prof, targets, grid)
        p = free if args.planner_device_only else explain(
            cls, prof, targets, replace(grid, allow_device_only=False))
        if args.n_cloud is not None or args.rho is not None or args.pace is not None:
            s = Settings(n_cloud=args.n_cloud if args.n_cloud is not None else
                         p.settings.n_cloud, rho=args.rho or p.settings.rho,
                         pace_s=args.pace or p.settings.pace_s or args.max_tpot)
            p = replace(p, settings=s, reason="fixed by the command line")
        plans.append(p)
        free_modes.append(free.settings.mode)
    return plans, free_modes


def serve_one(rt: Any, item: WorkItem, mode: str, settings: Settings) -> dict[str, Any]:
    from pd_serve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=item.output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    shown = list(rt.generate(list(item.prompt), params, settings))
    wall = time.perf_counter() - t0
    r = rt.last_report
    return {"mode": mode, "report_mode": r.mode, "ttft_s": r.ttft_s,
            "gaps_s": list(r.tpot_gaps_s), "handover_index": r.handover_index,
            "cloud_tokens_used": r.cloud_tokens_used,
            "cloud_tokens_received": r.cloud_tokens_received,
            "refined_tokens": r.refined_tokens, "reason": r.reason, "wall_s": wall,
            "wake_late_s": list(r.wake_late_s),
            "token_ids": [e.token_id for e in shown],
            "sources": "".join("c" if e.source == "cloud" else "d" for e in shown),
            "settings": vars(settings), **handover_trace(r.trace)}


def handover_trace(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """The run-up to the hand-over: the runtime's events until the first device token is
    shown, and the catch-up they measure (first cloud token's arrival -> first device token
    made, the time the planner predicts)."""
    upto = next((i for i, e in enumerate(trace)
                 if e["kind"] == "show" and e["source"] == "local"), len(trace) - 1)
    head = trace[:upto + 1]
    first = next((e["t"] for e in head if e["kind"] == "cloud" and e["index"] == 0), None)
    local = next((e["t"] for e in head if e["kind"] == "first_local"), None)
    return {"events": head, "catchup_s": None if first is None or local is None
            else local - first}


def runtimes(args: argparse.Namespace, url: str, runner: Any) -> Callable[[float], Any]:
    """A factory of DeviceRuntimes sharing `runner`, each with a fresh engine: every mode
    serves the same prompt, and a prefix-cache hit would make the later modes' device prefill
    free (the local cloud's prefix cache is off in its config). The first runtime warms the
    runner up and measures the device; later ones start from its measurements and take the
    display wake-up allowance (DeviceConfig.display_jitter_s) the plans were made with."""
    from pd_device import DeviceConfig, DeviceRuntime

    cfg = DeviceConfig(
        model_dir=str(args.model), backend=args.device_backend, threads=args.device_threads,
        cloud_url=url, ttft_target_s=max(10.0, 4 * args.ttft_target), max_gap_s=args.max_tpot,
        slowdown=args.device_slowdown, num_blocks=runner.num_blocks)
    base = DeviceRuntime(cfg, runner=runner)

    def fresh(jitter_s: float) -> Any:
        rt = DeviceRuntime(replace(cfg, warmup=False, display_jitter_s=jitter_s), runner=runner)
        rt.prefill_tps, rt.decode_step_s = base.prefill_tps, base.decode_step_s
        return rt
    return fresh


def run_serving(args: argparse.Namespace, url: str, items: list[WorkItem], prof: Profiles,
                runner: Any) -> tuple[list[dict[str, Any]], list[Plan], list[str],
                                      dict[str, Any]]:
    """Every request in every mode, each on a fresh DeviceRuntime (modes rotated per request),
    after an unrecorded warm-up pass over the same requests (MindSpore compiles one graph per
    shape bucket on first use; the cloud allocates on its first requests). The warm-up pass
    also measures the display's wake-up lateness: the recorded pass is planned and run with the
    larger of `--display-jitter` and the largest lateness seen. Returns the recorded rows, the
    plans they ran, the unrestricted planner's modes and the allowance's record."""
    fresh = runtimes(args, url, runner)
    jitter = {"configured_s": args.display_jitter, "warmup_max_s": None,
              "used_s": args.display_jitter}
    rows: list[dict[str, Any]] = []
    plans, free = plan_all(items, prof, args, args.display_jitter)
    for rep in range(1 if args.no_warmup_pass else 0, 2):
        if rep == 1 and rows:
            late = [x for r in rows for x in r["wake_late_s"]]
            jitter["warmup_max_s"] = max(late, default=0.0)
            jitter["used_s"] = max(args.display_jitter, jitter["warmup_max_s"])
            plans, free = plan_all(items, prof, args, jitter["used_s"])
            rows = []
        for i, (it, plan) in enumerate(zip(items, plans)):
            for k in range(len(MODES)):
                mode = MODES[(i + k) % len(MODES)]
                s = plan.settings if mode == "pd_device" else Settings(
                    n_cloud=0, rho=1.0, pace_s=plan.settings.pace_s, mode=mode)
                row = serve_one(fresh(jitter["used_s"]), it, mode, s)
                print(f"{'warm-up ' if rep == 0 else ''}req {i} {it.trace} "
                      f"in={it.input_len} out={it.output_len} {mode}/{s.mode}: "
                      f"ttft={row['ttft_s']} max_gap={max(row['gaps_s'], default=0):.3f} "
                      f"handover={row['handover_index']}", flush=True)
                rows.append({"request": i, "trace": it.trace, "input_len": it.input_len,
                             "output_len": it.output_len, **row,
                             "predicted_catchup_s": plan.handover_s})
    late = [x for r in rows for x in r["wake_late_s"]]
    jitter["recorded_max_s"] = max(late, default=0.0)
    jitter["recorded_wakeups"] = len(late)
    return rows, plans, free, jitter


def cloud_work(items: list[WorkItem], rows: list[dict[str, Any]],
               mode: str) -> list[tuple[WorkItem, int, float]]:
    """(item, N, rho) of the cloud work each request did in `mode` (none when it ran on the
    device alone)."""
    jobs = []
    for i, it in enumerate(items):
        r = next(x for x in rows if x["request"] == i and x["mode"] == mode)
        if mode == "cloud_only" or r["report_mode"] == "cloud_only":  # planner: cloud-only
            jobs.append((it, it.output_len - 1, 1.0))
        elif r["report_mode"] == "pd_device" and r["cloud_tokens_received"] > 0:
            jobs.append((it, r["cloud_tokens_received"] - 1, r["settings"]["rho"]))
    return jobs


def run_occupancy(args: argparse.Namespace, client: AssistClient, items: list[WorkItem],
                  rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Cloud busy time per request (one at a time) and requests/s under closed-loop load, per
    mode (see the module docstring)."""
    out: dict[str, Any] = {"concurrency": args.concurrency}
    for mode in ("cloud_only", "pd_device"):
        jobs = cloud_work(items, rows, mode)
        busy = [client.run(it.prompt, n, rho, it.output_len).end_s for it, n, rho in jobs]
        reps = max(1, -(-2 * args.concurrency // max(1, len(jobs))))  # >= 2 jobs per client
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:  # httpx.Client is thread-safe
            list(pool.map(lambda j: client.run(j[0].prompt, j[1], j[2], j[0].output_len),
                          jobs * reps))
        wall = time.perf_counter() - t0
        out[mode] = {"cloud_requests": len(jobs), "requests": len(items), "busy_s": busy,
                     "busy_s_per_request": sum(busy) / len(items), "load_rounds": reps,
                     "load_wall_s": wall,
                     "cloud_requests_per_s": len(jobs) * reps / wall if jobs else None,
                     "requests_per_s": len(items) * reps / wall if jobs else None}
    return out


@contextlib.contextmanager
def link_to(args: argparse.Namespace, url: str) -> Iterator[str]:
    """`url` through an emulated link (pd_device.link) when `--link-*` asks for one, else
    `url` itself. Profiles and cloud occupancy are measured without it: the planner adds the
    link to the cloud's own times, and the cloud is busy the same either way."""
    if not (args.link_rtt or args.link_bandwidth or args.link_loss or args.link_jitter):
        yield url
        return
    from pd_device.link import LinkConfig, LinkProxy, parse_hostport

    host, port = parse_hostport(url.split("://", 1)[-1].rstrip("/"))
    cfg = LinkConfig(host, port, rtt_s=args.link_rtt, jitter_s=args.link_jitter,
                     bandwidth_bps=args.link_bandwidth, loss=args.link_loss, seed=args.seed)
    with LinkProxy(cfg) as link:
        yield link.url


def quality_by_band(quality: dict[str, Any], bands: list[tuple[int, int]]) -> list[Any]:
    """The evaluation's quality vs rho per prompt-length band: mean and lower bound."""
    out = []
    for lo, hi in bands:
        rows = [r for r in quality["rows"] if lo <= r["prompt_len"] <= hi]
        if rows:
            out.append({"band": [lo, hi], "prompts": len(rows), "rhos": {
                rho: {"agreement": sum(r["rhos"][rho]["agreement"] for r in rows) / len(rows),
                      "agreement_lcb95": lower_bound([r["rhos"][rho]["agreement"]
                                                      for r in rows])}
                for rho in rows[0]["rhos"]}})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    traces = {k: Path(v) for k, v in (t.split("=", 1) for t in args.traces)}
    text = held_out_tokens(args.model, args.corpus) if args.corpus.is_file() else None
    bands = quality_bands(args.quality_bands, args.max_model_len)
    profile_prompts: dict[tuple[int, int], list[list[int]]] = {}
    if text is not None and args.profile_quality_prompts > 0:
        profile_prompts, text = cut_prompts(text, band_lengths(
            traces, args.max_model_len, args.max_output, bands, args.profile_quality_prompts,
            args.max_model_len - args.profile_quality_output, args.seed))
    items, notes = build_workload(traces, args.requests, args.max_model_len, args.max_output,
                                  text, 1024, args.seed)
    cloud = None
    if args.start_cloud:
        work = Path(tempfile.mkdtemp(prefix="bench_device_"))
        cloud = LocalCloud(args.model, work, args.cloud_backend, args.cloud_device,
                           args.cloud_threads).start()
    url = cloud.url if cloud else args.cloud_url
    if not url:
        raise SystemExit("give --cloud-url or --start-cloud")
    t_start = time.time()
    try:
        client = AssistClient(url, args.model)
        runner = device_runner(args)
        prof, profile_raw = (Profiles.load(args.profiles), None) if args.profiles else \
            measured_profiles(args, client, runner, profile_prompts)
        with link_to(args, url) as device_url:  # the device's view of the cloud
            rows, plans, free_modes, jitter = run_serving(args, device_url, items, prof, runner)
        occupancy = run_occupancy(args, client, items, rows)
        g = args.quality_output
        step = max(1, len(items) // max(1, args.quality_requests))  # both traces' prompts
        prompts = [list(it.prompt[-(args.max_model_len - g):])
                   for it in items[::step][:args.quality_requests]]
        quality = measure_quality(runner, client, prompts, args.rhos, g)
        quality["by_band"] = quality_by_band(quality, bands)
        runner.close()
        client.close()
    finally:
        if cloud:
            cloud.stop()
    finish(args, items, notes, prof, plans, free_modes, rows, occupancy, quality,
           time.time() - t_start, profile_raw, {"display_jitter": jitter})


if __name__ == "__main__":
    main()
