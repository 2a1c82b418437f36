"""Build script: setuptools drives CMake to build cann_ext into pd_serve/kv/_lib/libcann_ext.so.

Metadata lives in pyproject.toml; this file only adds the CMake-built library (and the kernels
package under its install name once kernels/ exists). Build steps for the library:
1. configure CMakeLists.txt at the repository root into <build_temp>/cmake;
2. build the `cann_ext` target;
3. copy libcann_ext.so to pd_serve/kv/_lib/ inside build_lib (wheel) and, for `pip install -e`,
   into the source tree, where pd_serve.kv.cann_ext looks for it.
Environment: CANN_EXT_WITH_NCCL is accepted and ignored (NCCL is always built);
CANN_EXT_WITH_HCCL=1 requires the HCCL backend (the build fails without CANN's headers), =0 leaves
it out, unset builds it where the headers are found (CMake's AUTO); CANN_EXT_HCCL_INCLUDE names the
header folders (default: build/cann_headers from tools/fetch_cann_headers.py); CMAKE_ARGS adds raw
CMake arguments.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """A shared library that CMake builds (target `target`); setuptools compiles nothing."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    """build_ext that runs CMake for CMakeExtension and names the output lib<target>.so."""

    def _cmake_ext(self, name: str) -> CMakeExtension | None:
        for ext in self.extensions:
            if isinstance(ext, CMakeExtension) and name in (ext.name, ext.name.split(".")[-1]):
                return ext
        return None

    def get_ext_filename(self, fullname: str) -> str:
        # Called with the full dotted name and with its last part only; mirror both.
        ext = self._cmake_ext(fullname)
        if ext is None:
            return super().get_ext_filename(fullname)
        return os.path.join(*fullname.split(".")[:-1], f"lib{ext.target}.so")

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found: install CMake >= 3.18 (or `pip install cmake`)")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        config = "Debug" if self.debug else "Release"
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={config}"]
        for backend in ("NCCL", "HCCL"):
            # Always passed, so a value cached by an earlier configure never lingers.
            value = os.environ.get(f"CANN_EXT_WITH_{backend}")
            on = value not in ("", "0", "OFF", "off")
            configure.append(f"-DCANN_EXT_WITH_{backend}="
                             f"{'AUTO' if value is None else 'ON' if on else 'OFF'}")
        configure.append(f"-DCANN_EXT_HCCL_INCLUDE={os.environ.get('CANN_EXT_HCCL_INCLUDE', '')}")
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--target", ext.target, "--parallel", jobs],
            check=True,
        )
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build_dir / "lib" / f"lib{ext.target}.so", out)

    def copy_extensions_to_source(self) -> None:
        # The in-place target (pd_serve/kv/_lib/) is not a package, so it may not exist yet.
        (ROOT / "pd_serve" / "kv" / "_lib").mkdir(parents=True, exist_ok=True)
        super().copy_extensions_to_source()


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(include=["pd_serve", "pd_serve.*", "pd_device", "pd_device.*"])
    package_dir: dict[str, str] = {}
    if (ROOT / "kernels" / "__init__.py").exists():
        # kernels/ installs under an unambiguous import name.
        package_dir["pd_kernels"] = "kernels"
        sub = find_packages(where="kernels")
        packages += ["pd_kernels"] + [f"pd_kernels.{name}" for name in sub]
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=[CMakeExtension("pd_serve.kv._lib.libcann_ext", target="cann_ext")],
    cmdclass={"build_ext": CMakeBuild},
)
