#!/usr/bin/env bash
# Creates .venv and installs pd-serve into it (editable, with the test extra; this builds
# cann_ext through CMake). Idempotent: reinstalls only when the build inputs changed.
# Used by tools/run_local.sh, tools/test.sh and .ci/run. PYTHON picks the interpreter (>= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY'
import sys
if sys.version_info[:2] < (3, 11):
    sys.exit(f"pd-serve needs Python >= 3.11, {sys.executable} is {sys.version.split()[0]}")
PY

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.pd-serve-build-stamp
# Fetched CANN headers and CANN_EXT_WITH_HCCL change what CMake builds (the HCCL backend).
want=$( { cat pyproject.toml setup.py CMakeLists.txt cann_ext/include/*.h cann_ext/src/*
          cat build/cann_headers/SOURCE.json 2>/dev/null || true
          echo "hccl=${CANN_EXT_WITH_HCCL-unset}"; } | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f pd_serve/kv/_lib/libcann_ext.so ]]; then
  exit 0
fi

start=$(date +%s)
.venv/bin/python -m pip install --progress-bar off -q -e ".[test]"
.venv/bin/python -c "from pd_serve.kv import cann_ext; print('setup: cann_ext', cann_ext.version())"
echo "$want" > "$stamp"
echo "setup: install took $(( $(date +%s) - start )) s" >&2
