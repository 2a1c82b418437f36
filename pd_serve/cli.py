"""The `pd-serve` command line: `serve` runs one aggregated OpenAI-compatible server; `up`
starts the local disaggregated deployment (prefill and decode instances plus the gateway),
waits until it is healthy and shows a sample request; `instance` and `gateway` run one of its
processes.

Paths: a `--config` path is taken relative to the current directory, falling back to the project
root so the shipped `configs/...` work from anywhere. A relative `model.path` inside a config
always resolves against the project root (the directory holding `pd_serve/` and `models/`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pd_serve.bench.cli import bench_app
from pd_serve.cli_errors import or_exit
from pd_serve.config import ServeConfig, load_serve_config
from pd_serve.console import console_app
from pd_serve.sim.cli import sim_app

T = TypeVar("T")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/deploy/local.yaml"
DEFAULT_PD_CONFIG = "configs/deploy/local-pd.yaml"

app = typer.Typer(help="pd-serve: disaggregated prefill/decode LLM serving.",
                  no_args_is_help=True, add_completion=False)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="ServeConfig YAML.")]
PortOpt = Annotated[int | None, typer.Option(help="Port (overrides server.port; 0: any free).")]
HostOpt = Annotated[str | None, typer.Option(help="Bind address (overrides server.host).")]
BackendOpt = Annotated[str | None, typer.Option(help="mindspore | torch (overrides model.backend)")]
DeviceOpt = Annotated[str | None, typer.Option(help="Device (overrides model.device).")]
LogOpt = Annotated[str, typer.Option(help="Server log level: debug | info | warning | error.")]
RegistryOpt = Annotated[str | None, typer.Option(
    help="Registry: an orchestrator's http://HOST:PORT (embedded) or zk://HOST:PORT[/chroot].")]


def resolve_config_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p if (PROJECT_ROOT / p).exists() else p


def resolve_model_path(path: str | Path) -> Path:
    """`model.path` as a directory: absolute as is, relative against the project root."""
    p = Path(path)
    p = p if p.is_absolute() else PROJECT_ROOT / p
    if not p.is_dir():
        raise ValueError(f"model.path: no model directory at {p}")
    return p


def load_config(config: Path, host: str | None = None, port: int | None = None,
                backend: str | None = None, device: str | None = None) -> ServeConfig:
    """Loads the YAML and applies command-line overrides (validated like the YAML itself)."""
    cfg = load_serve_config(resolve_config_path(config))
    model: dict[str, Any] = {k: v for k, v in (("backend", backend), ("device", device))
                             if v is not None}
    server: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                               server=dataclasses.replace(cfg.server, **server))


def run_server(cfg: ServeConfig, log_level: str = "info") -> None:
    """Builds runner, tokenizer, engine and app from `cfg` and serves until interrupted."""
    import uvicorn

    from pd_serve.api.server import build_app
    from pd_serve.backends import create_runner
    from pd_serve.backends.base import RunnerConfig
    from pd_serve.engine.async_engine import AsyncEngine
    from pd_serve.engine.engine import LLMEngine
    from pd_serve.engine.step_trace import StepTrace
    from pd_serve.models.tokenizer import Tokenizer

    model_dir = resolve_model_path(cfg.model.path)
    runner = create_runner(RunnerConfig(
        model_dir=str(model_dir), backend=cfg.model.backend, device=cfg.model.device,
        dtype=cfg.model.dtype, block_size=cfg.cache.block_size, num_blocks=cfg.cache.num_blocks,
        max_model_len=cfg.scheduler.max_model_len, threads=cfg.model.threads))
    try:
        warmup = getattr(runner, "warmup", None)  # graph backends compile common shapes first
        if callable(warmup):
            logging.getLogger(__name__).info("warming up the %s runner", cfg.model.backend)
            warmup()
        tokenizer = Tokenizer(model_dir)
        trace = (StepTrace.in_dir(cfg.server.step_trace_dir, "aggregated")
                 if cfg.server.step_trace_dir else None)
        engine = AsyncEngine(LLMEngine(runner, tokenizer, cfg.cache, cfg.scheduler), trace)
        config = uvicorn.Config(build_app(engine, tokenizer, cfg), host=cfg.server.host,
                                port=cfg.server.port, log_level=log_level,
                                timeout_graceful_shutdown=5)
        _server_class()(config).run()
    finally:
        runner.close()


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn.Server that, after a graceful shutdown on SIGINT/SIGTERM, returns instead of
        re-raising the signal: with MindSpore's native handlers installed the re-raised signal
        ended the process by SIGTERM (exit -15) rather than as a clean exit."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


@app.command()
def serve(config: ConfigOpt = Path(DEFAULT_CONFIG), host: HostOpt = None, port: PortOpt = None,
          backend: BackendOpt = None, device: DeviceOpt = None, log_level: LogOpt = "info") -> None:
    """Serve one aggregated instance (prefill and decode together) over the OpenAI API."""
    cfg = _or_exit(lambda: load_config(config, host, port, backend, device))
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    typer.echo(f"pd-serve: {cfg.model.name} on {cfg.model.backend}/{cfg.model.device}, "
               f"http://{cfg.server.host}:{cfg.server.port}/v1", err=True)
    _or_exit(lambda: run_server(cfg, log_level))


@app.command()
def up(config: ConfigOpt = Path(DEFAULT_PD_CONFIG), port: PortOpt = None,
       backend: BackendOpt = None, log_level: LogOpt = "warning",
       exit_after_sample: Annotated[bool, typer.Option(
           help="Stop the deployment after the sample requests (scripts, tests).")] = False,
       timeout: Annotated[float, typer.Option(help="Seconds to wait for /health.")] = 600.0,
       ) -> None:
    """Start the local disaggregated deployment (orchestrator with its embedded registry,
    stateless instances it forms into P/D groups, and the gateway, as subprocesses on
    loopback), send a sample chat and completion, serve until Ctrl-C."""
    from pd_serve.instance.launch import LocalDeployment

    cfg = _or_exit(lambda: load_config(config, port=port, backend=backend))
    fport = cfg.server.port or _free_port()
    dep = LocalDeployment(resolve_config_path(config), cfg, fport, cfg.model.backend, log_level)
    groups = ", ".join(f"{g.scenario} {g.prefill}P:{g.decode}D" for g in cfg.orchestrator.groups)
    typer.echo(f"starting the orchestrator, {dep.instance_count} stateless instance(s) of "
               f"{cfg.model.name} ({cfg.model.backend}, hand-off {cfg.pd.handoff_mode}; groups "
               f"{groups}; {cfg.orchestrator.spares} spare) and the gateway at {dep.url}/v1 ...")
    dep.start()
    try:
        _or_exit_runtime(lambda: dep.wait_healthy(timeout))
        _or_exit_runtime(lambda: dep.wait_groups(timeout))
        typer.echo(f"ready: {dep.url}/v1 (model {cfg.model.name!r}); operator console: "
                   f"pd-serve console --orchestrator {dep.orchestrator_url} status")
        _sample(dep.url, cfg)
        if exit_after_sample:
            return
        typer.echo("serving; Ctrl-C stops it")
        dead = dep.wait_any_exit()
        assert dead.proc is not None
        typer.echo(f"error: {dead.name} exited with code {dead.proc.returncode}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo("stopping ...")
    finally:
        dep.stop()


@app.command()
def instance(config: ConfigOpt = Path(DEFAULT_PD_CONFIG), host: HostOpt = None,
             port: PortOpt = None, backend: BackendOpt = None, device: DeviceOpt = None,
             role: Annotated[str | None, typer.Option(
                 help="prefill | decode (default: stateless until POST /internal/assign).")] = None,
             decode_peers: Annotated[str, typer.Option(
                 help="Comma-separated decode instance URLs (prefill role).")] = "",
             registry: RegistryOpt = None,
             instance_id: Annotated[str | None, typer.Option(
                 "--id", help="Name in the registry (default: its URL).")] = None,
             log_level: LogOpt = "info") -> None:
    """Run one resident serving instance: with --role it serves that role; with --registry it
    registers stateless and the orchestrator assigns its role."""
    from pd_serve.instance.process import run_instance

    cfg = _or_exit(lambda: load_config(config, host, port, backend, device))
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    _or_exit_runtime(lambda: _or_exit(lambda: run_instance(
        cfg, role, _urls(decode_peers), log_level, registry, instance_id)))


PrefillOpt = Annotated[str, typer.Option(
    help="Comma-separated prefill instances, NAME=URL or URL (scenarios may use either).")]


@app.command()
def gateway(config: ConfigOpt = Path(DEFAULT_PD_CONFIG), host: HostOpt = None,
            port: PortOpt = None, backend: BackendOpt = None, prefill: PrefillOpt = "",
            registry: RegistryOpt = None, log_level: LogOpt = "info") -> None:
    """Run the P/D gateway (OpenAI API, scenario routing, forwarding to prefill instances with
    rejections or a baseline policy, relay from decode, metrics). Its prefill instances are
    --prefill, or with --registry those the orchestrator's meta info lists."""
    from pd_serve.gateway.scenarios import parse_instances
    from pd_serve.gateway.serve import run_gateway

    cfg = _or_exit(lambda: load_config(config, host, port, backend))
    if registry is None and not prefill:
        _or_exit(lambda: _fail("the gateway needs --prefill NAME=URL,... or --registry URL"))
    instances = _or_exit(lambda: parse_instances(_urls(prefill))) if registry is None else {}
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    _or_exit(lambda: run_gateway(cfg, instances, log_level, registry))


