"""GPU tests: everything under tests/gpu/ is marked `gpu` and skipped where CUDA is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.hookimpl(tryfirst=True)  # before the -m filter, so `-m "not gpu"` deselects these
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in item.path.resolve().parents]
    if not ours:
        return
    skip = None if _cuda_available() else pytest.mark.skip(reason="needs CUDA (a lent GPU)")
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)
