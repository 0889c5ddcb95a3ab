#!/usr/bin/env bash
# GPU benchmark, at most 8 minutes: bf16 autocast, UNITER-base-size model with random weights.
# Prints one table: samples/s and peak memory of the bare forward, online probe training (layer_emb and
# attention) and cached training.   Usage: bash benchmarks/gpu.sh [extra args for benchmarks/gpu.py]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x /work/venv/bin/python ]; then PY=/work/venv/bin/python; else PY=python; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  echo "nvidia-smi not found" >&2
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
exec timeout 480 "$PY" benchmarks/gpu.py "$@"