@app.command()
def orchestrator(config: ConfigOpt = Path(DEFAULT_PD_CONFIG), host: HostOpt = None,
                 port: PortOpt = None, registry: Annotated[str | None, typer.Option(
                     help="embedded | zk://HOST:PORT[/chroot] (overrides "
                          "orchestrator.registry).")] = None,
                 log_level: LogOpt = "info") -> None:
    """Run the orchestrator: registry (embedded or ZooKeeper), P/D groups per scenario, health
    and recovery, ratio planning and adjustment, and the operator API the console uses."""
    from pd_serve.orchestrator.serve import run_orchestrator

    cfg = _or_exit(lambda: load_config(config))
    pairs = (("host", host), ("port", port), ("registry", registry))
    over: dict[str, Any] = {k: v for k, v in pairs if v is not None}
    cfg = _or_exit(lambda: dataclasses.replace(
        cfg, orchestrator=dataclasses.replace(cfg.orchestrator, **over)))
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    _or_exit_runtime(lambda: _or_exit(lambda: run_orchestrator(cfg, log_level)))


app.add_typer(console_app, name="console")
app.add_typer(bench_app, name="bench")
app.add_typer(sim_app, name="sim")


def _fail(message: str) -> None:
    raise ValueError(message)


def _urls(csv: str) -> list[str]:
    return [u.strip().rstrip("/") for u in csv.split(",") if u.strip()]


