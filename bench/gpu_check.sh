#!/usr/bin/env bash
# The GPU path in one run (under 8 minutes on one H200); parts a machine cannot run are skipped.
# On a GPU machine: make setup TORCH=torch==2.14.1 && .venv/bin/pip install -e ".[gpu]" first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_check.py "$@"
