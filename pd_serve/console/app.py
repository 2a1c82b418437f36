"""`pd-serve console`: the operator console, a typer sub-app that shows the orchestrator's
status (once or live) and sends it operator actions; exit status 0 ok, 1 orchestrator
unreachable or failing, 2 bad arguments or a request the orchestrator refused (4xx)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from pd_serve.console.client import ConsoleError, OrchestratorClient
from pd_serve.console.render import ago, key_values, status_view

DEFAULT_URL = "http://127.0.0.1:8500"

console_app = typer.Typer(
    help="Operator console of the orchestrator: status, live watch, P:D ratio, scaling, "
         "drain/undrain/replace of instances, profiling, model rollout.",
    no_args_is_help=True, add_completion=False)


@dataclass(frozen=True)
class ConsoleOptions:
    """The global options, given before the subcommand."""

    url: str
    json: bool
    timeout: float


@console_app.callback()
def options(
        ctx: typer.Context,
        orchestrator: Annotated[str, typer.Option(
            envvar="PD_ORCHESTRATOR", help="Orchestrator base URL.")] = DEFAULT_URL,
        json_out: Annotated[bool, typer.Option(
            "--json", help="Print the orchestrator's JSON instead of tables (for scripts).")
        ] = False,
        timeout: Annotated[float, typer.Option(
            min=0.001, help="Seconds to wait for each answer (profile waits at least 300).")
        ] = 10.0) -> None:
    ctx.obj = ConsoleOptions(orchestrator, json_out, timeout)


@console_app.command()
def status(ctx: typer.Context) -> None:
    """Scenarios, instances, spares, recent recoveries and adjustments."""
    url = _opts(ctx).url
    _run(ctx, OrchestratorClient.status, lambda s: status_view(s, url, time.time()))


@console_app.command()
def watch(ctx: typer.Context,
          interval: Annotated[float, typer.Option(
              min=0.01, help="Seconds between refreshes.")] = 2.0,
          iterations: Annotated[int | None, typer.Option(hidden=True, min=1)] = None) -> None:
    """Refresh the status every --interval seconds until Ctrl-C; while the orchestrator is
    down, show an "unreachable" banner over the last status and keep trying. With --json,
    print one status JSON object per line."""
    opts = _opts(ctx)
    try:
        client = OrchestratorClient(opts.url, opts.timeout)
    except ConsoleError as exc:
        _fail(exc)
    with client:
        try:
            (_watch_json if opts.json else _watch_live)(client, interval, iterations)
        except KeyboardInterrupt:
            pass


@console_app.command("set-ratio")
def set_ratio(ctx: typer.Context, scenario: str, n_p: int, n_d: int) -> None:
    """Set the scenario's target P:D ratio to N_P prefill : N_D decode instances."""
    _run(ctx, lambda c: c.set_ratio(scenario, n_p, n_d), _target_line)


@console_app.command()
def scale(ctx: typer.Context, scenario: str, instances: int) -> None:
    """Scale the scenario to INSTANCES instances in total, keeping its P:D ratio."""
    _run(ctx, lambda c: c.scale(scenario, instances), _target_line)


