"""Training memory per GPU for a full fine-tune of a Qwen3 (paper §4, §A.2.1): the arithmetic.

    python bench/memory.py --model Qwen3-8B --max-seq-len 32768 --gradient-checkpointing
    python bench/memory.py --model Qwen/Qwen3-0.6B --world-size 8     # a hub id or a checkpoint dir
    python bench/memory.py --table                                     # the README table
    python bench/memory.py --check                                     # formula vs a measured CPU step
    python bench/memory.py --rl --world-size 8 --micro-batch-size 1    # an RL step per GPU (train_rl.py)
    python bench/memory.py --serve --model Qwen3-32B --tensor-parallel-size 2   # a serving engine per GPU

What train_sft.py holds on one GPU during a micro-step (bf16 autocast over fp32 master weights,
AdamW, the Triton kernel, the loss chunked over rows, gradient accumulation), in bytes, with
N parameters, h hidden, q / kv the query / key-value widths (heads x head_dim), I the MLP
width, V the vocabulary, L layers, R the loss chunk's rows:

    weights     4 N         fp32 master weights
    grads       4 N         present through every micro-step after the first
    adamw       8 N         exp_avg and exp_avg_sq, fp32
    autocast    2 N_linear  bf16 copies of every Linear weight (lm_head included), cached by
                            autocast for the whole forward + backward
    saved       what autograd keeps per token: in each layer (see layer_activation_bytes)
                    26 h + 10 q + 10 kv + 8 I   (+ 4 bytes per norm row, 4 per head for lse)
                for all L layers, or with gradient checkpointing only each layer's fp32 input
                (4 h); plus RoPE tables; with the plain loss the fp32 logits (4 V per token)
    transient   the largest of three moments of the backward, on top of `saved`:
                the loss: final norm and its output (12 h per token) + lm_head's weight gradient
                    accumulating over chunks (2 V h) + max(12 R V: fp32 log-probs, their
                    gradient and the logits' gradient; 2 R V + 2 V h: the bf16 gradient and
                    one chunk's weight gradient);
                lm_head's weight gradient cast back to fp32 (2 V h + 4 V h);
                one layer: its recomputed activations (with checkpointing) + its backward
                    gradients (4 I + 4 h per token) + with tied embeddings the fp32 lm_head
                    gradient waiting for the embedding's (4 V h)
    step        foreach AdamW's temporary sqrt(exp_avg_sq) (4 N), if larger than the above

peak = weights + adamw + max(grads + autocast + saved + transient, grads + step).
Under N-way sharding (FSDP2, per rank) weights, grads and AdamW states are divided by N and
the autocast copies are replaced by the bf16 parameters of the two layers FSDP gathers at a
time (one computing, one prefetched): arithmetic only, for the sharding still to come.

The per-token terms were read tensor by tensor with saved-tensor hooks. No GPU was used to
write this: `--check` measures training micro-steps of a small model on the CPU (bf16 autocast,
a bf16 model, fp32; the Triton kernel under its interpreter) with torch's profiler and prints
them beside the formula (within 3.2% at 256 tokens on the development machine), and
tests/test_memory.py asserts the two agree within 10%.

An RL step of train_rl.py (paper §A.2.3) has two phases per GPU, never at once (the rollout
engine's pool is freed before training):

    resident    the policy's weights and AdamW states (sharded over N under --fsdp), the frozen
                reference in bf16 (2 N, sharded under --fsdp), and under --fsdp the unsharded
                bf16 generation copy rollouts decode with (2 N)
    rollouts    resident + the KV pool (--kv-cache-gib, or what gpu_memory_utilization leaves:
                utilization x device - resident - the engine's profiling step) + that step: one
                chunk of max_num_batched_tokens through a layer (q/k/v, MLP, ~ (q + 2 kv + 3 I)
                c bytes per token) and fp32 logits of max_num_seqs rows (4 V each)
    training    resident + one micro-step of --micro-batch-size rollouts of the full length
                (the formula above, with gradients)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from huggingface_hub import hf_hub_download  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from checkpoint import local_checkpoint  # noqa: E402
from cli import ArgumentParser, positive_int  # noqa: E402
from model import QWEN3_SHAPES as SHAPES  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402

GIB = 2**30


def builtin_config(name: str):
    """model.Qwen3Config of a released Qwen3 (head_dim 128, vocab 151,936). KeyError if unknown."""
    if name not in SHAPES:
        raise KeyError(name)
    return Qwen3Config.released(name)


def load_config(model: str):
    """A built-in shape name, a checkpoint directory or a hub id -> model.Qwen3Config.

    Raises SystemExit with one line when it is none of these (only config.json is fetched)."""
    if model in SHAPES:
        return builtin_config(model)
    p = Path(model)
    try:
        if p.is_dir():
            d = local_checkpoint(p)
            return Qwen3Config.from_dict(json.loads((d / "config.json").read_text()), source=str(d))
        return Qwen3Config.from_dict(json.loads(Path(hf_hub_download(model, "config.json")).read_text()), source=model)
    except Exception as e:  # the hub client raises many types; one line is what the user needs
        sys.exit(f"bench/memory.py: --model {model!r}: not a built-in shape ({', '.join(SHAPES)}), a checkpoint "
                 f"directory or a reachable hub id ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def param_counts(cfg) -> tuple[int, int]:
    """(all parameters, parameters of Linear weights incl. lm_head) of a Qwen3Config, counted
    from the shapes (tied embeddings counted once)."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    bias = (q + 2 * kv + h) if cfg.attention_bias else 0  # q, k, v and o_proj, as HF's Qwen3
    per_layer_linear = h * q + 2 * h * kv + q * h + 3 * h * inter
    per_layer = per_layer_linear + bias + 2 * h + 2 * cfg.head_dim  # two RMSNorms, q/k norms
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    total = cfg.num_hidden_layers * per_layer + embed + head + h  # final norm
    return total, cfg.num_hidden_layers * per_layer_linear + cfg.vocab_size * h


