"""A Qwen3 decoder written from scratch, loading and saving Hugging Face safetensors checkpoints.

Read top to bottom: config, the building blocks (RMSNorm, RoPE), one layer as two functions
around attention (attention_in: norm, fused QKV projection, q/k norms, RoPE; attention_out_mlp:
output projection, norm, fused gate-up SwiGLU), the modules that hold the weights, Hugging
Face's tensor names (checkpoints keep them; the projections are fused in memory), the
next-token loss computed in chunks of rows (so 32K-token training never holds [tokens, vocab]
logits), and from_pretrained / save_pretrained (the HF file handling and the memento tokens'
setup, paper §A.2.1, live in checkpoint.py). All attention goes through
`memento_attention.attention` or the KV cache, so the same model runs plain causal attention
(stage 1), memento attention over a whole sequence (stage 2, prefill) and decoding against a
compacting KV cache (kv_cache.py). The serving engine runs the two functions compiled
(compiled_ops); training runs them as written.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import atomic_dir, load_model, write_model
from memento_attention import attention, prepare_mask

# ----------------------------------------------------------------------------- config


# The released dense Qwen3 shapes (config.json of each hub checkpoint): for memory estimates
# and for reading a toy model's KV figures at a real model's size.
QWEN3_SHAPES = {
    "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=False),
    "Qwen3-32B": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8, tie_word_embeddings=False),
}


@dataclass
class Qwen3Config:
    """Hyperparameters of a Qwen3 decoder, with Hugging Face's `config.json` field names.

    `head_dim` is the per-head width (Qwen3 decouples it from hidden_size / heads);
    `rope_theta` is the RoPE base. Only the default (unscaled) RoPE is implemented.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict, repr=False)  # unknown fields, written back on save

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Qwen3Config":
        """Build a config from an HF config dict.

        rope_theta is read top-level (Qwen3 hub checkpoints) or from `rope_parameters`
        (recent transformers). Raises ValueError naming the missing field, a non-Qwen3
        model_type, or a RoPE scaling type this model does not implement.
        """
        if d.get("model_type", "qwen3") != "qwen3":
            raise ValueError(f"{source}: model_type is {d['model_type']!r}, expected 'qwen3'")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}; is this a Qwen3 config.json?")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: RoPE type {rope_type!r} is not implemented (only 'default')")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "extra"}
        kw.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        if "rope_theta" not in d and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if "dtype" in d and "torch_dtype" not in d and isinstance(d["dtype"], str):
            kw["torch_dtype"] = d["dtype"]
        known = {f.name for f in fields(cls)} | {"model_type", "architectures", "rope_parameters", "dtype"}
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        return cls(**kw)

    @classmethod
    def released(cls, name: str) -> "Qwen3Config":
        """The config of a released dense Qwen3 ("Qwen3-0.6B" ... "Qwen3-32B", QWEN3_SHAPES):
        head_dim 128, vocab 151,936, bf16. Raises ValueError naming the known shapes."""
        if name not in QWEN3_SHAPES:
            raise ValueError(f"unknown Qwen3 shape {name!r}; known: {', '.join(QWEN3_SHAPES)}")
        return cls(vocab_size=151936, head_dim=128, max_position_embeddings=40960, torch_dtype="bfloat16",
                   **QWEN3_SHAPES[name])

    def to_dict(self) -> dict:
        """The HF `config.json` dict (both rope_theta spellings, so old and new readers agree)."""
        d = asdict(self)
        extra = d.pop("extra")
        d = {**extra, **d, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d["dtype"] = self.torch_dtype
        return d


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32: x / rms(x) * weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., n], in fp32, then weight [n] (HF Qwen3's order:
    normalise in fp32, cast back, multiply)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """RoPE rotation tables at explicit logical positions.

    positions: [B, T] int. Returns cos, sin: [B, T, 1, head_dim] in `dtype` (they broadcast
    over the heads of a [B, T, H, head_dim] tensor). Positions are logical (index in the full
    sequence), never cache slots: after compaction the next token keeps the position it had
    in training (§6.1).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., D] by tables that broadcast against it (rope_cos_sin's [B, T, 1, D] for
    [B, T, H, D]); the half-split layout, as in Qwen."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------- one layer, in two pieces
#
# A layer is attention_in, then attention (the one part that reads the KV cache or the memento
# mask), then attention_out_mlp. The two pieces take the layer's weights as arguments, so that
# one torch.compile of each serves every layer (the engine compiles them: RMSNorm, RoPE,
# SiLU x up and the residual adds become a few fused kernels around the matmuls). The MLP's
# residual add is left to the next layer's attention_in (or the final norm), where it fuses
# with the RMSNorm that reads it.
#
# Projections are fused: qkv_proj [(Hq + 2 Hkv) * D, hidden] holds, for each KV head g, the
# rows of its `group` query heads, then its key head, then its value head; gate_up_proj
# [2 * intermediate, hidden] interleaves gate row i and up row i. Both layouts keep what a
# tensor-parallel rank needs in one contiguous slice of rows (whole GQA groups; matching gate
# and up rows). Checkpoints keep Hugging Face's separate tensors (to_hf / from_hf below).


def attention_in(x: torch.Tensor, delta: torch.Tensor | None, ln_w: torch.Tensor, qkv_w: torch.Tensor,
                 qkv_b: torch.Tensor | None, qn_w: torch.Tensor, kn_w: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, eps: float, kv_heads: int, group: int):
    """The residual add of the previous layer, the input RMSNorm, the fused QKV projection, the
    per-head q/k RMSNorms and RoPE (Qwen3; paper §4 trains and §6.1 decodes this model).

    x: [B, T, hidden] residual stream; delta: the previous layer's MLP output (same shape) or
    None for the first layer; weights as in the modules; cos, sin: [B, T, 1, D] (rope_cos_sin).
    Returns (x + delta, q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]), q and k rotated.
    """
    if delta is not None:
        x = x + delta
    B, T, _ = x.shape
    qkv = F.linear(rms_norm(x, ln_w, eps), qkv_w, qkv_b).view(B, T, kv_heads, group + 2, -1)
    # q, k, v are views of qkv (no copy): the norms and RoPE read them where they are
    q = apply_rope(rms_norm(qkv[:, :, :, :group], qn_w, eps), cos[:, :, :, None], sin[:, :, :, None])
    k = apply_rope(rms_norm(qkv[:, :, :, group], kn_w, eps), cos, sin)
    return x, q.reshape(B, T, kv_heads * group, -1).transpose(1, 2), k.transpose(1, 2), qkv[:, :, :, group + 1].transpose(1, 2)


def attention_out_mlp(x: torch.Tensor, y: torch.Tensor, o_w: torch.Tensor, o_b: torch.Tensor | None,
                      ln_w: torch.Tensor, gate_up_w: torch.Tensor, down_w: torch.Tensor, eps: float, reduce=None):
    """The output projection and its residual add, the post-attention RMSNorm and the SwiGLU
    MLP, down(silu(gate) * up) (Qwen3; paper §4, §6.1).

    x: [B, T, hidden]; y: [B, Hq, T, D] the attention output. reduce: None, or (tensor
    parallelism) the sum over the ranks of a row-parallel projection's partial output
    (sharding.tensor_parallel). Returns (x + o_proj(y), the MLP's output [B, T, hidden]): the
    MLP's residual add is the next attention_in's (or final_norm's).
    """
    B, T, _ = x.shape
    o = F.linear(y.transpose(1, 2).reshape(B, T, -1), o_w, o_b if reduce is None else None)
    if reduce is not None:  # each rank holds some heads' share of o_proj: sum, then the bias once
        o = reduce(o) if o_b is None else reduce(o) + o_b
    x = x + o
    gu = F.linear(rms_norm(x, ln_w, eps), gate_up_w).view(B, T, -1, 2)
    out = F.linear(F.silu(gu[..., 0]) * gu[..., 1], down_w)
    return x, out if reduce is None else reduce(out)


def final_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The last layer's residual add and the final RMSNorm: [B, T, hidden] -> [B, T, hidden]."""
    return rms_norm(x if delta is None else x + delta, weight, eps)


@dataclass(frozen=True)
class LayerOps:
    """The functions a forward runs around attention: the plain ones (EAGER_OPS), or their
    torch.compile'd versions (compiled_ops; the engine's decode and prefill forwards), and
    `reduce`: None, or under tensor parallelism the all-reduce of a row-parallel projection's
    output (sharding.tensor_parallel)."""

    attention_in: object = attention_in
    attention_out_mlp: object = attention_out_mlp
    final_norm: object = final_norm
    rope_cos_sin: object = rope_cos_sin
    reduce: object = None


EAGER_OPS = LayerOps()


@functools.lru_cache(maxsize=None)
def compiled_ops(**compile_kwargs) -> LayerOps:
    """LayerOps compiled with torch.compile (inductor), dynamic in batch and length, so that one
    compilation serves every layer and every batch size (paper §6.1 serving: decode is bound by
    kernel launches; fused, each piece is a few kernels). compile_kwargs go to torch.compile
    (default dynamic=True). Compilation happens at the first call of each shape class; the
    same LayerOps is returned for the same arguments, so engines of one process share it."""
    kw = {"dynamic": True, **compile_kwargs}
    return LayerOps(*(torch.compile(f, **kw) for f in (attention_in, attention_out_mlp, final_norm, rope_cos_sin)))


def with_reduce(ops: LayerOps, reduce) -> LayerOps:
    """ops whose row-parallel projections sum over tensor-parallel ranks with `reduce`."""
    return dataclasses.replace(ops, reduce=reduce)


class SwiGLU(nn.Module):
    """The Qwen MLP, down(silu(gate(x)) * up(x)), with gate and up fused into gate_up_proj
    (rows interleaved: gate row i, then up row i)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k (Qwen3), RoPE after the norm;
    q, k and v from one fused projection (layout above)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.kv_heads, self.group = hkv, hq // hkv
        self.qkv_proj = nn.Linear(cfg.hidden_size, (hq + 2 * hkv) * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=cfg.attention_bias)  # as HF's Qwen3
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)); the second residual
    add is carried to the next layer as `delta` (see attention_in)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, delta, cos, sin, positions, mask_from, layer_cache=None, ops: LayerOps = EAGER_OPS):
        """(x, delta) -> (x, delta) of the next layer; see attention_in / attention_out_mlp."""
        a, m, eps = self.self_attn, self.mlp, self.input_layernorm.eps
        x, q, k, v = ops.attention_in(x, delta, self.input_layernorm.weight, a.qkv_proj.weight, a.qkv_proj.bias,
                                      a.q_norm.weight, a.k_norm.weight, cos, sin, eps, a.kv_heads, a.group)
        if layer_cache is None:
            # Whole sequence: mask_from is indexed by position in this sequence.
            y = attention(q, k, v, mask_from)
        else:
            # Against the cache: it stores k, v and attends over every token each row holds,
            # under the same rule in logical positions (kv_cache.py picks how it reads them).
            y = layer_cache.attend(q, k, v, positions)
        return ops.attention_out_mlp(x, y, a.o_proj.weight, a.o_proj.bias, self.post_attention_layernorm.weight,
                                     m.gate_up_proj.weight, m.down_proj.weight, eps, ops.reduce)


class Backbone(nn.Module):
    """Embeddings, layers and final norm; named `model` inside Qwen3 to match HF tensor names."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------- the loss

IGNORE_INDEX = -100  # labels with this value carry no loss (F.cross_entropy's default)


def token_cross_entropy(lm_head, h: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Next-token cross-entropy of every position, without holding all logits (§4, §A.2.1).

    Position t of row b predicts labels[b, t + 1]. The [B*T, hidden] states are cut into
    chunks of `chunk_rows` rows; each chunk's logits (in fp32 for the softmax) live only
    inside that chunk's step: with autograd on, each chunk runs under activation
    checkpointing, so its backward recomputes the chunk's logits instead of keeping them.
    Peak logits memory is therefore O(chunk_rows * vocab) instead of O(B * T * vocab), and
    the losses and gradients equal those of the plain F.cross_entropy on full logits.

    Args:
        lm_head: the output projection (hidden -> vocab): an nn.Linear or any callable
            [rows, hidden] -> [rows, vocab] (Qwen3.logits, which may run it in fp32).
        h: [B, T, hidden] final hidden states (any float dtype; autocast applies to lm_head).
        labels: [B, T] int64 target ids, IGNORE_INDEX where no loss is wanted.
        chunk_rows: rows of logits per chunk (>= 1).
    Returns:
        [B, T - 1] float32 per-token losses, 0 where labels[:, 1:] is IGNORE_INDEX.
    Raises:
        ValueError if labels is not [B, T] for h [B, T, hidden], or chunk_rows < 1.
    """
    B, T = h.shape[:2]
    if tuple(labels.shape) != (B, T):
        raise ValueError(f"token_cross_entropy: labels must be [B, T] = [{B}, {T}], got {tuple(labels.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"token_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    # Shift by padding the targets instead of slicing h: h.flatten stays a view, and the last
    # position of every row (nothing to predict) gets the ignored label.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    rows = h.flatten(0, 1)
    checkpointed = torch.is_grad_enabled() and rows.requires_grad
    losses = []
    for i in range(0, B * T, chunk_rows):
        args = (lm_head, rows[i:i + chunk_rows], targets[i:i + chunk_rows])
        losses.append(torch.utils.checkpoint.checkpoint(_chunk_cross_entropy, *args, use_reentrant=False)
                      if checkpointed else _chunk_cross_entropy(*args))
    # a copy, not a view: FSDP2 hooks the root forward's output, and a view could lose the hook
    return torch.cat(losses).view(B, T)[:, :-1].clone()


def _chunk_cross_entropy(lm_head, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(rows).float(), targets, reduction="none", ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------- Hugging Face's tensor names


def to_hf(state: dict, cfg: Qwen3Config) -> dict:
    """Our state dict (fused qkv_proj, gate_up_proj) in Hugging Face's names and layout (q_proj,
    k_proj, v_proj, gate_proj, up_proj apart), in HF's module order; other tensors as they are.
    Values are views of ours (no copy). What checkpoints hold on disk."""
    hkv, d = cfg.num_key_value_heads, cfg.head_dim
    group = cfg.num_attention_heads // hkv
    out = {}
    for name, t in state.items():
        prefix, _, kind = name.rpartition(".")
        if prefix.endswith("self_attn.qkv_proj"):
            base = prefix.removesuffix("qkv_proj")
            parts = t.view(hkv, group + 2, d, *t.shape[1:])
            for i, piece in enumerate(("q_proj", "k_proj", "v_proj")):
                sl = parts[:, :group] if i == 0 else parts[:, group + i - 1:group + i]
                out[f"{base}{piece}.{kind}"] = sl.reshape(-1, *t.shape[1:])
        elif prefix.endswith("mlp.gate_up_proj"):
            base = prefix.removesuffix("gate_up_proj")
            pairs = t.view(-1, 2, *t.shape[1:])
            out[f"{base}gate_proj.{kind}"], out[f"{base}up_proj.{kind}"] = pairs[:, 0], pairs[:, 1]
        else:
            out[name] = t
    return out


def from_hf(state: dict, cfg: Qwen3Config, source: str = "checkpoint") -> dict:
    """Hugging Face's tensors fused into ours (the inverse of to_hf): q/k/v into qkv_proj (per
    KV head: its query heads, its key head, its value head) and gate/up into gate_up_proj
    (interleaved rows). Raises ValueError naming the Hugging Face tensor that is missing or
    has a shape other than the config's."""
    hq, hkv, d, hid = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    group, inter = hq // hkv, cfg.intermediate_size
    out, taken = {}, set()

    def get(name, shape):
        if name not in state:
            raise ValueError(f"{source}: checkpoint is missing tensor {name!r}")
        t = state[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shape}")
        taken.add(name)
        return t

    for i in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        kinds = ("weight", "bias") if cfg.attention_bias else ("weight",)
        for kind in kinds:
            tail = (hid,) if kind == "weight" else ()
            q = get(f"{a}q_proj.{kind}", (hq * d, *tail)).reshape(hkv, group, d, *tail)
            k = get(f"{a}k_proj.{kind}", (hkv * d, *tail)).reshape(hkv, 1, d, *tail)
            v = get(f"{a}v_proj.{kind}", (hkv * d, *tail)).reshape(hkv, 1, d, *tail)
            out[f"{a}qkv_proj.{kind}"] = torch.cat([q, k, v], 1).reshape(-1, *tail)
        gate, up = get(f"{m}gate_proj.weight", (inter, hid)), get(f"{m}up_proj.weight", (inter, hid))
        out[f"{m}gate_up_proj.weight"] = torch.stack([gate, up], 1).reshape(2 * inter, hid)
    out.update({k: v for k, v in state.items() if k not in taken})
    return out


# ----------------------------------------------------------------------------- the model


class Qwen3(nn.Module):
    """Qwen3 causal LM (paper §4 trains it; §6.1 decodes it with a compacting cache).

    Call `model(input_ids)` for plain causal logits. See `forward` for positions, memento
    masks and KV caches. Tensor names match HF `Qwen3ForCausalLM`.
    """

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.loss_chunk_rows = 1024  # rows of logits alive at once in forward(labels=...)
        # The LM head in fp32 even under autocast (MiniMax-M1's fix for RL): the sampler's and the
        # trainer's log-probs then agree although their bf16 matmuls would round differently.
        self.fp32_lm_head = False

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "Qwen3":
        """Random init for training from scratch: N(0, std) linears/embeddings, ones for norms,
        zero biases. Drawn tensor by tensor in Hugging Face's layout (q, k, v, gate, up apart),
        so a seed gives the same model as before the projections were fused."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        shapes = to_hf({n: p for n, p in self.named_parameters()}, self.config)  # tied: lm_head once
        with torch.no_grad():
            hf = {}
            for name, p in shapes.items():
                if name.endswith("norm.weight"):
                    hf[name] = torch.ones(p.shape)
                elif name.endswith("bias"):
                    hf[name] = torch.zeros(p.shape)
                else:
                    hf[name] = torch.randn(p.shape, generator=g) * std
            for name, value in from_hf(hf, self.config).items():
                self.get_parameter(name).copy_(value)
        return self

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      mask_from: torch.Tensor | None = None, cache=None, ops: LayerOps = EAGER_OPS) -> torch.Tensor:
        """The decoder's output before lm_head: [B, T, hidden_size] after the final RMSNorm.

        Arguments and errors as in `forward`; ops: the functions around attention (EAGER_OPS,
        or compiled_ops() as the engine runs them). The dtype is the residual stream's (the
        parameters' dtype; fp32 under autocast of an fp32 model).
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Qwen3.forward: input_ids must be a [B, T] integer tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("Qwen3.forward: pass explicit positions when decoding with a cache")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        # Checked here unless the cache's caller planned the step on the host (a serving
        # engine checks positions when a request arrives): reading a device tensor back
        # would stall every decode step.
        if (cache is None or cache.query_lens is None) and int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"Qwen3.forward: position {int(positions.max())} >= max_position_embeddings "
                             f"({self.config.max_position_embeddings}); shorten the input")
        if cache is not None:  # slots, positions and masks of the new tokens, once for all layers
            cache.append(positions, mask_from)
        if cache is None:  # once for all layers (the triton backend's tile lists)
            mask_from = prepare_mask(mask_from, (B, T), input_ids.device)
        x, delta = self.model.embed_tokens(input_ids), None
        cos, sin = ops.rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        # Compiled, the MLP's residual add rides into the next layer's fused RMSNorm; eager, it
        # happens at once, so that a checkpointed layer keeps one tensor (x) for its backward.
        carry = ops is not EAGER_OPS
        for i, layer in enumerate(self.model.layers):
            lc = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training and lc is None:
                x, delta = torch.utils.checkpoint.checkpoint(layer, x, delta, cos, sin, positions, mask_from,
                                                             use_reentrant=False)
            else:
                x, delta = layer(x, delta, cos, sin, positions, mask_from, lc, ops)
            if not carry:
                x, delta = x + delta, None
        return ops.final_norm(x, delta, self.model.norm.weight, self.model.norm.eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask_from: torch.Tensor | None = None, cache=None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every input token, or with `labels` the next-token loss of every token.

        Args:
            input_ids: [B, T] int64 token ids.
            positions: [B, T] int64 logical positions for RoPE (and, with a cache, for the
                visibility rule). Default 0..T-1; required with a cache.
            mask_from: [B, T] int, the memento mask of these tokens (memento_attention.py,
                §4): key j visible to query i iff j <= i < mask_from[j]. Without a cache it
                is indexed by position in this sequence; None = plain causal.
            cache: a kv_cache.CacheBatch (row r = one sequence of a PagedKVCache); the
                tokens are appended to their sequences and attend to everything those hold
                (compaction happens outside the forward). mask_from EMPTY (-1) marks padding.
            labels: [B, T] int64 or None. With labels, returns the cross-entropy of predicting
                labels[:, t + 1] from position t, computed by `token_cross_entropy` in chunks
                of `self.loss_chunk_rows` rows so that [B*T, vocab] logits never exist at once
                (paper §A.2.1 trains at 32K tokens; Qwen3's vocabulary is 151,936).
        Returns:
            [B, T, vocab_size] float32 logits, or with labels [B, T - 1] float32 losses (0 where
            the label is IGNORE_INDEX).
        Raises:
            ValueError if input_ids is not [B, T] int or positions are missing with a cache
            or reach max_position_embeddings.
        """
        h = self.hidden_states(input_ids, positions, mask_from, cache)
        if labels is None:
            return self.logits(h)
        return token_cross_entropy(self.logits, h, labels, self.loss_chunk_rows)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head on hidden states [..., hidden_size] -> [..., vocab_size] float32 logits; with
        `fp32_lm_head`, computed in fp32 outside autocast (paper §A.2.3 RL log-probs)."""
        if not self.fp32_lm_head:
            return self.lm_head(h).float()
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), self.lm_head.weight.float())

    # ------------------------------------------------------------------------- checkpoints (checkpoint.py)

    state_to_hf = staticmethod(to_hf)      # what checkpoint.write_model stores
    state_from_hf = staticmethod(from_hf)  # what checkpoint.load_model reads

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "Qwen3":
        """Load an HF Qwen3 checkpoint from a directory, a training run (its newest complete
        checkpoint) or a hub id (config, weights and tokenizer files fetched); weights cast
        to `dtype`. Raises FileNotFoundError / ValueError naming the problem
        (checkpoint.load_model)."""
        return load_model(cls, Qwen3Config, path_or_hub_id, dtype, device)

    def save_pretrained(self, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        max_shard_bytes: int | None = None) -> None:
        """Write config.json + safetensors in HF layout into `out_dir`, atomically (a temporary
        sibling replaces it; files already there, like a tokenizer, are carried over). dtype:
        default the dtype the weights came in. Raises ValueError for a non-float dtype
        (checkpoint.write_model)."""
        with atomic_dir(Path(out_dir)) as tmp:
            write_model(self, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
