#!/usr/bin/env bash
# One short GPU check (< 3 minutes on one H200): FLYP step images/s, MFU, peak memory and the
# gradient cache's memory at 8x its micro-batch. Run from the repository root:
#   bash benchmarks/gpu_check.sh            (writes $OUT/gpu_check.json when OUT is set)
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 170 "$PY" benchmarks/gpu_check.py --model ViT-B-16 --batch 256 --micro 32 --precision bf16 \
  | tee "${OUT:-/tmp}/gpu_check.json"