def layer_activation_bytes(cfg, param_bytes: int, compute_bytes: int) -> int:
    """Bytes autograd saves per token in one decoder layer (what `model.DecoderLayer` keeps).

    p = param_bytes (the residual stream's dtype), c = compute_bytes (the autocast dtype, or p):
    two RMSNorms (fp32 input 4h + normalized p h), the Linear inputs (under autocast each
    Linear saves its own c-byte cast: 3 for q/k/v, 2 for gate/up; else one p-byte input per
    group), q/k RMSNorms (fp32 input + normalized c), the kernel's q, k, v, out (c; o_proj
    reads the same out) and log-sum-exp, SwiGLU (gate, silu, up, product: 4 c I), and 4-byte
    rsqrt rows. RoPE saves nothing per token: its tables need no gradient. Checked tensor by
    tensor with saved-tensor hooks while writing this."""
    h, hq, hkv, D, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    q, kv = hq * D, hkv * D
    p, c = param_bytes, compute_bytes
    autocast = c != p
    norms = 2 * (4 * h + p * h)
    linear_inputs = 5 * c * h if autocast else 2 * p * h
    qk_norms = (4 + c) * (q + kv)
    attn = c * (2 * q + 2 * kv) + 4 * hq
    mlp = 4 * c * inter
    rsqrt = 4 * (2 + hq + hkv)
    return norms + linear_inputs + qk_norms + attn + mlp + rsqrt


@dataclass
class Estimate:
    """Bytes per GPU (per rank with world_size > 1) of one training micro-step.

    saved: what autograd holds when the backward is at its largest (layer inputs with
    checkpointing, all layers' activations without, the final norm, the fp32 logits of the
    plain loss); transient: the largest short-lived set on top of it (a loss chunk's
    log-probs and gradients with lm_head's accumulated weight gradient, or one layer's
    recomputed activations and backward gradients); logits: what the loss alone holds at its
    largest (a part of saved + transient); peak: the maximum over the step."""

    weights: int
    grads: int
    adamw: int
    autocast: int
    saved: int
    transient: int
    logits: int
    step: int
    peak: int


