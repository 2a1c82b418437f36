"""Fetches CANN's HCCL and ACL headers from the torch-npu wheel on PyPI into build/cann_headers.

cann_ext's HCCL backend compiles against the real `hccl/hccl.h`, `hccl/hccl_types.h` and
`acl/*.h`; torch-npu vendors them (under `torch_npu/include/third_party/`). This tool downloads
the wheel with `pip download --no-deps` (this interpreter's platform first, then any platform the
pinned release has), extracts only those headers and prints the include directories as a CMake
list on stdout (log lines go to stderr). Nothing of the wheel is committed: build/ is ignored, and
the headers are under the CANN Open Software License.

Steps:
1. if build/cann_headers/SOURCE.json names the wanted release and every header is there, stop
   (no download: a second run costs nothing);
2. download the wheel into a temporary folder (or use --wheel PATH, for machines offline);
3. extract the headers into a temporary folder beside the destination, write SOURCE.json, then
   swap it in, so an interrupted run never leaves a half-filled folder;
4. print `<dest>/include/third_party/hccl/inc;<dest>/include;<dest>/include/third_party/acl/inc`.
Offline or unknown release: exit status 1 and a message saying what failed and what to do.

Usage: python tools/fetch_cann_headers.py [--version V] [--dest DIR] [--wheel PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = ROOT / "build" / "cann_headers"
# Pinned so every build sees the same headers; override with --version or the variable.
TORCH_NPU_VERSION = os.environ.get("PD_SERVE_TORCH_NPU_VERSION", "2.14.0")
PREFIX = "torch_npu/include/"
KEEP = ("third_party/hccl/inc/hccl/", "third_party/acl/inc/acl/")
MUST_HAVE = ("third_party/hccl/inc/hccl/hccl.h", "third_party/hccl/inc/hccl/hccl_types.h",
             "third_party/acl/inc/acl/acl.h", "third_party/acl/inc/acl/acl_rt.h")
# Where this interpreter's own wheel is missing, any of these holds the same headers.
FALLBACK_TARGETS = (("3.11", "manylinux_2_28_x86_64"), ("3.11", "manylinux_2_28_aarch64"),
                    ("3.10", "manylinux_2_17_x86_64"))
LAYOUT = 1  # bump when the extracted layout changes: older folders are refetched
ADVICE = ("Or download the wheel elsewhere and pass --wheel PATH, or point CANN_EXT_HCCL_INCLUDE "
          "at a CANN toolkit's include/ folder and skip this tool.")


class FetchError(RuntimeError):
    """The wheel could not be downloaded or does not hold the headers."""


def log(msg: str) -> None:
    print(f"fetch_cann_headers: {msg}", file=sys.stderr, flush=True)


def include_dirs(dest: Path) -> list[Path]:
    inc = dest / "include"
    return [inc / "third_party" / "hccl" / "inc", inc, inc / "third_party" / "acl" / "inc"]


def cached(dest: Path, version: str) -> bool:
    """True when `dest` already holds the headers of torch-npu `version`."""
    try:
        source = json.loads((dest / "SOURCE.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(source, dict):
        return False
    if source.get("version") != version or source.get("layout") != LAYOUT:
        return False
    return all((dest / "include" / name).is_file() for name in MUST_HAVE)


NETWORK_SIGNS = ("NewConnectionError", "Failed to establish a new connection", "ProxyError",
                 "Temporary failure in name resolution", "Name or service not known",
                 "ConnectTimeout", "ReadTimeoutError", "SSLError", "connection broken")


def _pip_download(version: str, into: Path, target: tuple[str, str] | None) -> tuple[str, bool]:
    """Runs pip download; returns ("", False) on success, else (pip's last error lines, whether
    they show that the index could not be reached)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--timeout", "30", "--retries", "2",
           "-d", str(into), f"torch-npu=={version}"]
    if target is not None:
        cmd += ["--python-version", target[0], "--platform", target[1]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return "", False
    text = proc.stdout + proc.stderr
    lines = [line for line in text.strip().splitlines() if "ERROR" in line or "Error" in line]
    return "\n".join(lines[-4:]) or text.strip()[-600:], any(s in text for s in NETWORK_SIGNS)


def download(version: str, into: Path) -> Path:
    """The torch-npu wheel of `version` for this platform, else for any platform it ships."""
    if importlib.util.find_spec("pip") is None:
        raise FetchError(f"{sys.executable} has no pip: run this tool with a virtual "
                         f"environment's python (e.g. .venv/bin/python) or install pip")
    failures = []
    for target in (None, *FALLBACK_TARGETS):
        why, offline = _pip_download(version, into, target)
        wheels = sorted(into.glob("torch_npu-*.whl"))
        if not why and wheels:
            return wheels[0]
        if offline:
            raise FetchError(
                f"cannot reach the package index to download torch-npu=={version} (offline? "
                f"a proxy?); pip said:\n{why}\n{ADVICE}")
        failures.append(f"[{'this platform' if target is None else ' '.join(target)}] {why}")
    said = "\n".join(failures)
    raise FetchError(f"found no torch-npu=={version} wheel for this platform or "
                     f"{[' '.join(t) for t in FALLBACK_TARGETS]}; pip said:\n{said}\n"
                     f"Pick another release with --version. {ADVICE}")


def _members(wheel: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    """(member, path under include/) of every header kept; refuses odd paths."""
    out = []
    for info in wheel.infolist():
        if info.is_dir() or not info.filename.startswith(PREFIX):
            continue
        rel = info.filename[len(PREFIX):]
        if not rel.startswith(KEEP):
            continue
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise FetchError(f"refusing wheel member with an odd path: {info.filename!r}")
        out.append((info, rel))
    return out


def extract(wheel_path: Path, dest: Path, version: str) -> list[str]:
    """Writes the kept headers and SOURCE.json to a fresh folder, then swaps it in for `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cann_headers-", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            members = _members(wheel)
            for info, rel in members:
                target = tmp / "include" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(info))
        names = sorted(rel for _, rel in members)
        missing = [name for name in MUST_HAVE if name not in names]
        if missing:
            raise FetchError(f"{wheel_path.name} lacks {missing}: the headers moved in this "
                             f"torch-npu release; pick another with --version")
        digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
        (tmp / "SOURCE.json").write_text(json.dumps({
            "wheel": wheel_path.name, "version": version, "sha256": digest, "layout": LAYOUT,
            "license": "CANN Open Software License (headers only; never committed)",
            "files": names}, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        return names
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def fetch(version: str, dest: Path, wheel: Path | None) -> list[Path]:
    """Steps 1-3 of the module docstring; returns the include directories."""
    if wheel is None and cached(dest, version):
        log(f"torch-npu {version} headers already in {dest} (no download)")
        return include_dirs(dest)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="torch_npu_wheel-") as tmp:
        path = wheel if wheel is not None else download(version, Path(tmp))
        if not path.is_file():
            raise FetchError(f"no wheel at {path}")
        size = path.stat().st_size
        names = extract(path, dest, version)
    log(f"{path.name}: {size / 2**20:.1f} MiB, {len(names)} headers into {dest} in "
        f"{time.monotonic() - start:.1f} s")
    return include_dirs(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=TORCH_NPU_VERSION,
                        help=f"torch-npu release to take the headers from ({TORCH_NPU_VERSION})")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                        help="where the headers go (default: build/cann_headers)")
    parser.add_argument("--wheel", type=Path, default=None,
                        help="a torch_npu wheel already on disk (no download)")
    args = parser.parse_args(argv)
    try:
        dirs = fetch(args.version, args.dest.resolve(), args.wheel)
    except (FetchError, OSError, zipfile.BadZipFile) as exc:
        log(f"error: {exc}")
        return 1
    print(";".join(str(d) for d in dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
