"""Finds the `pd_kernels` package (Triton kernels for CUDA, source dir kernels/) if present.

Installed, it imports as `pd_kernels`; run from a source checkout without installing, it is
loaded from the repository's kernels/ directory under the same name (setup.py maps kernels/ to
pd_kernels). Without either, the torch backend uses its own torch implementations.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_SOURCE_DIR = Path(__file__).resolve().parents[3] / "kernels"
_cache: dict[str, ModuleType | None] = {}


def load_pd_kernels() -> ModuleType | None:
    """The `pd_kernels` module, or None when neither installed nor in the source tree."""
    if "module" in _cache:
        return _cache["module"]
    module: ModuleType | None
    try:
        module = importlib.import_module("pd_kernels")
    except ImportError:
        module = _load_from_source()
    _cache["module"] = module
    return module


def _load_from_source() -> ModuleType | None:
    init = _SOURCE_DIR / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        "pd_kernels", init, submodule_search_locations=[str(_SOURCE_DIR)])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pd_kernels"] = module
    try:
        spec.loader.exec_module(module)
    except ImportError:
        del sys.modules["pd_kernels"]
        return None
    return module