def _or_exit_runtime(fn: Callable[[], T]) -> T:
    """A RuntimeError (a process died, a registry is unreachable) becomes exit status 1."""
    return or_exit(fn, (RuntimeError,), 1)


def _sample(base: str, cfg: ServeConfig) -> None:
    """One chat and one completion request through the real `openai` client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=(cfg.server.api_keys or ("none",))[0])
    chat = client.chat.completions.create(
        model=cfg.model.name, messages=[{"role": "user", "content": "Good morrow, my lord."}],
        max_tokens=48, temperature=0.8, seed=0)
    typer.echo(f"\n[chat] user: Good morrow, my lord.\n[chat] assistant: "
               f"{chat.choices[0].message.content}\n[chat] usage: {_usage(chat.usage)}")
    prompt = "ROMEO:\n"
    comp = client.completions.create(model=cfg.model.name, prompt=prompt, max_tokens=48,
                                     temperature=0.8, seed=0)
    typer.echo(f"\n[completion] {prompt}{comp.choices[0].text}\n"
               f"[completion] usage: {_usage(comp.usage)}\n")


def _usage(u: object) -> str:
    return (f"{getattr(u, 'prompt_tokens', '?')} prompt + "
            f"{getattr(u, 'completion_tokens', '?')} completion tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_or_exit = or_exit  # bad configuration or input: one line and exit status 2


def main() -> None:
    """Console-script entry point (`pd-serve = pd_serve.cli:main`)."""
    app()
