#!/usr/bin/env bash
# Install gemma4-jax with its test extra into .venv and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/find_python.sh
PY="$(find_python312)"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# The real-speech audio tests speak with espeak-ng. Install it where apt can
# (best effort: without it those tests are skipped with the reason).
if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  timeout 60 apt-get install -y -qq espeak-ng >/dev/null 2>&1 \
    || { timeout 60 apt-get update -qq >/dev/null 2>&1 \
         && timeout 60 apt-get install -y -qq espeak-ng >/dev/null 2>&1; } \
    || echo "espeak-ng could not be installed; the real-speech audio tests will be skipped"
fi
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS=cpu
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
