#!/usr/bin/env bash
# The first run on a CUDA GPU (paper §4, §6.1): bench/gpu_check.py, with the environment recorded.
#
#     bash bench/gpu_check.sh            # about ten minutes; --quick: under three
#     PYTHON=.venv/bin/python bash bench/gpu_check.sh --quick
#
# Correctness first, every check with a threshold, then timings; results in
# bench/results/gpu-<device name>/ (env.txt, summary.json). Exits 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "bench/gpu_check.sh: no CUDA device visible to $PY; run it on a GPU machine" >&2
  exit 1
fi
dev=$($PY -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-"))')
out=bench/results/gpu-$dev
mkdir -p "$out"
{ nvidia-smi; $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))'; } > "$out/env.txt" 2>&1
$PY bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.txt"
exit "${PIPESTATUS[0]}"
