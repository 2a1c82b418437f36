#!/usr/bin/env bash
# The main job: the local deployment serving the shipped demo model end to end. Sets up .venv on
# first use, starts the server, answers a sample chat and completion request with the openai
# client, prints them, and keeps serving on http://127.0.0.1:8000 until Ctrl-C.
# Extra arguments go to `pd-serve up` (e.g. --backend torch, --port 0 --exit-after-sample).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup_env.sh
exec .venv/bin/pd-serve up "$@"
