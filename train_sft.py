"""Two-stage SFT (paper §4, §A.2.1).

    python train_sft.py --stage 1      # full causal attention: learn the format
    python train_sft.py --stage 2      # memento attention, initialized from stage 1

With no other argument this trains a tiny Qwen3 from scratch with the byte-level tokenizer on
the embedded running-sum task (data/toy_task.py: "sum N blocks from S", N from 3 to 6, S from
0 to 9), on whatever device is present, and writes the runs out/stage1 and out/stage2. For a
real model:

    python train_sft.py --stage 1 --init-from Qwen/Qwen3-0.6B --data microsoft/OpenMementos --val-frac 0.01
    torchrun --nproc_per_node 8 train_sft.py --stage 2 ...          # DDP: every GPU holds everything
    torchrun --nproc_per_node 8 train_sft.py --stage 2 ... --fsdp   # FSDP2: weights, grads, AdamW sharded

One training loop for all three (sft.py; sharding.py sets the processes up).

A run directory (--out) holds complete checkpoints step-NNNNNN/ (HF layout, tokenizer and
generation config included, plus the training state), a `latest` link to the newest, and
metrics.jsonl (one line per step). Anything that takes a checkpoint also takes the run
directory. Ctrl-C or SIGTERM finishes the current step, saves and exits 0; the same command
with --resume then continues exactly as if nothing had happened (training.py).

Stage 2 differs from stage 1 only in the attention mask (blocks.build_mask_from with
keep_last_n_blocks=0): same loss, same optimizer, same schedule.
"""
from __future__ import annotations

import sys

from sft import parse_args, train
from training import TrainingError


def main(argv=None):
    """Parse the command line and train one stage; a problem the user can fix ends the run
    with one line (`train_sft.py: ...`, exit 1)."""
    try:
        train(parse_args(argv, description=__doc__))
    except TrainingError as e:
        sys.exit(f"train_sft.py: {e}")


if __name__ == "__main__":
    main()
