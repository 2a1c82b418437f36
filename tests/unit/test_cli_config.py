"""The shipped YAML configs load strictly, and the CLI's path rules and overrides hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_serve.cli import PROJECT_ROOT, load_config, resolve_model_path
from pd_serve.config import ModelSpec, load_yaml


@pytest.mark.parametrize(("path", "backend"), [("configs/deploy/local.yaml", "mindspore"),
                                               ("configs/deploy/local-torch.yaml", "torch")])
def test_deploy_configs_load(path: str, backend: str) -> None:
    cfg = load_config(PROJECT_ROOT / path)
    assert cfg.model.backend == backend and cfg.model.name == "shakespeare-llama"
    assert resolve_model_path(cfg.model.path) == PROJECT_ROOT / "models" / "shakespeare-llama"


def test_model_config_loads() -> None:
    spec = load_yaml(ModelSpec, PROJECT_ROOT / "configs/models/shakespeare-llama.yaml")
    assert spec.path == "models/shakespeare-llama"


def test_overrides_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the shipped configs resolve against the project root
    cfg = load_config(Path("configs/deploy/local.yaml"), port=9001, backend="torch")
    assert (cfg.server.port, cfg.model.backend) == (9001, "torch")
    with pytest.raises(ValueError, match="model.backend"):
        load_config(Path("configs/deploy/local.yaml"), backend="tensorflow")
    with pytest.raises(ValueError, match="no model directory"):
        resolve_model_path("models/does-not-exist")
