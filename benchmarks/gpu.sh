#!/usr/bin/env bash
# GPU benchmark, under 5 minutes: bf16 autocast, UNITER-base-size model with random weights (no MiniLM needed).
# Prints the in-memory table (bare forward vs online probe training steps), the loader alone on real-width shards
# (36 regions x 2048-d fp16 per image), and end-to-end training through the DataModule and Trainer with the GPU's
# utilisation.   Usage: bash benchmarks/gpu.sh [extra args for benchmarks/gpu.py, e.g. --json out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x /work/venv/bin/python ]; then PY=/work/venv/bin/python; else PY=python3; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  echo "nvidia-smi not found" >&2
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
# GPU_SH_TIMEOUT: seconds (default 300, the default run's budget); a longer list of end-to-end runs needs more
exec timeout "${GPU_SH_TIMEOUT:-300}" "$PY" benchmarks/gpu.py "$@"
