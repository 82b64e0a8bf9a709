"""Memento attention: which key a query may see, and the one attention function.

Paper: "MEMENTO: Teaching LLMs to Manage Their Own Context" (Kontonis et al., 2026),
§4 (block masking) and §6.1 (inference). The rule used everywhere in this repository:

    key j is visible to query i  iff  pos[j] <= pos[i] < mask_from[j]

where pos are logical positions in the whole token sequence (prompt + response) and
mask_from[j] is the first query position from which key j is masked (NEVER when it is
never masked). Plain causal attention is mask_from == NEVER everywhere.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

# "Never masked". int32 max, so mask_from fits the int32 tensors the Triton kernel reads.
NEVER = 2**31 - 1


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, mask_from: torch.Tensor) -> torch.Tensor:
    """Dense boolean visibility of the memento rule (§4).

    Args:
        q_pos: [B, Tq] int, logical position of each query.
        k_pos: [B, Tk] int, logical position of each key.
        mask_from: [B, Tk] int, first query position from which each key is hidden.
    Returns:
        [B, Tq, Tk] bool, True where query i may attend to key j:
        k_pos[j] <= q_pos[i] < mask_from[j].
    """
    qp = q_pos[:, :, None]
    return (k_pos[:, None, :] <= qp) & (qp < mask_from[:, None, :])


def _check(q, k, v, mask_from):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B={B}, Hkv, Tk, D={D}]")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]}) for GQA")
    if k.shape[2] < Tq:
        raise ValueError(f"attention: fewer keys ({k.shape[2]}) than queries ({Tq})")
    if mask_from is not None and tuple(mask_from.shape) != (B, k.shape[2]):
        raise ValueError(f"attention: mask_from must be [B, Tk] = [{B}, {k.shape[2]}], got {tuple(mask_from.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share one dtype outside autocast, got {q.dtype}, {k.dtype}, {v.dtype}; "
                         "run under torch.autocast or cast them")


def attention_reference(q, k, v, mask_from=None, *, q_pos=None, k_pos=None):
    """Dense PyTorch memento attention (§4): the oracle every faster path is tested against.

    Computes softmax(q k^T / sqrt(D) + mask) v in fp32 with the visibility of
    `visible_mask`, and returns the result in q's dtype (fp32/bf16/fp16 in, same out).
    Shapes as in `attention`; memory is O(Tq·Tk) per head, so this is for tests and
    short sequences. A query that can see no key at all (impossible for sequences built
    by this repo, since every token sees itself) gets a zero output instead of NaN.
    Raises nothing itself; `attention` validates shapes before calling it.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dev = q.device
    if k_pos is None:
        k_pos = torch.arange(Tk, device=dev).expand(B, Tk)
    if q_pos is None:
        q_pos = torch.arange(Tk - Tq, Tk, device=dev).expand(B, Tq)
    if mask_from is None:
        mask_from = torch.full((B, Tk), NEVER, device=dev, dtype=torch.int64)
    vis = visible_mask(q_pos.long(), k_pos.long(), mask_from.long())[:, None, None]  # [B,1,1,Tq,Tk]
    # GQA without copies: the `rep` query heads sharing a kv head form one group.
    rep = Hq // Hkv
    qf = q.float().reshape(B, Hkv, rep * Tq, D)
    scores = (qf @ k.float().transpose(-1, -2)).view(B, Hkv, rep, Tq, Tk) / math.sqrt(D)
    scores = scores.masked_fill(~vis, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (p.view(B, Hkv, rep * Tq, Tk) @ v.float()).view(B, Hq, Tq, D).to(q.dtype)


# Below this many queries the triton backend runs the dense reference: decoding is one query
# per row over the keys left in the cache, O(Tk) memory, with no tiles worth skipping.
KERNEL_MIN_QUERIES = 16


def attention(q, k, v, mask_from=None, *, q_pos=None, k_pos=None, backend=None):
    """Causal attention under the memento visibility rule (§4); the model's only attention.

    Args:
        q: [B, Hq, Tq, D] float (fp32/bf16/fp16), queries.
        k, v: [B, Hkv, Tk, D], keys and values; Hq must be a multiple of Hkv (grouped-query
            attention, no K/V copies needed by callers). Tk >= Tq.
        mask_from: [B, Tk] int or None. Key j is visible to query i iff
            k_pos[j] <= q_pos[i] < mask_from[j]. None means plain causal attention.
        q_pos, k_pos: optional [B, Tq] / [B, Tk] int logical positions. By default keys sit
            at 0..Tk-1 and queries are the last Tq of them (training, prefill, and decoding
            against a cache whose entries are all visible).
        backend: "torch" (the dense reference below, the oracle of every test), "sdpa"
            (torch's fused scaled_dot_product_attention with the same rule as a dense boolean
            [B, 1, Tq, Tk] mask: what the paper trained with, and the fast CPU path), or
            "triton" (the block-masked flash kernel of kernels/, CUDA or TRITON_INTERPRET=1).
            None reads $MEMENTO_ATTN_BACKEND, else picks triton on CUDA and sdpa elsewhere.
            "triton" never builds a Tq x Tk tensor for Tq >= KERNEL_MIN_QUERIES: whole
            sequences (training) run the differentiable kernel, queries against a KV cache
            (prefill chunks, replay, restart mode) its forward with positions; fewer queries
            (decoding) run the dense reference, whose memory is O(Tq * Tk) with Tq < 16.
    Mixed precision: under torch.autocast for q's device type, q, k and v are cast to the
    autocast dtype and attention runs in it (as autocast does for SDPA): the output is in
    that dtype. Outside autocast q, k and v must share one dtype (a bf16 model gives bf16).
    Returns:
        [B, Hq, Tq, D] in q's dtype (the autocast dtype under autocast).
    Raises:
        ValueError on inconsistent shapes, mixed dtypes outside autocast, an unknown backend,
        or (triton) a CPU tensor without the Triton interpreter, or positions with a gradient.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        with torch.autocast(device_type, enabled=False):
            return _attention(q, k, v, mask_from, q_pos, k_pos, backend)
    return _attention(q, k, v, mask_from, q_pos, k_pos, backend)


def _attention(q, k, v, mask_from, q_pos, k_pos, backend):
    _check(q, k, v, mask_from)
    backend = backend or os.environ.get("MEMENTO_ATTN_BACKEND") or ("triton" if q.is_cuda else "sdpa")
    if backend not in ("torch", "sdpa", "triton"):
        raise ValueError(f"attention: unknown backend {backend!r}; use 'torch', 'sdpa' or 'triton' (or set MEMENTO_ATTN_BACKEND)")
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    if backend == "triton" and q_pos is None and k_pos is None and Tq == Tk:
        from kernels.memento_flash import memento_flash_attention

        if mask_from is None:
            mask_from = torch.full((B, Tk), NEVER, device=q.device, dtype=torch.int32)
        # Any integer dtype: the kernel clamps to int32 itself, so NEVER-like int64 values
        # above 2**31 - 1 stay "never" instead of wrapping negative.
        return memento_flash_attention(q, k, v, mask_from)
    if backend == "torch" or (backend == "triton" and Tq < KERNEL_MIN_QUERIES):
        return attention_reference(q, k, v, mask_from, q_pos=q_pos, k_pos=k_pos)
    if k_pos is None:
        k_pos = torch.arange(Tk, device=q.device).expand(B, Tk)
    if q_pos is None:
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device).expand(B, Tq)
    if mask_from is None:
        mask_from = torch.full((B, Tk), NEVER, device=q.device, dtype=torch.int64)
    if backend == "triton":
        from kernels.memento_flash import memento_flash_attention

        return memento_flash_attention(q, k, v, mask_from, q_pos=q_pos, k_pos=k_pos)
    vis = visible_mask(q_pos.long(), k_pos.long(), mask_from.long())[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, enable_gqa=True)


# ============================================================================ block tracking (§3)
#
# One state machine reads the special tokens of a sequence. It is used two ways: over a whole
# sequence (`build_mask_from`, training and prefill) and one token at a time (`BlockTracker`,
# decoding). Both call the same `BlockTracker.step`, so they cannot disagree on the rules.
#
# Every masking decision is made by the token at the position where the mask starts: block b
# is hidden from z_b (its <|summary_end|>) on, or from z_{b+N}, or from the next
# <|block_start|>. So `step` at position p reports exactly the spans whose mask starts at p,
# which is what a decoder must evict before it feeds token p (§6.1: the engine evicts as soon
# as <|summary_end|> is sampled, before that token is fed back in).

from dataclasses import dataclass, field  # noqa: E402


@dataclass(frozen=True)
class MementoTokens:
    """Token ids the tracker reacts to (paper §3 format).

    assistant_header: the ids of "<|im_start|>assistant"; tracking starts right after it
    when require_assistant_section is on. Its first id must not recur inside it.
    """

    block_start: int
    block_end: int
    summary_start: int
    summary_end: int
    think_end: int
    assistant_header: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tok) -> "MementoTokens":
        """Ids from a tokenizer.Tokenizer. Raises KeyError naming a missing special token."""
        return cls(tok.token_id("<|block_start|>"), tok.token_id("<|block_end|>"),
                   tok.token_id("<|summary_start|>"), tok.token_id("<|summary_end|>"),
                   tok.token_id("</think>"), tuple(tok.encode("<|im_start|>assistant")))


@dataclass(frozen=True)
class MementoConfig:
    """Masking options, named as in the official engine (paper §4, §6.1).

    keep_last_n_blocks: -1 never mask (stage 1); 0 mask a block from its memento's
        <|summary_end|> on; N > 0 keep the N most recently completed blocks visible.
    mask_delimiters: also hide a masked block's <|block_start|> and <|block_end|>.
    keep_last_block_for_answer: (needs keep_last_n_blocks == 0) hide a completed block from
        the next <|block_start|> instead of from its <|summary_end|>; so the last block before
        </think> stays visible to the answer.
    require_assistant_section: special tokens before "<|im_start|>assistant" are ordinary.
    """

    keep_last_n_blocks: int = 0
    mask_delimiters: bool = False
    keep_last_block_for_answer: bool = False
    require_assistant_section: bool = True

    def __post_init__(self):
        if self.keep_last_n_blocks < -1:
            raise ValueError(f"keep_last_n_blocks={self.keep_last_n_blocks}: use -1 (never mask), 0, or N > 0")
        if self.keep_last_block_for_answer and self.keep_last_n_blocks != 0:
            raise ValueError("keep_last_block_for_answer needs keep_last_n_blocks=0 (paper §4)")


@dataclass
class Block:
    """One block's delimiters, by position: <|block_start|> s, <|block_end|> e,
    <|summary_start|> ss, <|summary_end|> z (None until seen)."""

    s: int
    e: int | None = None
    ss: int | None = None
    z: int | None = None

    def span(self, with_delimiters: bool) -> tuple[int, int]:
        """Inclusive position range hidden when the block is masked."""
        return (self.s, self.e) if with_delimiters else (self.s + 1, self.e - 1)


@dataclass
class BlockTracker:
    """Incremental block tracking of one sequence (§3), one token per `step`.

    Malformed streams follow the official engine: a stray token (<|block_end|> with no open
    block, <|summary_start|> with no closed block waiting, <|summary_end|> outside a summary)
    is ignored, nested blocks are tracked on a stack (the inner one closes first), and a
    block is only ever masked after its memento completed. Each ignored token, each nested
    <|block_start|> and, via `problems()`, each block left open or unsummarized is recorded
    as a problem string, so training-data validation can reject the example instead of training on a wrong mask.
    """

    tokens: MementoTokens
    cfg: MementoConfig
    pos: int = 0
    active: bool = False
    header_match: int = 0
    open_blocks: list = field(default_factory=list)      # stack of open blocks
    waiting: list = field(default_factory=list)          # closed, no memento yet
    summarizing: Block | None = None                     # block whose memento is being written
    completed: list = field(default_factory=list)        # in completion order
    unmasked: list = field(default_factory=list)         # completed but still visible
    stray: list = field(default_factory=list)

    def __post_init__(self):
        self.active = not self.cfg.require_assistant_section

    def step(self, token: int) -> list[Block]:
        """Consume the token at position self.pos; return the blocks whose mask starts here.

        A returned block must be hidden from this position on: a decoder evicts
        block.span(mask_delimiters) before it feeds this token.
        """
        p, t, T = self.pos, token, self.tokens
        self.pos += 1
        if not self.active:
            self._match_header(t)
            return []
        if t == T.block_start:
            if self.open_blocks:
                # The engine keeps a stack and masks nested blocks like any other; this repository
                # still calls the stream malformed, so validation rejects it.
                self.stray.append(f"nested <|block_start|> at {p} inside the block opened at {self.open_blocks[-1].s}")
            self.open_blocks.append(Block(p))
            if self.cfg.keep_last_block_for_answer and self.unmasked:
                return self._mask(self.unmasked)
        elif t == T.block_end:
            if not self.open_blocks:
                self.stray.append(f"<|block_end|> at {p} with no open block")
            else:
                b = self.open_blocks.pop()
                b.e = p
                self.waiting.append(b)
        elif t == T.summary_start:
            if self.summarizing is not None or not self.waiting:
                self.stray.append(f"<|summary_start|> at {p} with no closed block waiting for a memento")
            else:
                self.summarizing = self.waiting.pop()
                self.summarizing.ss = p
        elif t == T.summary_end:
            if self.summarizing is None:
                self.stray.append(f"<|summary_end|> at {p} outside a memento")
            else:
                b, self.summarizing = self.summarizing, None
                b.z = p
                self.completed.append(b)
                self.unmasked.append(b)
                n = self.cfg.keep_last_n_blocks
                if n == 0 and not self.cfg.keep_last_block_for_answer:
                    return self._mask([b])
                if n > 0 and len(self.unmasked) > n:
                    return self._mask(self.unmasked[:-n])
        return []

    def _mask(self, blocks: list[Block]) -> list[Block]:
        self.unmasked = [b for b in self.unmasked if b not in blocks]
        return list(blocks)

    def _match_header(self, t: int) -> None:
        h = self.tokens.assistant_header
        if t == h[self.header_match]:
            self.header_match += 1
        else:
            self.header_match = 1 if t == h[0] else 0
        if self.header_match == len(h):
            self.active = True

    @property
    def open_block_start(self) -> int | None:
        """Position of the innermost open <|block_start|>, or None (for max_block_tokens)."""
        return self.open_blocks[-1].s if self.open_blocks else None

    def problems(self) -> list[str]:
        """Why this sequence is malformed (empty for a well-formed trace)."""
        out = list(self.stray)
        out += [f"block opened at {b.s} never closed" for b in self.open_blocks]
        out += [f"block at {b.s}-{b.e} never summarized" for b in self.waiting]
        if self.summarizing is not None:
            out.append(f"memento opened at {self.summarizing.ss} never closed")
        return out


def build_mask_from(input_ids: torch.Tensor, tokens: MementoTokens, cfg: MementoConfig,
                    return_trackers: bool = False):
    """mask_from for whole sequences (training, prefill): §4 over [B, T].

    Runs BlockTracker.step on the special tokens only (found with one tensor comparison),
    then fills each masked span with the position its mask starts at.

    Args:
        input_ids: [B, T] int token ids (prompt + response), CPU or GPU.
        tokens, cfg: see MementoTokens, MementoConfig.
        return_trackers: also return the B trackers (for `problems()` and block positions).
    Returns:
        mask_from [B, T] int64 on input_ids' device: key j is visible to query i iff
        j <= i < mask_from[j]; NEVER where a key is never hidden. Restart-mode and padding
        are not encoded here.
    """
    B, T = input_ids.shape
    ids = input_ids.detach().cpu()
    mask_from = torch.full((B, T), NEVER, dtype=torch.int64)
    specials = torch.tensor([tokens.block_start, tokens.block_end, tokens.summary_start, tokens.summary_end])
    trackers = []
    for r in range(B):
        tr = BlockTracker(tokens, cfg)
        start = 0
        if cfg.require_assistant_section:
            start = _header_end(ids[r], tokens.assistant_header)
            tr.active = start is not None
            start = T if start is None else start
        for p in torch.nonzero(torch.isin(ids[r, start:], specials)).flatten().tolist():
            tr.pos = start + p
            for b in tr.step(int(ids[r, start + p])):
                lo, hi = b.span(cfg.mask_delimiters)
                # The earliest start wins: an inner (nested) block already hidden stays hidden,
                # as its K/V are already gone from a decoder's cache.
                mask_from[r, lo:hi + 1].clamp_(max=tr.pos - 1)
        tr.pos = T
        trackers.append(tr)
    mask_from = mask_from.to(input_ids.device)
    return (mask_from, trackers) if return_trackers else mask_from


def _header_end(ids: torch.Tensor, header: tuple[int, ...]) -> int | None:
    """Index right after the first occurrence of `header` in ids, or None."""
    n = len(header)
    if ids.numel() < n:
        return None
    hits = (ids.unfold(0, n, 1) == torch.tensor(header)).all(1).nonzero()
    return int(hits[0]) + n if len(hits) else None
