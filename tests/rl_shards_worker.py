"""One process of tests/test_rl.py's two-process check of train_rl under --fsdp (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/rl_shards_worker.py CHECKPOINT OUT.json

Shards the policy and the reference as train_rl.train does (train_rl.distribute), zeroes the
generation copy and refreshes it from the shards, generates the step's rollouts with each process taking its
share (train_rl.sharded_rollouts), and computes the sharded reference's log-probs of the first
rollouts. Rank 0 writes what the test compares with one unsharded process: the exchanged
rollouts, the problems each process generated, the reference's bytes on each process, and
those log-probs.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)  # two processes on a small machine

import torch.distributed as dist  # noqa: E402

import train_rl  # noqa: E402
from blocks import MementoTokens  # noqa: E402
from evaluation import toy_problems  # noqa: E402
from model import Qwen3  # noqa: E402
from sharding import setup_distributed  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

ARGS = SimpleNamespace(temperature=1.0, max_block_tokens=None, max_num_seqs=64, group_size=4, max_new_tokens=200)


def local_bytes(model) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())


def main(checkpoint: str, out: str) -> None:
    rank, world, device = setup_distributed("cpu")
    tok = Tokenizer.from_dir(checkpoint)
    model = Qwen3.from_pretrained(checkpoint)
    ref = Qwen3.from_pretrained(checkpoint).eval().requires_grad_(False)
    model.fp32_lm_head = ref.fp32_lm_head = True
    _, gen, ref = train_rl.distribute(model, ref, world, device, fsdp=True)
    with torch.no_grad():
        for p in gen.parameters():  # so that only the refresh can give it the policy's weights
            p.zero_()
    train_rl.refresh_generation_copy(gen, model)

    generated = []
    inner = train_rl.rollouts

    def recording(m, t, problems, args, step_seed):  # which problems this process decoded
        generated.extend(p.id for p in problems)
        return inner(m, t, problems, args, step_seed)

    train_rl.rollouts = recording
    rows = train_rl.sharded_rollouts(gen, tok, toy_problems(6, seed=2), ARGS, 7, rank, world)
    ids, labels, _, _ = train_rl.collate(rows[:4], tok.token_id("<|endoftext|>"))
    with torch.no_grad():
        ref_logp = train_rl.token_logprobs(ref, ids, labels, MementoTokens.from_tokenizer(tok))
    shares = [None] * world
    dist.all_gather_object(shares, {"generated": generated, "ref_bytes": local_bytes(ref)})
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": rows, "shares": shares, "ref_logp": ref_logp.tolist()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
