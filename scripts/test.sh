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
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS=cpu
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
