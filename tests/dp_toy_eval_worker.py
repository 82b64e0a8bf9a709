"""One process of tests/test_data_parallel.py's check of the toy evaluation inside an --fsdp
training run (gloo, CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/dp_toy_eval_worker.py CHECKPOINT N SEED OUT.json

Shards the model with FSDP2 as sft.train does under --fsdp (sharding.parallelize), with the
unsharded generation copy made before sharding and zeroed (so that only the refresh from the
shards can give it the weights), then calls training.evaluate_toy as sft.train does. Rank 0
writes the result every process returned and the problems each process decoded.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)  # two processes on a small machine

import torch.distributed as dist  # noqa: E402

import training  # noqa: E402
from model import Qwen3  # noqa: E402
from sharding import generation_copy, parallelize, setup_distributed  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def main(checkpoint: str, n: str, seed: str, out: str) -> None:
    rank, world, device = setup_distributed("cpu")
    tok = Tokenizer.from_dir(checkpoint)
    model = Qwen3.from_pretrained(checkpoint)
    gen = generation_copy(model, torch.float32)
    with torch.no_grad():
        for p in gen.parameters():
            p.zero_()
    model = parallelize(model, world, device, fsdp=True)

    decoded = []
    inner = training.evaluate

    def recording(m, t, problems, *args, **kw):  # which problems this process decoded
        decoded.extend(p.id for p in problems)
        return inner(m, t, problems, *args, **kw)

    training.evaluate = recording
    ev = training.evaluate_toy(model, tok, int(n), int(seed), rank=rank, world=world, generation=gen)
    results = [None] * world
    dist.all_gather_object(results, {"ev": ev, "decoded": decoded})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
