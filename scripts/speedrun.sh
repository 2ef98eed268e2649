#!/usr/bin/env bash
# Quickstart, command 1: set up (or reuse) .venv and run the main job, `zenlm speedrun`.
# Extra arguments go to zenlm speedrun (e.g. --minutes 2, --corpus FILE, --size small).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" ""
cd "$ROOT"
exec zenlm speedrun "$@"