@console_app.command()
def drain(ctx: typer.Context, instance_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Stop sending new requests to an instance; running ones finish."""
    _run(ctx, lambda c: c.drain(instance_id), _state_line)


@console_app.command()
def undrain(ctx: typer.Context,
            instance_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Let a draining instance take new requests again."""
    _run(ctx, lambda c: c.undrain(instance_id), _state_line)


@console_app.command()
def replace(ctx: typer.Context,
            instance_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Replace an instance with a spare."""
    _run(ctx, lambda c: c.replace(instance_id), _replace_line)


@console_app.command()
def profile(ctx: typer.Context, scenario: str) -> None:
    """Profile the scenario and show the measured profile and the resulting plan (this can
    take tens of seconds)."""
    _run(ctx, lambda c: c.profile(scenario), _profile_view)


@console_app.command()
def rollout(ctx: typer.Context, model_path: str) -> None:
    """Roll every instance over to the model at MODEL_PATH."""
    def line(r: dict[str, Any]) -> RenderableType:
        if r.get("started") is True:
            return Text(f"rollout of {model_path} started; follow it with "
                        "`pd-serve console watch`")
        return Text(f"rollout of {model_path} not started: {json.dumps(r)}", style="yellow")

    _run(ctx, lambda c: c.rollout(model_path), line)


def _opts(ctx: typer.Context) -> ConsoleOptions:
    opts = ctx.find_object(ConsoleOptions)
    assert opts is not None, "the console callback sets the options"
    return opts


def _run(ctx: typer.Context, call: Callable[[OrchestratorClient], dict[str, Any]],
         show: Callable[[dict[str, Any]], RenderableType]) -> None:
    """One request: prints its answer as JSON or as `show` renders it, or fails cleanly."""
    opts = _opts(ctx)
    try:
        with OrchestratorClient(opts.url, opts.timeout) as client:
            data = call(client)
    except ConsoleError as exc:
        _fail(exc)
    if opts.json:
        typer.echo(json.dumps(data, indent=2))
    else:
        Console().print(show(data))


def _fail(exc: ConsoleError) -> NoReturn:
    typer.echo(f"error: {exc.message}", err=True)
    raise typer.Exit(exc.exit_code) from exc


def _ticks(interval: float, iterations: int | None) -> Iterator[int]:
    """0, 1, 2, ... with `interval` seconds of sleep between them; `iterations` of them."""
    n = 0
    while iterations is None or n < iterations:
        if n:
            time.sleep(interval)
        yield n
        n += 1


def _watch_live(client: OrchestratorClient, interval: float, iterations: int | None) -> None:
    last: tuple[dict[str, Any], float] | None = None  # last good status, when it was fetched
    with Live(console=Console(), auto_refresh=False) as live:
        for _ in _ticks(interval, iterations):
            try:
                last = (client.status(), time.time())
                frame: RenderableType = Group(
                    Text(f"refreshed {time.strftime('%H:%M:%S')}, every {interval:g}s; "
                         "Ctrl-C stops", style="dim"),
                    status_view(last[0], client.url, last[1]))
            except ConsoleError as exc:
                frame = _outage_frame(exc, last, client.url, interval)
            live.update(frame, refresh=True)


def _outage_frame(exc: ConsoleError, last: tuple[dict[str, Any], float] | None, url: str,
                  interval: float) -> RenderableType:
    """A red banner with the error over the last good status, if there was one."""
    shown = (f"showing the status from {time.strftime('%H:%M:%S', time.localtime(last[1]))} "
             f"({ago(time.time() - last[1])})" if last else "no status yet")
    banner = Panel(Text(f"{exc.message}\nretrying every {interval:g}s; {shown}"),
                   title="orchestrator unreachable" if not exc.reachable else "orchestrator error",
                   title_align="left", border_style="bold red")
    return Group(banner, status_view(last[0], url, last[1])) if last else banner


def _watch_json(client: OrchestratorClient, interval: float, iterations: int | None) -> None:
    for _ in _ticks(interval, iterations):
        try:
            typer.echo(json.dumps(client.status()))
        except ConsoleError as exc:
            typer.echo(f"error: {exc.message}", err=True)


def _target_line(r: dict[str, Any]) -> RenderableType:
    t = r.get("target")
    t = t if isinstance(t, dict) else {}
    return Text(f"scenario {r.get('scenario', '-')}: target {t.get('n_p', '-')} prefill + "
                f"{t.get('n_d', '-')} decode")


def _state_line(r: dict[str, Any]) -> RenderableType:
    return Text(f"instance {r.get('id', '-')}: {r.get('state', '-')}")


def _replace_line(r: dict[str, Any]) -> RenderableType:
    rep = r.get("replacement")
    if rep is None:
        return Text(f"instance {r.get('id', '-')}: being replaced; no replacement assigned yet",
                    style="yellow")
    return Text(f"instance {r.get('id', '-')}: replaced by {rep}")


def _profile_view(r: dict[str, Any]) -> RenderableType:
    parts: list[RenderableType] = [Text(f"scenario {r.get('scenario', '-')} profiled")]
    for key in ("profile", "plan"):
        if isinstance(r.get(key), dict):
            parts.append(key_values(key, r[key]))
    return Group(*parts)
