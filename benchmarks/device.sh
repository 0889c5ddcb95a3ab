#!/usr/bin/env bash
# The GPU benchmark on a lent machine whose image lacks some of our packages, in one command.
#
# Here, once (needs PyPI), fill .whl/ (ignored by git) with x86-64 / CPython 3.12 wheels of what a GPU image lacks:
#   bash benchmarks/device.sh --fetch-wheels
# There (in the repo root, with .whl carried along; $OUT, if set, gets the JSON and the log):
#   bash benchmarks/device.sh [benchmarks/gpu.py args...]
# e.g. the next run of docs/performance.md ("Where the time goes"), ~8 minutes:
#   GPU_SH_TIMEOUT=540 bash benchmarks/device.sh --skip memory --e2e-probers --e2e-unpacked layer_emb attention \
#       --e2e-forked layer_emb attention --e2e-no-gc-freeze attention --e2e-no-copy-stream attention \
#       --e2e-one-copy-thread attention --e2e-registered layer_emb attention --e2e-switch attention
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 orjson==3.13.0)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)  # hydra/omegaconf's parser runtime: published as an sdist only

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  python3 -m pip wheel -q --no-deps -w .whl "${SDIST_ONLY[@]}"
  ls .whl
  exit 0
fi

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHON="${PYTHON:-python3}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import hydra, omegaconf, webdataset" \
  || { echo "benchmarks/device.sh: hydra-core/omegaconf/webdataset missing: run --fetch-wheels here and carry .whl" >&2; exit 2; }
bash benchmarks/gpu.sh "$@" --json "$OUT/gpu.json" 2>&1 | tee "$OUT/log.txt"
