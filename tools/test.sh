#!/usr/bin/env bash
# The project's one test command (README and CI run this): pytest over tests/ with the default
# marker filter from pyproject.toml (-m "not gpu"), a per-test timeout and a whole-run timeout.
# Extra arguments go to pytest, e.g. tools/test.sh tests/unit -k cann_ext, tools/test.sh -m gpu.
# Sets up .venv first (tools/setup_env.sh, a no-op when current); PD_SERVE_PYTHON picks another
# interpreter and skips that set-up.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PD_SERVE_PYTHON:-}" ]]; then
  tools/setup_env.sh
fi
PY="${PD_SERVE_PYTHON:-.venv/bin/python}"

PER_TEST_S="${PD_TEST_TIMEOUT_S:-600}"   # one test
TOTAL_S="${PD_TEST_TOTAL_TIMEOUT_S:-1500}" # the whole run (CI budget: 30 min with the install)

# SIGINT first so pytest prints its summary of what ran; SIGKILL a minute later if stuck.
exec timeout --signal=INT --kill-after=60 "$TOTAL_S" \
  "$PY" -m pytest -q --timeout="$PER_TEST_S" "$@"
