"""The `pd-device` command line: `run` serves one prompt on this device with the cloud's help
(or alone) and prints the stream and a one-line report; `link` runs the link emulator."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from pd_device.settings import MODES
from pd_serve.cli_errors import or_exit

PROJECT_ROOT = Path(__file__).resolve().parents[1]

app = typer.Typer(help="pd-device: P/D-Device serving on an end device.", no_args_is_help=True,
                  add_completion=False)


def resolve_model_dir(path: str) -> str:
    """A model directory as given, else relative to the project root (shipped models/)."""
    p = Path(path)
    if p.is_dir() or p.is_absolute():
        return str(p)
    return str(PROJECT_ROOT / p) if (PROJECT_ROOT / p).is_dir() else str(p)


@app.command()
def run(
    prompt: Annotated[str, typer.Option(help="The prompt text.")],
    model: Annotated[str, typer.Option(help="Model directory.")] = "models/shakespeare-llama",
    cloud: Annotated[str | None, typer.Option(help="Gateway base URL (the cloud).")] = None,
    n_cloud: Annotated[int, typer.Option(help="N: cloud tokens after the first.")] = 16,
    rho: Annotated[float, typer.Option(help="Fraction of the prompt the cloud keeps.")] = 1.0,
    pace_ms: Annotated[float, typer.Option(help="Target gap between shown tokens.")] = 50.0,
    mode: Annotated[str, typer.Option(help=" | ".join(MODES))] = "pd_device",
    max_tokens: Annotated[int, typer.Option(help="Output budget G.")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy.")] = 0.0,
    backend: Annotated[str, typer.Option(help="mindspore | torch")] = "mindspore",
    threads: Annotated[int, typer.Option(help="Host threads of the device model.")] = 2,
    model_name: Annotated[str | None, typer.Option(
        help="Model id the gateway serves (default: the directory's name).")] = None,
    ttft_target_s: Annotated[float, typer.Option(
        help="No first cloud token by then: device-only.")] = 2.0,
    max_gap_ms: Annotated[float, typer.Option(help="Bound on any gap while buffered.")] = 250.0,
    slowdown: Annotated[float, typer.Option(help="Emulate a slower device (>= 1).")] = 1.0,
    wake_allowance_ms: Annotated[float, typer.Option(
        help="Display wake-up lateness allowed for below the gap bound.")] = 10.0,
) -> None:
    """Serve one prompt: the cloud's first token at once, then a continuous stream."""
    from pd_device.config import DeviceConfig
    from pd_device.runtime import DeviceRuntime
    from pd_device.settings import Settings
    from pd_serve.engine.sampling_params import SamplingParams

    cfg = or_exit(lambda: DeviceConfig(
        model_dir=resolve_model_dir(model), backend=backend, threads=threads, cloud_url=cloud,
        model_name=model_name, ttft_target_s=ttft_target_s, max_gap_s=max_gap_ms / 1000,
        slowdown=slowdown, display_jitter_s=wake_allowance_ms / 1000))
    settings = or_exit(lambda: Settings(n_cloud=n_cloud, rho=rho, pace_s=pace_ms / 1000,
                                        mode=mode))
    params = or_exit(lambda: SamplingParams(max_tokens=max_tokens, temperature=temperature))
    with DeviceRuntime(cfg) as rt:
        ids = rt.tokenizer.encode(prompt)
        stream = or_exit(lambda: rt.generate(ids, params, settings))
        for event in stream:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        assert rt.last_report is not None
        typer.echo(rt.last_report.summary(), err=True)


@app.command()
def link(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on (port 0: any).")],
    upstream: Annotated[str, typer.Option(help="HOST:PORT of the cloud gateway.")],
    rtt_ms: Annotated[float, typer.Option(help="Round-trip time added (RTT/2 each way).")] = 0.0,
    jitter_ms: Annotated[float, typer.Option(help="Uniform jitter per segment.")] = 0.0,
    bandwidth_mbps: Annotated[float | None, typer.Option(help="Cap each way (Mbit/s).")] = None,
    loss: Annotated[float, typer.Option(help="Segment loss probability (resent after RTO).")
                    ] = 0.0,
    rto_min_ms: Annotated[float, typer.Option(help="Minimum retransmission timeout.")] = 200.0,
    seed: Annotated[int | None, typer.Option(help="Random seed (jitter, loss).")] = None,
) -> None:
    """Run the link emulator (a delaying TCP proxy) in the foreground until interrupted."""
    from pd_device.link import LinkConfig, LinkProxy, parse_hostport

    (lhost, lport), (uhost, uport) = or_exit(
        lambda: (parse_hostport(listen), parse_hostport(upstream)))
    cfg = or_exit(lambda: LinkConfig(
        upstream_host=uhost, upstream_port=uport, listen_host=lhost, listen_port=lport,
        rtt_s=rtt_ms / 1000, jitter_s=jitter_ms / 1000,
        bandwidth_bps=None if bandwidth_mbps is None else bandwidth_mbps * 1e6, loss=loss,
        rto_min_s=rto_min_ms / 1000, seed=seed))
    proxy = LinkProxy(cfg)

    async def serve() -> None:
        task = asyncio.create_task(proxy.serve_forever())
        while not proxy.port:
            await asyncio.sleep(0.01)
        typer.echo(f"link: {lhost}:{proxy.port} -> {uhost}:{uport} rtt={rtt_ms:g}ms "
                   f"jitter={jitter_ms:g}ms bandwidth={bandwidth_mbps or 'unlimited'}Mbps "
                   f"loss={loss:g}", err=True)
        await task

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


def link_main() -> None:
    """`python -m pd_device.link ...`: the `link` command alone."""
    typer.run(link)


def main() -> None:
    app()
