"""One process of tests/test_tensor_parallel.py's check (gloo, CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_worker.py OUT_PREFIX

Splits the workload's model over the two processes with sharding.tensor_parallel and runs the
workload (tests/tp_workload.py); each process writes OUT_PREFIX.rankN.json.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)  # two processes on a small machine

import torch.distributed as dist  # noqa: E402

import tp_workload  # noqa: E402
from sharding import tensor_parallel, tensor_parallel_groups  # noqa: E402


def main(prefix: str) -> None:
    dist.init_process_group("gloo")
    tp, dp_rank, dp_size = tensor_parallel_groups(2)
    m = tensor_parallel(tp_workload.model(), tp)
    with torch.no_grad():
        out = tp_workload.run(m)
    out.update(tp_rank=tp.rank, dp_rank=dp_rank, dp_size=dp_size)
    Path(f"{prefix}.rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
