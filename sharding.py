"""Training on several processes: DDP, or FSDP2 sharding from PyTorch's own engine (paper §A.2.1).

Under `torchrun`, every process holds a model and takes its share of each global batch.
DDP replicates weights, gradients and AdamW states on every process: fine while they fit
(16 bytes per parameter, ~122 GiB for Qwen3-8B, so not for the paper's models). `--fsdp`
shards all three with FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer is
one unit, gathered for its forward and backward and freed after, and the root holds the
embedding, final norm and lm_head; each process keeps 1/N of every parameter and of its
optimizer state. On CUDA, FSDP2's MixedPrecisionPolicy computes in bf16 and reduces
gradients in fp32 over fp32 master weights; `--cpu-offload` keeps the shards in host memory.

The training loop is one loop for all cases: it calls the model `parallelize` returns, asks
`grad_sync` whether a micro-step synchronizes, and saves and loads full (unsharded) state
dicts through torch.distributed.checkpoint's state_dict helpers, so a checkpoint is the
same HF safetensors directory however the run was sharded.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: gloo on CPU, nccl on CUDA (one GPU per
    process, LOCAL_RANK); without torchrun: (0, 1, device)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device)


def parallelize(model, world: int, device: torch.device, fsdp: bool, cpu_offload: bool = False):
    """Wrap a model.Qwen3 for `world` processes; returns what the loop calls.

    fsdp: shard with FSDP2 in place (each decoder layer, then the root; `model` itself becomes
        the sharded module, and its `hidden_states` / `logits` methods gather like forward so
        that generation works on it), bf16 compute / fp32 reduce on CUDA, CPU offload if asked.
        Else DDP when world > 1, else the model itself.
    Raises RuntimeError (one line) for fsdp without torch.distributed initialized.
    """
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if not dist.is_initialized():
        raise RuntimeError("--fsdp shards over processes: launch with torchrun, e.g. "
                           "`torchrun --nproc_per_node 8 train_sft.py ... --fsdp`")

    kw = {}
    if device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    for name in ("hidden_states", "logits"):  # called directly by the engine, not through forward
        register_fsdp_forward_method(model, name)
    return model


def grad_sync(wrapped, fsdp: bool, world: int, last: bool):
    """Context for one micro-step: gradients are reduced across processes only on the last
    micro-step of an optimizer step (DDP's no_sync / FSDP2's set_requires_gradient_sync)."""
    if fsdp:
        wrapped.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if (world == 1 or last) else wrapped.no_sync()


def total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP2)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state(model, opt) -> tuple[dict, dict]:
    """(model state, optimizer state), unsharded, on CPU, keyed by parameter name: a collective
    under FSDP (every process must call it; rank 0 gets the tensors, the others may get empty
    dicts). Works unsharded too."""
    sharded = dist.is_initialized() and _is_fsdp(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def load_optimizer_state(model, opt, state: dict) -> None:
    """Load a full optimizer state (as full_state returns it) into `opt`, sharding it when the
    model is sharded (every process passes the same full state)."""
    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def local_bytes(model, opt) -> tuple[int, int]:
    """Bytes of parameters and of optimizer state this process holds (its shards under FSDP)."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(local(p) for p in model.parameters())
    states = sum(local(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return params, states


def _is_fsdp(model) -> bool:
    return isinstance(model, FSDPModule)
