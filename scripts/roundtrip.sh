#!/usr/bin/env bash
# Install gemma4-jax into .venv and run the CPU checkpoint round-trip example.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/find_python.sh
PY="$(find_python312)"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/python -m eval.roundtrip --config=configs/tiny_e2b.py "$@"