def estimate(cfg, *, batch_size: int = 1, seq_len: int = 32768, gradient_checkpointing: bool = True,
             chunked_loss: bool = True, loss_chunk_rows: int = 1024, param_bytes: int = 4, compute_bytes: int = 2,
             world_size: int = 1) -> Estimate:
    """Training memory of one micro-step (paper §A.2.1 recipe: AdamW, bf16, checkpointing).

    Args:
        cfg: a model.Qwen3Config. batch_size, seq_len: tokens per micro-step = their product.
        gradient_checkpointing: keep only each layer's input, recompute in backward.
        chunked_loss / loss_chunk_rows: Qwen3.forward(labels=...) (True), or plain
            F.cross_entropy over the full fp32 logits that Qwen3.forward returns (False).
        param_bytes: 4 (fp32 master weights, bf16 autocast) or 2 (a bf16 model).
        compute_bytes: 2 under bf16 autocast; equal to param_bytes without autocast.
        world_size: N-way FSDP sharding of weights, grads and AdamW states (per rank).
    Returns:
        Estimate, in bytes.
    Raises:
        ValueError for a non-positive size.
    """
    if min(batch_size, seq_len, loss_chunk_rows, world_size, param_bytes, compute_bytes) < 1:
        raise ValueError("estimate: batch_size, seq_len, loss_chunk_rows, world_size and byte sizes must be >= 1")
    N, n_linear = param_counts(cfg)
    p, c = param_bytes, compute_bytes
    h, V, L, inter = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size
    tokens = batch_size * seq_len
    VH = V * h
    weights, grads, adamw = p * N // world_size, p * N // world_size, 2 * p * N // world_size
    if world_size == 1:
        autocast = c * n_linear if c != p else 0
    else:  # FSDP2 gathers each layer's parameters in the compute dtype, one ahead
        layer = (N - VH * (1 if cfg.tie_word_embeddings else 2)) // L
        autocast = 2 * c * max(layer, VH)

    per_layer = layer_activation_bytes(cfg, p, c) * tokens
    rope = 2 * p * cfg.head_dim * tokens  # the cos/sin tables, shared by all layers
    final = (4 * h + 2 * p * h + 4) * tokens  # final RMSNorm's saved input and output (the loss's input)
    held = 0 if chunked_loss else 4 * tokens * V  # the fp32 logits the plain loss reads, kept to the end
    rows = min(loss_chunk_rows, tokens) if chunked_loss else tokens
    # The loss's backward, per chunk: fp32 log-probs, their gradient and the logits' gradient
    # (12 bytes per logit), then the logits' gradient in c and lm_head's weight gradient, which
    # accumulates over chunks in one c-byte buffer.
    loss = c * VH + max(12 * rows * V, c * rows * V + c * VH)
    # Under autocast that buffer then becomes fp32 on its way to the fp32 weight; with tied
    # embeddings the fp32 gradient waits for the embedding's, through all the layers.
    cast_back = (c + p) * VH if c != p else 0
    waiting = p * VH if cfg.tie_word_embeddings else 0
    workspace = (2 * c * inter + 4 * h) * tokens  # one layer's backward: SwiGLU and residual gradients
    if gradient_checkpointing:
        saved = L * p * h * tokens + rope  # each layer's input
        recompute = per_layer - (4 * h * tokens if p == 4 else 0)  # the fp32 input is the saved one
        layers = waiting + recompute + workspace
    else:
        saved = L * per_layer + rope
        layers = waiting + workspace
    saved += held
    transient = max(final + loss, final + cast_back, layers)
    step = p * N // world_size  # foreach AdamW: sqrt(exp_avg_sq) as a new list
    peak = weights + adamw + max(grads + autocast + saved + transient, grads + step)
    return Estimate(weights, grads, adamw, autocast, saved, transient, held + loss, step, peak)


