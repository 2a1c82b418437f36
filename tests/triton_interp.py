"""Runs a test module's `interpreter_checks()` under the Triton interpreter in a subprocess, so
TRITON_INTERPRET never leaks into the other tests (kernel test modules call this from a test and
from their `__main__`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_under_interpreter(module_file: str) -> None:
    """Runs `module_file` as a script with TRITON_INTERPRET=1; AssertionError with its output
    unless it exits 0."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}  # `tests` importable
    proc = subprocess.run([sys.executable, module_file], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def script_main(checks: Callable[[], list[str]]) -> None:
    """The `__main__` of such a module: prints the failures (or that all passed), exits 1 if
    there were any."""
    problems = checks()
    print("\n".join(problems) or "interpreter checks passed")
    sys.exit(1 if problems else 0)
