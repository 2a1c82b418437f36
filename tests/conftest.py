"""Shared fixtures: tiny random checkpoints per architecture variant (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import DEMO_MODEL, VARIANTS, make_checkpoint

pytest_plugins = ["tests.zk_fixtures"]

@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """variant name -> checkpoint directory; 'llama-sharded' is the llama variant in shards."""
    root = tmp_path_factory.mktemp("ckpt")
    dirs = {name: make_checkpoint(name, root / name) for name in VARIANTS}
    dirs["llama-sharded"] = make_checkpoint("llama", root / "llama-sharded", shard=True)
    return dirs


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    return DEMO_MODEL
