"""The block format (paper §3) and its one parser: which token opens, closes and summarizes a
block, and from which position a block is masked (§4).

A response is `<think>`, then blocks `<|block_start|> reasoning <|block_end|>` each followed by
its memento `<|summary_start|> ... <|summary_end|>`, then `</think>` and the answer. Everything
that reads this structure from token ids goes through `BlockTracker`: training masks
(`build_mask_from`), the engine's evictions, the KV replay that sizes admissions, data
validation and the statistics of a trace (`trace_stats`).

The visibility rule every mask in this repository encodes (memento_attention.py applies it):

    key j is visible to query i  iff  pos[j] <= pos[i] < mask_from[j]

NEVER marks a key that is never masked; EMPTY marks a cache slot that holds no token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# "Never masked". int32 max, so mask_from fits the int32 tensors the Triton kernel reads.
NEVER = 2**31 - 1
# mask_from of a slot that holds no token: pos[j] <= q < -1 never holds, no query sees it.
EMPTY = -1

# The special tokens of the format (paper §3), as text.
BLOCK_START, BLOCK_END = "<|block_start|>", "<|block_end|>"
SUMMARY_START, SUMMARY_END = "<|summary_start|>", "<|summary_end|>"
MEMENTO_TOKENS = (BLOCK_START, BLOCK_END, SUMMARY_START, SUMMARY_END)
THINK_START, THINK_END = "<think>", "</think>"
ASSISTANT_HEADER = "<|im_start|>assistant"

# One state machine reads the special tokens of a sequence. It is used two ways: over a whole
# sequence (`build_mask_from`, training and prefill) and one token at a time (`BlockTracker`,
# decoding). Both call the same `BlockTracker.step`, so they cannot disagree on the rules.
#
# Every masking decision is made by the token at the position where the mask starts: block b
# is hidden from z_b (its <|summary_end|>) on, or from z_{b+N}, or from the next
# <|block_start|>. So `step` at position p reports exactly the spans whose mask starts at p,
# which is what a decoder must evict before it feeds token p (§6.1: the engine evicts as soon
# as <|summary_end|> is sampled, before that token is fed back in).


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
        return cls(*(tok.token_id(t) for t in MEMENTO_TOKENS), tok.token_id(THINK_END), tuple(tok.encode(ASSISTANT_HEADER)))


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
    """One block's delimiters, by position in prompt + response (None until seen)."""

    start: int                        # <|block_start|>
    end: int | None = None            # <|block_end|>
    summary_start: int | None = None  # <|summary_start|>: its memento opens
    summary_end: int | None = None    # <|summary_end|>: its memento is complete

    def span(self, with_delimiters: bool) -> tuple[int, int]:
        """Inclusive position range hidden when the block is masked."""
        return (self.start, self.end) if with_delimiters else (self.start + 1, self.end - 1)

    def memento(self) -> tuple[int, int]:
        """Positions after <|block_end|> up to <|summary_end|>, both ends inclusive: what
        restart mode recomputes (the memento, its opening token and any whitespace before it,
        §6.2.1) and what sees the block while it is written."""
        return self.end + 1, self.summary_end - 1


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

    fmt: MementoTokens
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
        p, t, fmt = self.pos, token, self.fmt
        self.pos += 1
        if not self.active:
            self._match_header(t)
            return []
        if t == fmt.block_start:
            if self.open_blocks:
                # The engine keeps a stack and masks nested blocks like any other; this repository
                # still calls the stream malformed, so validation rejects it.
                self.stray.append(f"nested <|block_start|> at {p} inside the block opened at {self.open_blocks[-1].start}")
            self.open_blocks.append(Block(p))
            if self.cfg.keep_last_block_for_answer and self.unmasked:
                return self._mask(self.unmasked)
        elif t == fmt.block_end:
            if not self.open_blocks:
                self.stray.append(f"<|block_end|> at {p} with no open block")
            else:
                b = self.open_blocks.pop()
                b.end = p
                self.waiting.append(b)
        elif t == fmt.summary_start:
            if self.summarizing is not None or not self.waiting:
                self.stray.append(f"<|summary_start|> at {p} with no closed block waiting for a memento")
            else:
                self.summarizing = self.waiting.pop()
                self.summarizing.summary_start = p
        elif t == fmt.summary_end:
            if self.summarizing is None:
                self.stray.append(f"<|summary_end|> at {p} outside a memento")
            else:
                b, self.summarizing = self.summarizing, None
                b.summary_end = p
                self.completed.append(b)
                self.unmasked.append(b)
                n = self.cfg.keep_last_n_blocks
                if n == 0 and not self.cfg.keep_last_block_for_answer:
                    return self._mask([b])
                if n > 0 and len(self.unmasked) > n:
                    return self._mask(self.unmasked[:-n])
        return []

    def peek(self, token: int) -> list[Block]:
        """The blocks `step(token)` would return, without reading it (nothing changes): what
        an engine that feeds a token before it knows it must be ready to hide (§6.1,
        asynchronous scheduling). The returned blocks are the tracker's own (a block being
        summarized has no summary_end yet)."""
        if not self.active:
            return []
        cfg, fmt = self.cfg, self.fmt
        if token == fmt.block_start:
            return list(self.unmasked) if cfg.keep_last_block_for_answer and self.unmasked else []
        if token == fmt.summary_end and self.summarizing is not None:
            n = cfg.keep_last_n_blocks
            if n == 0 and not cfg.keep_last_block_for_answer:
                return [self.summarizing]
            if n > 0 and len(self.unmasked) + 1 > n:
                return (self.unmasked + [self.summarizing])[:-n]
        return []

    def _mask(self, blocks: list[Block]) -> list[Block]:
        self.unmasked = [b for b in self.unmasked if b not in blocks]
        return list(blocks)

    def _match_header(self, t: int) -> None:
        h = self.fmt.assistant_header
        if t == h[self.header_match]:
            self.header_match += 1
        else:
            self.header_match = 1 if t == h[0] else 0
        if self.header_match == len(h):
            self.active = True

    @property
    def open_block_start(self) -> int | None:
        """Position of the innermost open <|block_start|>, or None (for max_block_tokens)."""
        return self.open_blocks[-1].start if self.open_blocks else None

    def problems(self) -> list[str]:
        """Why this sequence is malformed (empty for a well-formed trace)."""
        out = list(self.stray)
        out += [f"block opened at {b.start} never closed" for b in self.open_blocks]
        out += [f"block at {b.start}-{b.end} never summarized" for b in self.waiting]
        if self.summarizing is not None:
            out.append(f"memento opened at {self.summarizing.summary_start} never closed")
        return out