@dataclass
class RLEstimate:
    """Bytes per GPU of a train_rl.py step (paper §A.2.3): resident (policy weights + AdamW,
    reference, generation copy), the rollout phase (resident + KV pool + engine step) and the
    training phase (resident + a micro-step's gradients and activations); kv_tokens: what the
    pool holds; rollouts_per_rank: P x G / N; full_traces_at_once: how many max-length traces
    with a full cache the pool holds together (memento traces peak lower: more)."""

    policy: int
    reference: int
    generation_copy: int
    kv_pool: int
    engine_step: int
    training_step: int
    rollouts: int
    training: int
    peak: int
    kv_tokens: int
    rollouts_per_rank: int
    full_traces_at_once: int


def rl_estimate(cfg, *, world_size: int = 8, fsdp: bool = True, seq_len: int = 32768, micro_batch_size: int = 1,
                prompts_per_step: int = 240, group_size: int = 8, kv_cache_gib: float | None = None,
                device_bytes: int = 80 * 10**9, gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256,
                max_num_batched_tokens: int = 2048) -> RLEstimate:
    """Memory per GPU of one RL step on CUDA (bf16 autocast over fp32 master weights, AdamW,
    gradient checkpointing, the chunked loss; module docstring).

    Args:
        cfg: a model.Qwen3Config. world_size: processes (GPUs). fsdp: --fsdp (else DDP: every
            GPU holds everything). seq_len: prompt + --max-new-tokens, the longest rollout.
        micro_batch_size: rollouts per training forward. prompts_per_step, group_size: P, G.
        kv_cache_gib: the rollout pool in GiB (None: the engine's default on CUDA, from
            gpu_memory_utilization of device_bytes). max_num_seqs, max_num_batched_tokens: the
            engine's (train_rl.py: 256, 2048).
    Returns:
        RLEstimate, in bytes (tokens and counts where named so).
    Raises:
        ValueError for a non-positive size, or a default pool with no room left.
    Paper §A.2.3.
    """
    if min(world_size, seq_len, micro_batch_size, prompts_per_step, group_size, max_num_seqs, max_num_batched_tokens) < 1:
        raise ValueError("rl_estimate: sizes must be >= 1")
    N, _ = param_counts(cfg)
    shards = world_size if fsdp else 1
    train = estimate(cfg, batch_size=micro_batch_size, seq_len=seq_len, world_size=shards)
    policy = train.weights + train.adamw
    reference = 2 * N // shards
    gen = 2 * N if fsdp else 0
    resident = policy + reference + gen
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    engine_step = (2 * (q + 2 * kv + 3 * cfg.intermediate_size + 2 * cfg.hidden_size) * max_num_batched_tokens
                   + 4 * cfg.vocab_size * max_num_seqs)
    per_token = 2 * cfg.num_hidden_layers * kv * 2  # bf16 K and V (kv_cache.kv_bytes_per_token)
    if kv_cache_gib is None:
        pool = int(gpu_memory_utilization * device_bytes) - resident - engine_step
        if pool < per_token * 16:
            raise ValueError(f"rl_estimate: no room for a KV pool at gpu_memory_utilization={gpu_memory_utilization} "
                             f"({resident / GIB:.1f} GiB resident of {device_bytes / GIB:.1f} GiB)")
    else:
        pool = int(kv_cache_gib * GIB)
    rollouts = resident + pool + engine_step
    training = resident + (train.peak - policy)
    return RLEstimate(policy, reference, gen, pool, engine_step, train.peak - policy, rollouts, training,
                      max(rollouts, training), pool // per_token, prompts_per_step * group_size // world_size,
                      pool // (per_token * seq_len))


@dataclass
class ServeEstimate:
    """Bytes per GPU of a serving engine (eval.py, generate.py, serve.py; paper §6.1) whose model
    is split over tensor_parallel_size GPUs: weights (each rank's share of the layers' sharded
    projections, the embedding, lm_head and norms whole), engine_step (the activations of the
    largest step: max_num_batched_tokens through one layer's projections at a time, and the
    LM head's fp32 logits for max_num_seqs rows), graphs (CUDA graphs' memory: the decode
    buckets' activations, none under tensor parallelism, where graphs are off), kv_pool (what
    gpu_memory_utilization leaves, or kv_cache_gib) and kv_tokens (the pool in tokens: each
    rank holds its share of the KV heads for every token); full_traces_at_once: max-length
    full-cache traces the pool holds together (memento traces peak lower)."""

    weights: int
    engine_step: int
    graphs: int
    kv_pool: int
    kv_tokens: int
    full_traces_at_once: int
    peak: int


def serve_estimate(cfg, *, tensor_parallel_size: int = 1, seq_len: int = 32768, kv_cache_gib: float | None = None,
                   device_bytes: int = 80 * 10**9, gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256,
                   max_num_batched_tokens: int = 2048, cuda_graphs: bool | None = None) -> ServeEstimate:
    """Memory per GPU of serving a bf16 model with the engine (paper §6.1; module docstring).

    Args:
        cfg: a model.Qwen3Config. tensor_parallel_size: K, GPUs one model spans (must divide
            the KV heads). seq_len: prompt + new tokens of the longest request. kv_cache_gib:
            the pool per GPU (None: the engine's default, gpu_memory_utilization of
            device_bytes less weights and activations). max_num_seqs, max_num_batched_tokens:
            the engine's. cuda_graphs: None = on unless K > 1.
    Returns:
        ServeEstimate, bytes (tokens and counts where named so).
    Raises:
        ValueError for a non-positive size, K not dividing the KV heads, or no room for a pool.
    """
    K = tensor_parallel_size
    if min(K, seq_len, max_num_seqs, max_num_batched_tokens) < 1:
        raise ValueError("serve_estimate: sizes must be >= 1")
    if cfg.num_key_value_heads % K:
        raise ValueError(f"serve_estimate: --tensor-parallel-size {K} must divide the {cfg.num_key_value_heads} KV heads")
    h, i, d, L = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    sharded = L * ((q + 2 * kv) * h + q * h + 3 * i * h)  # qkv, o, gate-up, down: split K ways
    whole = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + L * (2 * h + 2 * d) + h
    weights = 2 * (sharded // K + whole)
    engine_step = (2 * ((q + 2 * kv + 3 * i) // K + 2 * h) * max_num_batched_tokens + 4 * cfg.vocab_size * max_num_seqs)
    graphs = (K == 1) if cuda_graphs is None else cuda_graphs
    graph_bytes = 2 * ((q + 2 * kv + 3 * i) // K + 2 * h) * max_num_seqs + 4 * cfg.vocab_size * max_num_seqs if graphs else 0
    per_token = 2 * L * (kv // K) * 2  # bf16 K and V of this rank's KV heads (kv_cache.kv_bytes_per_token)
    if kv_cache_gib is None:
        pool = int(gpu_memory_utilization * device_bytes) - weights - engine_step - graph_bytes
        if pool < per_token * 16:
            raise ValueError(f"serve_estimate: no room for a KV pool: {weights / GIB:.1f} GiB of weights per GPU of "
                             f"{device_bytes / GIB:.1f} GiB at gpu_memory_utilization={gpu_memory_utilization}")
    else:
        pool = int(kv_cache_gib * GIB)
    return ServeEstimate(weights, engine_step, graph_bytes, pool, pool // per_token, pool // (per_token * seq_len),
                         weights + engine_step + graph_bytes + pool)


def measure_peak(fn, device: str = "cpu") -> tuple[int, int]:
    """(peak, final) bytes allocated by torch while fn() runs, above what was allocated before.

    CPU: the running sum of the allocation events torch's profiler records. CUDA: the caching
    allocator's own counters (torch.cuda.max_memory_allocated), which round small blocks up
    to 512 bytes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, cur


def _gib(x: int) -> str:
    return f"{x / GIB:,.1f}"


def table(models=("Qwen3-0.6B", "Qwen3-8B"), seq_lens=(8192, 32768), world_sizes=(1,)) -> str:
    """The README's Markdown table: GiB per GPU, checkpointing on, batch 1, before/after chunked loss."""
    lines = ["| model | tokens | ranks | weights + grads + AdamW | autocast copies | saved activations | backward transient "
             "| loss logits, chunked / plain | peak, chunked loss | peak, plain loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        cfg = builtin_config(m)
        for T in seq_lens:
            for ws in world_sizes:
                e = estimate(cfg, seq_len=T, world_size=ws)
                plain = estimate(cfg, seq_len=T, world_size=ws, chunked_loss=False)
                lines.append(f"| {m} | {T:,} | {ws} | {_gib(e.weights + e.grads + e.adamw)} | {_gib(e.autocast)} | "
                             f"{_gib(e.saved)} | {_gib(e.transient)} | {_gib(e.logits)} / {_gib(plain.logits)} | "
                             f"**{_gib(e.peak)}** | {_gib(plain.peak)} |")
    return "\n".join(lines)


def main(argv=None):
    ap = ArgumentParser(prog="bench/memory.py", description=__doc__)
    ap.add_argument("--model", default="Qwen3-8B", help=f"built-in shape ({', '.join(SHAPES)}), checkpoint dir or hub id")
    ap.add_argument("--max-seq-len", type=positive_int, default=32768, help="tokens per example")
    ap.add_argument("--batch-size", type=positive_int, default=1, help="examples per micro-step")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="keep only each layer's input")
    ap.add_argument("--loss-chunk-rows", type=positive_int, default=1024, help="rows of logits per loss chunk")
    ap.add_argument("--world-size", type=positive_int, default=1, help="N-way FSDP sharding: memory per rank")
    ap.add_argument("--bf16-model", action="store_true", help="bf16 parameters and optimizer states, no autocast")
    ap.add_argument("--table", action="store_true", help="print the README table and exit")
    ap.add_argument("--check", action="store_true", help="measure small training steps (CUDA if present) against the formula")
    ap.add_argument("--check-tokens", type=positive_int, default=256, help="tokens per --check step (the CPU interpreter is slow)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the listing")
    sv = ap.add_argument_group("--serve: a serving engine per GPU (eval.py, generate.py, serve.py)")
    sv.add_argument("--serve", action="store_true", help="estimate a serving engine per GPU (bf16 weights)")
    sv.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="GPUs one model spans")
    rl = ap.add_argument_group("--rl: an RL step of train_rl.py per GPU (--max-seq-len: the longest rollout)")
    rl.add_argument("--rl", action="store_true", help="estimate an RL step instead of an SFT micro-step")
    rl.add_argument("--no-fsdp", dest="fsdp", action="store_false", help="DDP: every GPU holds everything")
    rl.add_argument("--micro-batch-size", type=positive_int, default=1, help="rollouts per training forward")
    rl.add_argument("--prompts-per-step", type=positive_int, default=240, help="P (paper: 240)")
    rl.add_argument("--group-size", type=positive_int, default=8, help="G (paper: 8)")
    rl.add_argument("--kv-cache-gib", type=float, default=None, help="rollout KV pool (default: the engine's on CUDA)")
    rl.add_argument("--gpu-gb", type=float, default=80.0, help="device memory in GB (10^9 bytes), as vendors state it")
    rl.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="the engine's share of the device")
    args = ap.parse_args(argv)
    if args.serve:
        cfg = load_config(args.model)
        try:
            e = serve_estimate(cfg, tensor_parallel_size=args.tensor_parallel_size, seq_len=args.max_seq_len,
                               kv_cache_gib=args.kv_cache_gib, device_bytes=int(args.gpu_gb * 10**9),
                               gpu_memory_utilization=args.gpu_memory_utilization)
        except ValueError as err:
            sys.exit(f"bench/memory.py: {err}")
        if args.json:
            print(json.dumps({"model": args.model, **asdict(e)}))
            return
        device = args.gpu_gb * 10**9
        print(f"{args.model} served in bf16 over {args.tensor_parallel_size} GPU(s) of {args.gpu_gb:g} GB (tensor "
              f"parallel), requests up to {args.max_seq_len:,} tokens; GiB per GPU:")
        for k in ("weights", "engine_step", "graphs", "kv_pool"):
            print(f"  {k:<12} {getattr(e, k) / GIB:10.2f}")
        print(f"  KV pool: {e.kv_tokens:,} tokens (each GPU holds its share of the KV heads for every token); "
              f"{e.full_traces_at_once} full-cache {args.max_seq_len:,}-token requests at once")
        print(f"  fits: {'yes' if e.peak <= device and e.full_traces_at_once >= 1 else 'NO'} "
              f"({e.peak / GIB:.1f} of {device / GIB:.1f} GiB)")
        return
    if args.rl:
        cfg = load_config(args.model)
        try:
            e = rl_estimate(cfg, world_size=args.world_size, fsdp=args.fsdp, seq_len=args.max_seq_len,
                            micro_batch_size=args.micro_batch_size, prompts_per_step=args.prompts_per_step,
                            group_size=args.group_size, kv_cache_gib=args.kv_cache_gib,
                            device_bytes=int(args.gpu_gb * 10**9), gpu_memory_utilization=args.gpu_memory_utilization)
        except ValueError as err:
            sys.exit(f"bench/memory.py: {err}")
        if args.json:
            print(json.dumps({"model": args.model, **asdict(e)}))
            return
        device = args.gpu_gb * 10**9
        print(f"{args.model} RL step on {args.world_size} GPU(s) of {args.gpu_gb:g} GB "
              f"({'FSDP2' if args.fsdp else 'DDP'}), rollouts up to {args.max_seq_len:,} tokens, micro-batch "
              f"{args.micro_batch_size}; GiB per GPU:")
        for k in ("policy", "reference", "generation_copy", "kv_pool", "engine_step", "training_step", "rollouts",
                  "training", "peak"):
            print(f"  {k:<16} {getattr(e, k) / GIB:10.2f}")
        print(f"  KV pool: {e.kv_tokens:,} tokens; {e.rollouts_per_rank} rollouts per GPU per step, "
              f"{e.full_traces_at_once} full-cache {args.max_seq_len:,}-token traces at once")
        print(f"  fits: {'yes' if e.peak <= device else 'NO'} ({e.peak / GIB:.1f} of {device / GIB:.1f} GiB)")
        return
    if args.table:
        print(table())
        print()
        print(table(models=("Qwen3-8B", "Qwen3-32B"), seq_lens=(32768,), world_sizes=(8, 32)))
        return
    if args.check:
        print("\n".join(_check_rows(check(seq_len=args.check_tokens))))
        return
    cfg = load_config(args.model)
    pb = 2 if args.bf16_model else 4
    try:
        e = estimate(cfg, batch_size=args.batch_size, seq_len=args.max_seq_len, gradient_checkpointing=args.gradient_checkpointing,
                     loss_chunk_rows=args.loss_chunk_rows, param_bytes=pb, compute_bytes=2, world_size=args.world_size)
        plain = estimate(cfg, batch_size=args.batch_size, seq_len=args.max_seq_len, chunked_loss=False,
                         gradient_checkpointing=args.gradient_checkpointing, param_bytes=pb, compute_bytes=2,
                         world_size=args.world_size)
    except ValueError as err:
        sys.exit(f"bench/memory.py: {err}")
    n, _ = param_counts(cfg)
    if args.json:
        print(json.dumps({"model": args.model, "params": n, **asdict(e), "peak_plain_loss": plain.peak}))
        return
    print(f"{args.model}: {n:,} parameters, {args.batch_size} x {args.max_seq_len:,} tokens per micro-step, "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.world_size} rank(s); GiB per GPU:")
    for k, v in asdict(e).items():
        print(f"  {k:<12} {v / GIB:10.2f}")
    print(f"  peak with plain (unchunked) cross-entropy: {plain.peak / GIB:.2f}")


CHECKS = [  # (checkpointing, loss_chunk_rows or None for the plain loss, precision, tied embeddings, vocab)
    (True, 64, "autocast", False, 1024), (False, 64, "autocast", False, 1024), (True, None, "autocast", False, 1024),
    (False, None, "autocast", False, 1024), (True, 64, "autocast", True, 272), (True, 64, "bf16", True, 1024),
    (False, 64, "fp32", True, 1024),
]


def check(checks=CHECKS, seq_len: int = 256, device: str | None = None) -> list[dict]:
    """Measure training micro-steps of a small model and set them beside the formula.

    Each run: bf16 autocast over fp32 weights, a bf16 model, or fp32; the Triton kernel (on
    the CPU under TRITON_INTERPRET=1); grads already present (as in every micro-step after
    the first). The measured figure is what torch holds above weights, grads and AdamW states
    at the step's peak (see measure_peak); the formula's is autocast + saved + transient.
    Returns one dict per run: the settings, measured and formula bytes.
    Raises ValueError (from the kernel) on a CPU whose triton was imported without the
    interpreter."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # only matters if triton is not imported yet
    previous = os.environ.get("MEMENTO_ATTN_BACKEND")
    os.environ["MEMENTO_ATTN_BACKEND"] = "triton"  # the formula models the kernel's memory
    try:
        return [_measure(case, seq_len, device) for case in checks]
    finally:
        if previous is None:
            os.environ.pop("MEMENTO_ATTN_BACKEND")
        else:
            os.environ["MEMENTO_ATTN_BACKEND"] = previous


def _measure(case, seq_len: int, device: str) -> dict:
    ckpt, chunk, precision, tied, vocab = case
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)
    model = Qwen3(cfg).init_weights(seed=0).train().to(device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.gradient_checkpointing, model.loss_chunk_rows = ckpt, chunk or seq_len
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)

    def micro_step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "autocast"):
            if chunk is None:  # plain cross-entropy over the full fp32 logits
                logits = model(ids)
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
            else:
                loss = model(ids, labels=ids)
            loss.sum().backward()

    micro_step()  # grads exist from here on
    measured, _ = measure_peak(micro_step, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)  # CUDA's default implementation
    opt.step()  # the states exist from here on

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    measured_step, _ = measure_peak(optimizer_step, device)
    p = 2 if precision == "bf16" else 4
    e = estimate(cfg, batch_size=1, seq_len=seq_len, gradient_checkpointing=ckpt, loss_chunk_rows=chunk or seq_len,
                 chunked_loss=chunk is not None, param_bytes=p, compute_bytes=2 if precision != "fp32" else 4)
    return dict(checkpointing=ckpt, loss="plain" if chunk is None else f"chunks of {chunk}", precision=precision,
                tied=tied, vocab=vocab, tokens=seq_len, measured=measured, formula=e.autocast + e.saved + e.transient,
                measured_step=measured_step, formula_step=e.step)


def _check_rows(rows) -> list[str]:
    return [f"checkpointing {r['checkpointing']!s:5}  loss {r['loss']:12}  {r['precision']:8}  tied {r['tied']!s:5}  "
            f"vocab {r['vocab']:5}  micro-step: measured {r['measured'] / 2**20:5.2f} MiB, formula {r['formula'] / 2**20:5.2f} MiB "
            f"({r['formula'] / r['measured'] - 1:+.1%});  optimizer step: measured {r['measured_step'] / 2**20:5.2f} MiB, "
            f"formula {r['formula_step'] / 2**20:5.2f} MiB" for r in rows]


if __name__ == "__main__":
    main()
