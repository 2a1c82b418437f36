"""Process entry point of `pd-serve instance`: one instance, stateless unless `--role`, served
with uvicorn until SIGINT/SIGTERM (the gateway's is pd_serve.gateway.serve)."""

from __future__ import annotations

import logging

from pd_serve.config import ServeConfig

log = logging.getLogger(__name__)


def run_instance(cfg: ServeConfig, role: str | None, decode_peers: list[str],
                 log_level: str = "info") -> None:
    """Serves one instance on cfg.server.host:port; with `role` the model loads first."""
    import uvicorn

    from pd_serve.cli import _server_class
    from pd_serve.instance.app import build_app

    if role not in (None, "prefill", "decode"):
        raise ValueError(f"--role must be prefill or decode, got {role!r}")
    if role == "decode" and decode_peers:
        raise ValueError("--decode-peers is for prefill instances")
    self_url = f"http://{cfg.server.host}:{cfg.server.port}"
    app = build_app(cfg, self_url, role, decode_peers)
    config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port,
                            log_level=log_level, timeout_graceful_shutdown=5)
    _server_class()(config).run()

