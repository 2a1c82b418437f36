"""Process entry point of `pd-serve orchestrator`: the registry (embedded, served to the other
processes under /registry, or a client of ZooKeeper), the orchestrator and its HTTP API, served
with uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

from pd_serve.config import ServeConfig


def run_orchestrator(cfg: ServeConfig, log_level: str = "info") -> None:
    """Serves on orchestrator.host:port; RegistryError when ZooKeeper cannot be reached."""
    import uvicorn

    from pd_serve.cli import _server_class
    from pd_serve.orchestrator.api import build_orchestrator_app
    from pd_serve.orchestrator.embedded import EmbeddedStore
    from pd_serve.orchestrator.registry import Registry, connect
    from pd_serve.orchestrator.service import Orchestrator

    ocfg = cfg.orchestrator
    self_url = f"http://{ocfg.host}:{ocfg.port}"
    store = None
    registry: Registry
    if ocfg.registry == "embedded":
        store = EmbeddedStore(ocfg.session_timeout_s)
        registry = store.client()
        shown = f"embedded (served at {self_url}/registry)"
    else:
        registry = connect(ocfg.registry, session_timeout_s=ocfg.session_timeout_s)
        shown = ocfg.registry
    orch = Orchestrator(cfg, registry, shown)
    app = build_orchestrator_app(orch, self_url, store)
    config = uvicorn.Config(app, host=ocfg.host, port=ocfg.port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    _server_class()(config).run()
