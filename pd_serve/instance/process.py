"""Process entry point of `pd-serve instance`: one instance, stateless unless `--role`, served
with uvicorn until SIGINT/SIGTERM (the gateway's is pd_serve.gateway.serve)."""

from __future__ import annotations

import logging

from pd_serve.config import ServeConfig

log = logging.getLogger(__name__)


def run_instance(cfg: ServeConfig, role: str | None, decode_peers: list[str],
                 log_level: str = "info", registry_url: str | None = None,
                 instance_id: str | None = None) -> None:
    """Serves one instance on cfg.server.host:port; with `role` the model loads first; with
    `registry_url` it registers (retrying until the registry answers) and follows the
    orchestrator's assignment; ValueError for a bad registry URL."""
    import uvicorn

    from pd_serve.cli import _server_class
    from pd_serve.instance.app import build_app

    if role not in (None, "prefill", "decode", "aggregated"):
        raise ValueError(f"--role must be prefill, decode or aggregated, got {role!r}")
    if role in ("decode", "aggregated") and decode_peers:
        raise ValueError("--decode-peers is for prefill instances")
    if registry_url is not None and role is not None:
        raise ValueError("--role and --registry exclude each other: with a registry the "
                         "orchestrator assigns the role")
    if registry_url is not None and not registry_url.startswith(("http://", "https://", "zk://")):
        raise ValueError(f"--registry: expected http://HOST:PORT (an orchestrator) or "
                         f"zk://HOST:PORT[/chroot], got {registry_url!r}")
    self_url = f"http://{cfg.server.host}:{cfg.server.port}"
    registry = None
    if registry_url is not None:
        import functools

        from pd_serve.orchestrator.registry import connect

        registry = functools.partial(connect, registry_url,
                                     session_timeout_s=cfg.orchestrator.session_timeout_s)
    app = build_app(cfg, self_url, role, decode_peers, registry, instance_id)
    config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port,
                            log_level=log_level, timeout_graceful_shutdown=5)
    _server_class()(config).run()

