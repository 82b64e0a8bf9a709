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

Evaluation and generation (eval.py, generate.py; paper Table 1, §6.1) are data parallel: each
process builds its own engine on its own device and decodes its `share` of the requests; the
processes agree at a few points through the run's torch.distributed store (`exchange`: no
deadline, so a process that finishes hours before the others simply waits), and never talk
during decoding. `data_parallel_rank_size` is the one place that says which share a process
takes; with tensor parallelism (`--tensor-parallel-size K`) a group of K consecutive processes
holds one engine, and the groups share the requests. The toy
evaluation inside a training run decodes through an unsharded copy of the policy
(`generation_copy`, refreshed from the FSDP shards), each process its share.
"""
from __future__ import annotations

import copy
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

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
    dist.init_process_group(_backend(device))
    return dist.get_rank(), dist.get_world_size(), _process_device(device)


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _process_device(device: str) -> torch.device:
    """This process's device under torchrun: cuda:LOCAL_RANK (made current) on CUDA, else `device`."""
    if _backend(device) == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


# ----------------------------------------------------------------------------- tensor parallel (one model over K processes)


@dataclass(frozen=True)
class TensorParallel:
    """A model split over the K processes of a tensor-parallel group (paper §6.1 serving: a
    model too large for one GPU's memory and its KV pool). size: K; rank: this process's
    place in the group; group: the torch.distributed group; src: the global rank of the
    group's first process (it samples, and its ids reach the others by broadcast)."""

    size: int = 1
    rank: int = 0
    group: object = None
    src: int = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group: a row-parallel projection's partial outputs (a
        functional collective, so torch.compile can trace it). Raises what the collective raises."""
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(x, "sum", self.group)


def tensor_parallel_groups(size: int) -> tuple[TensorParallel, int, int]:
    """Cut the torchrun processes into groups of `size` consecutive ranks (one engine each) and
    return (this process's TensorParallel, its data-parallel rank, the data-parallel size).
    Needs an initialized process group (every process calls this, in the same order).
    Raises ValueError (one line) when the world size is not a multiple of size."""
    dp_rank, dp_size = data_parallel_rank_size(size)
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for g in range(world // size):  # every process creates every group, in order (new_group's rule)
        ranks = list(range(g * size, (g + 1) * size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = TensorParallel(size, rank - ranks[0], group, ranks[0])
    return mine, dp_rank, dp_size


def tensor_parallel(model, tp: TensorParallel):
    """Split a model.Qwen3's layers over a tensor-parallel group with torch.distributed's own
    tensor-parallel styles (paper §6.1 serving): ColwiseParallel for the fused QKV and gate-up
    projections (their layouts keep whole GQA groups and matching gate/up rows in one slice;
    model.py), RowwiseParallel for o_proj and down_proj. Each process then holds its shard of
    those weights, K-th of the attention heads (so its KV pool holds K-th of the KV heads),
    and the rest replicated (embedding, norms, lm_head). parallelize_module places the shards;
    the forward runs the layer functions on each process's local shard and sums the two
    row-parallel outputs with one all-reduce each (LayerOps.reduce = tp.all_reduce), which
    the engine passes to every forward. Sets model.tensor_parallel = tp. Returns the model.
    Raises ValueError when K does not divide the KV heads (one line)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    c = model.config
    if c.num_key_value_heads % tp.size:
        raise ValueError(f"--tensor-parallel-size {tp.size} must divide the model's {c.num_key_value_heads} KV heads")
    device = next(model.parameters()).device
    mesh = DeviceMesh.from_group(tp.group, device.type)
    plan = {}
    for i in range(c.num_hidden_layers):
        plan[f"model.layers.{i}.self_attn.qkv_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"model.layers.{i}.mlp.gate_up_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    for name, module in model.named_modules():  # the layer functions take local shards, not DTensors
        if name in plan:
            for pname, p in list(module.named_parameters(recurse=False)):
                if isinstance(p, DTensor):
                    setattr(module, pname, torch.nn.Parameter(p.to_local(), requires_grad=p.requires_grad))
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
    for layer in model.model.layers:
        layer.self_attn.kv_heads = c.num_key_value_heads // tp.size
    model.tensor_parallel = tp
    return model


# ----------------------------------------------------------------------------- data parallel (eval.py, generate.py)

@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel evaluation or generation (paper Table 1, §6.1).

    rank, size: its data-parallel rank and the number of data-parallel engines
        (data_parallel_rank_size); which share of the requests it decodes.
    process, processes: its torch.distributed rank and the world size (the same as rank and
        size while one process holds one engine).
    device: where its engine runs (cuda:LOCAL_RANK on CUDA, else the device asked for).
    store: the run's torch.distributed key-value store (None in one process), which
        `exchange` talks through.
    tp: its tensor-parallel group (TensorParallel) when one engine spans several processes
        (--tensor-parallel-size), else None.
    """

    rank: int = 0
    size: int = 1
    process: int = 0
    processes: int = 1
    device: torch.device = torch.device("cpu")
    store: dist.Store | None = None
    tp: TensorParallel | None = None

    @property
    def lead(self) -> bool:
        """Process 0: it checks the run's inputs, merges the results and prints (Table 1, §6.1)."""
        return self.process == 0

    @property
    def writer(self) -> bool:
        """Whether this process writes its engine's results: the first process of its
        tensor-parallel group (every process without tensor parallelism)."""
        return self.tp is None or self.tp.rank == 0


def data_parallel_rank_size(tensor_parallel_size: int = 1) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this process, from torchrun's RANK and
    WORLD_SIZE ((0, 1) without torchrun): the processes are cut into groups of
    tensor_parallel_size consecutive ranks, each group one engine (today 1: every process is
    its own engine). Raises ValueError (one line) when WORLD_SIZE is not a multiple of
    tensor_parallel_size. Paper Table 1 / §6.1 (many independent samples)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ValueError(f"the world size {world} is not a multiple of the tensor-parallel size "
                         f"{tensor_parallel_size}")
    return rank // tensor_parallel_size, world // tensor_parallel_size


def setup_data_parallel(device: str, tensor_parallel_size: int = 1) -> DataParallel:
    """Join the processes of a data-parallel eval.py / generate.py run (Table 1, §6.1):
    under torchrun, the process group (gloo on CPU, nccl on CUDA, each process on
    cuda:LOCAL_RANK) over the run's store, which `exchange` then uses; without torchrun, one
    process on `device`. With tensor_parallel_size K > 1 the processes form groups of K
    consecutive ranks, one engine each (tensor_parallel_groups). Raises ValueError (one line)
    from data_parallel_rank_size, for K > 1 without torchrun or without the collective backend
    of the device, or when a node runs more processes than it has GPUs (checked by every
    process before any waits)."""
    if tensor_parallel_size > 1 and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--tensor-parallel-size {tensor_parallel_size} needs torchrun: "
                         f"torchrun --nproc_per_node {tensor_parallel_size} ...")
    if tensor_parallel_size > 1 and not (dist.is_nccl_available() if _backend(device) == "nccl"
                                         else dist.is_gloo_available()):
        raise ValueError(f"--tensor-parallel-size {tensor_parallel_size} needs the {_backend(device)} backend, which "
                         "this torch build lacks")
    if "WORLD_SIZE" not in os.environ:
        return DataParallel(device=torch.device(device))
    rank, size = data_parallel_rank_size(tensor_parallel_size)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if _backend(device) == "nccl" and local_world > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise ValueError(f"{local_world} processes on this node but {gpus} GPU(s): one GPU per process, so "
                         f"--nproc_per_node {gpus} at most")
    store, process, processes = next(dist.rendezvous("env://"))
    dist.init_process_group(_backend(device), store=store, rank=process, world_size=processes)
    tp = tensor_parallel_groups(tensor_parallel_size)[0] if tensor_parallel_size > 1 else None
    return DataParallel(rank, size, process, processes, _process_device(device), store, tp)


def close_data_parallel(dp: DataParallel, clean: bool = True) -> None:
    """Leave the process group (a no-op in one process or when already left). clean: every
    process got here (after its last `exchange`), so a barrier comes first (a gloo process
    torn down while a peer still sends can abort it); False on an error path, where the
    peers may be gone, so no barrier. Paper Table 1 / §6.1 runs. Raises what the barrier
    raises (a process-group timeout)."""
    if dp.store is None or not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def share(keys: list, rank: int, size: int, cost: list[float] | None = None) -> list:
    """Data-parallel rank `rank`'s share of `keys` among `size` ranks, in the keys' order; the
    shares of ranks 0..size-1 partition the keys, the same in every process (a function of
    its arguments only), and a share may be empty.

    cost None: every size-th key from the rank-th (keys[rank::size]). Over evaluation keys in
    problem-major order (problem, mode, sample) this gives each rank the same number, within
    one, of the samples of every (problem, mode): samples of one (problem, mode) have the
    same expected length, so the ranks' expected work is equal whatever the problems'
    lengths, without knowing them. cost: each key's known work (e.g. a replayed trace's
    tokens): longest first, each to the rank with the least work so far (ties: the lower
    rank), which keeps the largest share within one key's cost of the smallest.
    Raises ValueError for size < 1, rank outside [0, size) or len(cost) != len(keys).
    Paper Table 1 (samples per problem and mode), §6.1."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"share: rank {rank} of {size} (use 0 <= rank < size)")
    if cost is None:
        return list(keys[rank::size])
    if len(cost) != len(keys):
        raise ValueError(f"share: {len(cost)} costs for {len(keys)} keys")
    load, mine = [0.0] * size, []
    for i in sorted(range(len(keys)), key=lambda i: (-cost[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        load[r] += cost[i]
        if r == rank:
            mine.append(i)
    return [keys[i] for i in sorted(mine)]


def exchange(dp: DataParallel, name: str, value) -> list:
    """Every process posts `value` (JSON-serializable) under `name` and gets every process's,
    in process order; [value] in one process. A barrier with no deadline: a process that
    finished its share hours before the others waits for them (a process group's collective
    would time out), polling the store. Each name is used once per run (the keys carry
    torchrun's restart count, so a restarted run never reads an earlier attempt's). A process
    that fails posts its error (`post`) and exits, so the others learn it here instead of
    waiting; one that dies outright is ended with the others by torchrun. Paper §6.1. Raises
    TypeError for a value JSON cannot hold."""
    if dp.store is None:
        return [value]
    post(dp, name, value)
    keys = [_key(name, p) for p in range(dp.processes)]
    wait = 0.005
    while not dp.store.check(keys):
        time.sleep(wait)
        wait = min(2 * wait, 0.5)
    return [json.loads(dp.store.get(k)) for k in keys]


def post(dp: DataParallel, name: str, value) -> None:
    """Post this process's `value` (JSON-serializable) under `name` without waiting (see
    exchange; paper §6.1). Raises TypeError for a value JSON cannot hold."""
    if dp.store is not None:
        dp.store.set(_key(name, dp.process), json.dumps(value))


def _key(name: str, process: int) -> str:
    return f"memento/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}/{process}"


# ----------------------------------------------------------------------------- generation during training

def generation_copy(model, dtype: torch.dtype):
    """An unsharded copy of a model.Qwen3 in `dtype` for decoding under --fsdp (RL rollouts in
    the compute dtype, the toy evaluation in the parameters' dtype), made before sharding;
    refresh_generation_copy updates it (paper §A.2.3). Memory: the parameters once in
    `dtype` (16 GB for Qwen3-8B in bf16), held through the run."""
    gen = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    gen.fp32_lm_head = model.fp32_lm_head
    return gen


@torch.no_grad()
def refresh_generation_copy(gen, model) -> None:
    """Copy the sharded policy's parameters into `gen`, one all-gathered parameter at a time
    (a collective: every process calls it; the transient is the largest full parameter).
    Raises ValueError if the two models' parameters differ by name. Paper §A.2.3."""
    mine, theirs = list(gen.named_parameters()), list(model.named_parameters())
    if [n for n, _ in mine] != [n for n, _ in theirs]:
        raise ValueError("refresh_generation_copy: the copy's parameters are not the policy's")
    for (_, q), (_, p) in zip(mine, theirs):
        q.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


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