def build_mask_from(input_ids: torch.Tensor, fmt: MementoTokens, cfg: MementoConfig,
                    return_trackers: bool = False):
    """mask_from for whole sequences (training, prefill): §4 over [B, T].

    Runs BlockTracker.step on the special tokens only (found with one tensor comparison),
    then fills each masked span with the position its mask starts at.

    Args:
        input_ids: [B, T] int token ids (prompt + response), CPU or GPU.
        fmt, cfg: the format's token ids (MementoTokens) and the masking options (MementoConfig).
        return_trackers: also return the B trackers (for `problems()` and block positions).
    Returns:
        mask_from [B, T] int64 on input_ids' device: key j is visible to query i iff
        j <= i < mask_from[j]; NEVER where a key is never hidden. Restart-mode and padding
        are not encoded here.
    """
    B, T = input_ids.shape
    ids = input_ids.detach().cpu()
    mask_from = torch.full((B, T), NEVER, dtype=torch.int64)
    specials = torch.tensor([fmt.block_start, fmt.block_end, fmt.summary_start, fmt.summary_end])
    trackers = []
    for r in range(B):
        tr = BlockTracker(fmt, cfg)
        start = 0
        if cfg.require_assistant_section:
            start = _header_end(ids[r], fmt.assistant_header)
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


def trace_stats(response: list[int], fmt: MementoTokens) -> dict:
    """Blocks completed and the mean length in tokens of a block's content and of a memento
    (between their delimiters) of a response's token ids, read by the tracker (§3):
    {"blocks": int, "mean_block_tokens": float, "mean_memento_tokens": float}; a mean is 0.0
    when there is nothing to average (a block counts once closed, a memento once complete)."""
    tr = BlockTracker(fmt, MementoConfig(-1, require_assistant_section=False))
    for t in response:
        tr.step(t)
    closed = tr.completed + tr.waiting + ([tr.summarizing] if tr.summarizing is not None else [])
    blocks = [b.end - b.start - 1 for b in closed]
    mementos = [b.summary_end - b.summary_start - 1 for b in tr.completed]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"blocks": len(tr.completed), "mean_block_tokens": mean(blocks), "mean_memento_tokens": mean(mementos)}
