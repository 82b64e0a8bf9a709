"""A Qwen3 decoder written from scratch, loading and saving Hugging Face safetensors checkpoints.

Read top to bottom: config, the three building blocks (RMSNorm, RoPE, SwiGLU), attention with
grouped-query heads and per-head q/k norms, the decoder, the next-token loss computed in chunks
of rows (so 32K-token training never holds [tokens, vocab] logits), then checkpoint I/O and the
memento special tokens (paper §A.2.1). All attention goes through `memento_attention.attention`, so the
same model runs plain causal attention (stage 1), memento attention over a whole sequence
(stage 2, prefill) and decoding against a compacting KV cache (kv_cache.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import atomic_dir, read_safetensors, resolve_checkpoint, write_safetensors
from memento_attention import attention

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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """RoPE rotation tables at explicit logical positions.

    positions: [B, T] int. Returns cos, sin: [B, 1, T, head_dim] in `dtype`. Positions are
    logical (index in the full sequence), never cache slots: after compaction the next token
    keeps the position it had in training (§6.1).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] by the tables of `rope_cos_sin` (half-split layout, as in Qwen)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SwiGLU(nn.Module):
    """The Qwen MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k (Qwen3), RoPE after the norm."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=cfg.attention_bias)  # as HF's Qwen3
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, positions, mask_from, layer_cache):
        B, T, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, -1, d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, d)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer_cache is None:
            # Whole sequence: mask_from is indexed by position in this sequence.
            y = attention(q, k, v, mask_from)
        else:
            # Against the cache: it returns every stored key with its logical position and
            # mask_from, so the same rule applies in logical positions.
            k, v, k_pos, k_mask_from = layer_cache.update(k, v)
            y = attention(q, k, v, k_mask_from, q_pos=positions, k_pos=k_pos)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, positions, mask_from, layer_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask_from, layer_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, layers and final norm; named `model` inside Qwen3 to match HF tensor names."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------- the loss

IGNORE_INDEX = -100  # labels with this value carry no loss (F.cross_entropy's default)


def token_cross_entropy(lm_head: nn.Linear, h: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Next-token cross-entropy of every position, without holding all logits (§4, §A.2.1).

    Position t of row b predicts labels[b, t + 1]. The [B*T, hidden] states are cut into
    chunks of `chunk_rows` rows; each chunk's logits (in fp32 for the softmax) live only
    inside that chunk's step: with autograd on, each chunk runs under activation
    checkpointing, so its backward recomputes the chunk's logits instead of keeping them.
    Peak logits memory is therefore O(chunk_rows * vocab) instead of O(B * T * vocab), and
    the losses and gradients equal those of the plain F.cross_entropy on full logits.

    Args:
        lm_head: the output projection (hidden -> vocab).
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


def _chunk_cross_entropy(lm_head: nn.Linear, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(rows).float(), targets, reduction="none", ignore_index=IGNORE_INDEX)


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

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "Qwen3":
        """Random init for training from scratch: N(0, std) linears/embeddings, ones for norms."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      mask_from: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """The decoder's output before lm_head: [B, T, hidden_size] after the final RMSNorm.

        Arguments and errors as in `forward`. The dtype is the residual stream's (the
        parameters' dtype; fp32 under autocast of an fp32 model).
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Qwen3.forward: input_ids must be a [B, T] integer tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("Qwen3.forward: pass explicit positions when decoding with a cache")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"Qwen3.forward: position {int(positions.max())} >= max_position_embeddings "
                             f"({self.config.max_position_embeddings}); shorten the input")
        if cache is not None:  # slots, positions and masks of the new tokens, once for all layers
            cache.append(positions, mask_from)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            lc = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training and lc is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, positions, mask_from, use_reentrant=False)
            else:
                x = layer(x, cos, sin, positions, mask_from, lc)
        return self.model.norm(x)

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
        return token_cross_entropy(self.lm_head, h, labels, self.loss_chunk_rows)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head on hidden states [..., hidden_size] -> [..., vocab_size] float32 logits."""
        return self.lm_head(h).float()

    # ------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "Qwen3":
        """Load an HF Qwen3 checkpoint (single or sharded safetensors) from a dir or the hub.

        A directory may be a checkpoint or a training run (its newest complete checkpoint is
        read, checkpoint.local_checkpoint). A hub id ("Qwen/Qwen3-0.6B") is fetched with
        huggingface_hub.snapshot_download, config, weights and tokenizer files only. Weights
        are read with safetensors (no pickle) and cast to `dtype`; config.torch_dtype keeps
        the dtype the checkpoint was stored in, which save_pretrained writes back by default.
        Raises FileNotFoundError for an unknown path or id, ValueError for a bad or non-Qwen3
        config, an unreadable weights file, a missing tensor, a tensor of the wrong shape or
        an unexpected tensor.
        """
        path = resolve_checkpoint(path_or_hub_id)
        cfg_file = path / "config.json"
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{cfg_file}: not a config object")
        cfg = Qwen3Config.from_dict(raw, source=str(cfg_file))
        with torch.device("meta"):
            model = cls(cfg)
        state = read_safetensors(path)
        expected = dict(model.state_dict(keep_vars=True))
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
            state.pop("lm_head.weight", None)  # some tied checkpoints store a copy
        for name, p in expected.items():
            if name not in state:
                raise ValueError(f"{path}: checkpoint is missing tensor {name!r}")
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                 f"config.json implies {tuple(p.shape)}")
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise ValueError(f"{path}: unexpected tensor(s) {unexpected[:3]}; is this a Qwen3 checkpoint?")
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(device)

    def save_pretrained(self, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        max_shard_bytes: int | None = None) -> None:
        """Write config.json + safetensors in HF layout into `out_dir`, atomically.

        Files go to a temporary sibling directory which then replaces `out_dir`
        (checkpoint.atomic_dir), so an interrupted save never leaves a half-written checkpoint
        where a good one was; other files already in out_dir (a tokenizer) are carried over.
        See `write_files` for dtype and sharding. Raises ValueError for an unknown dtype.
        """
        with atomic_dir(Path(out_dir)) as tmp:
            self.write_files(tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)

    def write_files(self, out_dir: Path, *, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
                    state: dict | None = None) -> None:
        """Write config.json and the weights into an existing directory (no atomicity here).

        state: the weights to write, by parameter name (default this model's state_dict; a
        sharded training run passes the full state it gathered).

        dtype: the stored dtype; default config.torch_dtype, i.e. the dtype the weights came
        in (a bf16 hub checkpoint trained in fp32 is saved in bf16, a model built here in
        fp32 in fp32). With max_shard_bytes, weights are split into
        model-0000k-of-0000n.safetensors plus model.safetensors.index.json.
        Raises ValueError for a config.torch_dtype or dtype that is not a float dtype.
        """
        if dtype is None:
            dtype = getattr(torch, str(self.config.torch_dtype), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"save: dtype {dtype!r} is not a floating-point torch dtype (config.torch_dtype="
                             f"{self.config.torch_dtype!r}); pass dtype=torch.bfloat16 or torch.float32")
        self.config.torch_dtype = str(dtype).removeprefix("torch.")
        (out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in (state or self.state_dict()).items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        write_safetensors(state, out_dir, max_shard_bytes)

    # ------------------------------------------------------------------------- vocabulary

    def resize_token_embeddings(self, new_vocab: int) -> None:
        """Grow (never shrink) the embedding and an untied lm_head to `new_vocab` rows.

        New rows are zero here; `add_memento_tokens` initializes the ones it uses.
        Raises ValueError when asked to shrink.
        """
        old = self.config.vocab_size
        if new_vocab < old:
            raise ValueError(f"resize_token_embeddings: cannot shrink vocab from {old} to {new_vocab}")
        if new_vocab == old:
            return
        emb = self.model.embed_tokens.weight
        new_emb = nn.Embedding(new_vocab, emb.shape[1], device=emb.device, dtype=emb.dtype)
        with torch.no_grad():
            new_emb.weight.zero_()
            new_emb.weight[:old] = emb
        self.model.embed_tokens = new_emb
        if self.config.tie_word_embeddings:
            self.lm_head.weight = new_emb.weight
        else:
            w = self.lm_head.weight
            head = nn.Linear(w.shape[1], new_vocab, bias=False, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                head.weight.zero_()
                head.weight[:old] = w
            self.lm_head = head
        self.config.vocab_size = new_vocab


# The words each memento token's embedding starts from (paper §A.2.1).
MEMENTO_TOKEN_SEEDS = {
    "<|block_start|>": ["block", "start", "begin", "section", "step"],
    "<|block_end|>": ["block", "end", "finish", "section", "done"],
    "<|summary_start|>": ["summary", "summarize", "brief", "recap", "overview"],
    "<|summary_end|>": ["summary", "end", "finish", "done", "complete"],
}


def add_memento_tokens(model: Qwen3, tokenizer, noise_std: float = 0.01, seed: int = 0) -> dict[str, int]:
    """Register the four memento tokens and initialize their rows (paper §A.2.1).

    Each word is encoded in its mid-sentence form " word" (leading space); a word that
    becomes several tokens contributes the mean of its pieces' rows. A new token's row is
    the mean over its five words plus N(0, noise_std²) noise, in the input embedding and,
    when untied, in lm_head (tied models share the row). Tokens the tokenizer already has
    keep their ids; rows are (re)initialized only for tokens that were missing. The
    embedding grows if a new id falls beyond vocab_size.

    Args:
        model: a Qwen3 (modified in place).
        tokenizer: a tokenizer.Tokenizer (modified in place).
    Returns:
        {token: id} for the four tokens.
    """
    missing = [t for t in MEMENTO_TOKEN_SEEDS if t not in tokenizer.special_ids]
    ids = tokenizer.add_special_tokens(list(MEMENTO_TOKEN_SEEDS))
    need = max(ids.values()) + 1
    if need > model.config.vocab_size:
        model.resize_token_embeddings(need)
    g = torch.Generator().manual_seed(seed)
    tables = [model.model.embed_tokens.weight]
    if not model.config.tie_word_embeddings:
        tables.append(model.lm_head.weight)
    with torch.no_grad():
        for tok in missing:
            for table in tables:
                word_rows = [table[tokenizer.encode(" " + w)].float().mean(0) for w in MEMENTO_TOKEN_SEEDS[tok]]
                mean = torch.stack(word_rows).mean(0)
                noise = torch.randn(mean.shape, generator=g) * noise_std
                table[ids[tok]] = (mean + noise.to(mean.device)).to(table.dtype)
    return {t: ids[t] for t in MEMENTO_TOKEN_SEEDS}
