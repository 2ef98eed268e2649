#!/usr/bin/env bash
# Quickstart, command 2: set up (or reuse) .venv with the test extras and run the test suite.
# Extra arguments go to pytest (e.g. -m slow for the slow tests, -x, -k NAME).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" "test"
cd "$ROOT"
exec python -m pytest -q "$@"
