"""Process entry points: `pd-serve instance` (one instance, stateless unless `--role`) and
`pd-serve frontend` (the minimal front end); both serve with uvicorn until SIGINT/SIGTERM."""

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


def run_frontend(cfg: ServeConfig, prefill_urls: list[str], log_level: str = "info") -> None:
    """Serves the front end over the given prefill instances."""
    import uvicorn

    from pd_serve.cli import _server_class
    from pd_serve.frontend.app import build_frontend_app
    from pd_serve.instance.runtime import model_dir
    from pd_serve.models.config import ModelConfig
    from pd_serve.models.tokenizer import Tokenizer

    mdir = model_dir(cfg)
    model_max = ModelConfig.from_dir(mdir).max_position_embeddings
    max_model_len = min(cfg.scheduler.max_model_len or model_max, model_max)
    app = build_frontend_app(cfg, Tokenizer(mdir), max_model_len, prefill_urls)
    config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port,
                            log_level=log_level, timeout_graceful_shutdown=5)
    _server_class()(config).run()
