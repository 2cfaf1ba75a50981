#!/usr/bin/env bash
# Install gemma4-jax into .venv and run the tool-calling demo on the CPU:
# generate the data, train a small Gemma 4 from scratch, score held-out
# requests, export a checkpoint that `gm.ckpts.load_params` loads.
# Extra arguments go to train.finetune, e.g. --config.workdir=DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/find_python.sh
PY="$(find_python312)"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
start=$(date +%s)
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
echo "installed in $(( $(date +%s) - start )) s"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
WORKDIR="${WORKDIR:-runs/tool_calling_demo}"
.venv/bin/python -m train.finetune --config=configs/tool_calling_demo.py \
  --config.workdir="$WORKDIR" "$@"
echo "demo finished in $(( $(date +%s) - start )) s; model in $WORKDIR/export"
