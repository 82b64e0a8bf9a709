#!/usr/bin/env bash
# The first run on a CUDA GPU (paper §4, §6.1): bench/gpu_check.py, with the environment recorded,
# then the decode benchmark (bench/bench_decode_gpu.py: the 0.6B and 8B shapes, engine vs HF,
# eager vs graphs, bandwidth, Fig. 8; about five minutes; with --quick the 0.6B shape at B = 1
# and 64 only).
#
#     bash bench/gpu_check.sh            # about fifteen minutes; --quick: about five
#     PYTHON=.venv/bin/python bash bench/gpu_check.sh --quick
#
# Correctness first, every check with a threshold, then timings; results in
# bench/results/gpu-<device name>/ (env.txt, summary.json, decode_gpu.json). Exits 1 if any
# check failed.
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
status=${PIPESTATUS[0]}
decode=()
[[ " $* " == *" --quick "* ]] && decode=(--shapes Qwen3-0.6B --batch-sizes 1,64)
$PY bench/bench_decode_gpu.py --out "$out/decode_gpu.json" "${decode[@]}" 2>&1 | tee "$out/decode_gpu.txt"
exit "$status"
