#!/usr/bin/env bash
# The project's one test command (README and CI run this): pytest over tests/ with the default
# marker filter from pyproject.toml (-m "not gpu"), a per-test timeout and a whole-run timeout.
# Extra arguments go to pytest, e.g. tools/test.sh tests/unit -k cann_ext, tools/test.sh -m gpu.
# Uses .venv/bin/python (made by .ci/run or by hand); PD_SERVE_PYTHON picks another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PD_SERVE_PYTHON:-.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "tools/test.sh: $PY not found; set up with:" >&2
  echo "  python3 -m venv .venv && .venv/bin/pip install -e '.[test]'" >&2
  exit 2
fi

PER_TEST_S="${PD_TEST_TIMEOUT_S:-600}"   # one test
TOTAL_S="${PD_TEST_TOTAL_TIMEOUT_S:-1500}" # the whole run (CI budget: 30 min with the install)

# SIGINT first so pytest prints its summary of what ran; SIGKILL a minute later if stuck.
exec timeout --signal=INT --kill-after=60 "$TOTAL_S" \
  "$PY" -m pytest -q --timeout="$PER_TEST_S" "$@"
