#!/usr/bin/env bash
# One prepared check for a single-GPU host, before any multi-GPU run (docs/openrlhf.md):
# the OpenRLHF setup hook leaves CUDA uninitialised, AIPOPolicyLoss on CUDA equals the CPU
# result, and the embedded trainer runs two bfloat16 steps on CUDA with a random model of the
# default's architecture. One line per check; exit 1 on any failure.
#   bash scripts/setup.sh --with-openrlhf && bash scripts/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_smoke.py "$@"
