#!/usr/bin/env bash
# The first run on a CUDA GPU: everything CI can only emulate, in one command (paper §4, §6.1).
#
#     bash bench/gpu_check.sh            # PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# Runs the kernel and real-path tests natively, the attention benchmark, the memory formula
# against measured CUDA steps, 20 steps of stage 1 and stage 2 on a small random Qwen3 at 4K
# tokens (bf16 autocast, the Triton kernel), seeded generation from the result, the decode
# benchmark, eager against CUDA-graph decoding (same tokens, step times) and the paged-attention
# tests natively. Everything is written to bench/results/gpu-<device name>/, one file per step;
# a failing step is recorded in summary.txt and the script goes on with the next one.
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
: > "$out/summary.txt"

step() {  # step NAME COMMAND...: run, keep stdout+stderr in NAME.txt, note the outcome and time
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
}

step env bash -c "nvidia-smi; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name(0))'"
step tests $PY -m pytest -q tests/test_kernel.py tests/test_real_path.py tests/test_memory.py
step attention $PY bench/bench_attention.py --save "$out/attention.json"
step memory_check $PY bench/memory.py --check --check-tokens 2048

# 4K-token memento-formatted traces of random letters: shape, not meaning, is what is tested.
$PY - "$out/traces.jsonl" <<'EOF'
import json, random, sys
rng = random.Random(0)
words = lambda n: " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(n))
with open(sys.argv[1], "w") as f:
    for i in range(64):
        resp = "<think>\n" + "".join(f"<|block_start|>{words(150)}<|block_end|>\n<|summary_start|>{words(25)}<|summary_end|>\n"
                                     for _ in range(5)) + "</think>\n" + words(5)
        f.write(json.dumps({"problem": words(30), "response": resp}) + "\n")
EOF
common=(--data "$out/traces.jsonl" --max-seq-len 4096 --batch-size 2 --max-steps 20 --layers 4 --hidden 512
        --heads 8 --kv-heads 2 --lr 1e-3 --gradient-checkpointing --no-progress --overwrite)
step train_stage1 $PY train_sft.py --stage 1 "${common[@]}" --out "$out/stage1"
step train_stage2 $PY train_sft.py --stage 2 "${common[@]}" --init-from "$out/stage1" --out "$out/stage2"
step generate $PY generate.py --checkpoint "$out/stage2" --prompt "abc def" --max-new-tokens 512 --seed 0 --json
step decode $PY bench/bench_decode.py
step cuda_graphs $PY bench/bench_cuda_graphs.py   # exit 1 if eager and graph decoding differ
step paged_tests $PY -m pytest -q tests/test_paged_attention.py tests/test_decode_path.py
rm -rf "$out/stage1" "$out/stage2"  # checkpoints are not results
echo "results in $out"
