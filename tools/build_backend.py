"""PEP 517 build backend: setuptools' own, adding PyPI's cmake only when none fits on PATH."""

from __future__ import annotations

import re
import shutil
import subprocess

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (re-export every hook unchanged)

CMAKE_MIN = (3, 18)


def _system_cmake_ok() -> bool:
    cmake = shutil.which("cmake")
    if cmake is None:
        return False
    try:
        text = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return False
    found = re.search(r"(\d+)\.(\d+)", text)
    return found is not None and (int(found[1]), int(found[2])) >= CMAKE_MIN


def _cmake_requires() -> list[str]:
    return [] if _system_cmake_ok() else [f"cmake>={CMAKE_MIN[0]}.{CMAKE_MIN[1]}"]


def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    return _setuptools.get_requires_for_build_wheel(config_settings) + _cmake_requires()


def get_requires_for_build_editable(config_settings: dict | None = None) -> list[str]:
    return _setuptools.get_requires_for_build_editable(config_settings) + _cmake_requires()
