"""Process entry point of `pd-serve gateway`: loads the tokenizer and serves the gateway app
with uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

from collections.abc import Mapping

from pd_serve.config import ServeConfig


def run_gateway(cfg: ServeConfig, instances: Mapping[str, str], log_level: str = "info",
                registry_url: str | None = None) -> None:
    """Serves the gateway on cfg.server.host:port over the named prefill instances, or over
    those the orchestrator's meta info names when `registry_url` is given."""
    import uvicorn

    from pd_serve.cli import _server_class
    from pd_serve.gateway.app import build_gateway_app
    from pd_serve.instance.runtime import model_dir
    from pd_serve.models.config import ModelConfig
    from pd_serve.models.tokenizer import Tokenizer

    mdir = model_dir(cfg)
    model_max = ModelConfig.from_dir(mdir).max_position_embeddings
    max_model_len = min(cfg.scheduler.max_model_len or model_max, model_max)
    app = build_gateway_app(cfg, Tokenizer(mdir), max_model_len, instances, registry_url)
    config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port,
                            log_level=log_level, timeout_graceful_shutdown=5)
    _server_class()(config).run()
