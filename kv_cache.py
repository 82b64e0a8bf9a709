"""The paged, compacting KV cache that makes the sawtooth and turns it into room (paper §6.1, §A.3).

Memory is one pool of token slots for all layers, cut into pages of `page_size` slots (vLLM
calls a page a "block"; here "block" always means a reasoning block). Each sequence holds a
page table, its tokens packed at the front of its pages in order, and one logical position
and one mask_from per token, kept once for all layers. Appending takes slots from the
sequence's last page, or a new page from the free list. Compaction physically removes
tokens: the survivors after the gap move left in one batched copy for all layers, and the
pages emptied at the end go back to the pool, where another sequence can use them at once.
That is what a completed block's eviction buys a server: room for more sequences.

RoPE positions stay logical: a token keeps the position it had in the whole sequence,
whatever slot it sits in. The pool has a size in pages (a KV budget: what a server has) or is
unbounded (it grows by doubling, for experiments that want no limit). A bounded pool is
allocated at once on CUDA, as vLLM does; on the CPU its memory is allocated as it is first
used, by doubling up to the budget, so a large default budget costs nothing until it is used.

A forward through the cache goes through a `CacheBatch` (the cache's view of the sequences
of one forward): `append` reserves and fills the slots of the new tokens once for all
layers, and each layer's `update` stores its K/V and returns the K/V of every held token of
each row, gathered into a padded [B, Hkv, S, D] view. A paged-attention kernel would read
K/V straight from the pages through the page table instead of gathering a padded copy per
layer; the gather keeps the attention code shared with training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from blocks import EMPTY, NEVER


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """KV-cache bytes one token holds (paper §A.3.1): 2 (K and V) x layers x KV heads x
    head_dim x bytes per element of `dtype`. model_config: a model.Qwen3Config. Returns int."""
    c = model_config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.tensor([], dtype=dtype).element_size()


def curve_stats(curve: list[int], bytes_per_token: int) -> dict:
    """The §A.3.1 figures of a KV curve (tokens held after each token was fed): peak and final
    tokens, KV AUC (sum, token·steps), peak bytes; and the same for a full cache, which keeps
    every token (i + 1 after token i). Zeros for an empty curve. Raises nothing."""
    n, peak = len(curve), max(curve, default=0)
    return {"peak_kv_tokens": peak, "final_kv_tokens": curve[-1] if curve else 0, "kv_auc": sum(curve),
            "peak_kv_bytes": peak * bytes_per_token, "full_cache_peak_kv_tokens": n,
            "full_cache_kv_auc": n * (n + 1) // 2, "full_cache_peak_kv_bytes": n * bytes_per_token}


class OutOfPages(RuntimeError):
    """The bounded pool has no free page for an append (the engine preempts before this)."""


@dataclass
class _Seq:
    pages: list[int] = field(default_factory=list)
    length: int = 0                                       # tokens held


class PagedKVCache:
    """K/V of many sequences in one pool of pages, with per-sequence compaction (§6.1, §A.3.1).

    Args:
        model_config: a model.Qwen3Config (layers, KV heads, head_dim).
        dtype, device: of the pool.
        page_size: token slots per page (>= 1).
        num_pages: pool size in pages (the KV budget); None = unbounded (grows by doubling).
        preallocate: allocate a bounded pool's memory at once (default: on CUDA, where
            growing later would fragment device memory); otherwise it grows by doubling up
            to num_pages as pages are first used.
    Pool tensors: k, v [L, Hkv, slots, D] (each head's keys contiguous, as attention reads
    them); pos, mask_from [slots] int64 (EMPTY on free slots). Accounting for the pool:
    `stats()`; per sequence the engine counts tokens held after each token (§A.3.1).
    Raises ValueError for page_size or num_pages < 1.
    """

    def __init__(self, model_config, dtype: torch.dtype, device, *, page_size: int = 16, num_pages: int | None = None,
                 preallocate: bool | None = None):
        if page_size < 1 or (num_pages is not None and num_pages < 1):
            raise ValueError(f"PagedKVCache: page_size ({page_size}) and num_pages ({num_pages}) must be >= 1")
        c = model_config
        self.n_layers, self.n_kv_heads, self.head_dim = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        self.page_size, self.bounded = page_size, num_pages is not None
        self.dtype, self.device = dtype, torch.device(device)
        self.bytes_per_token = kv_bytes_per_token(model_config, dtype)
        self.num_pages = num_pages or 0   # the budget (unbounded: what is allocated)
        self.allocated = 0                # pages with memory behind them
        self.k = self.v = self.pos = self.mask_from = None
        self.free_pages: list[int] = []   # allocated pages that hold nothing
        self.seqs: dict[int, _Seq] = {}
        self.peak_pages = 0
        if preallocate is None:
            preallocate = self.device.type == "cuda"
        self._grow(num_pages if (preallocate and num_pages) else min(16, num_pages or 16))

    # ------------------------------------------------------------------------- pages

    def _grow(self, num_pages: int) -> None:
        """Allocate memory for num_pages pages in all (the old ones keep their index)."""
        slots = num_pages * self.page_size
        k = torch.zeros(self.n_layers, self.n_kv_heads, slots, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        pos = torch.zeros(slots, dtype=torch.int64, device=self.device)
        mf = torch.full((slots,), EMPTY, dtype=torch.int64, device=self.device)
        if self.k is not None:  # page ids stay valid: old slots keep their index
            old = self.k.shape[2]
            k[:, :, :old], v[:, :, :old], pos[:old], mf[:old] = self.k, self.v, self.pos, self.mask_from
        self.free_pages = list(range(num_pages - 1, self.allocated - 1, -1)) + self.free_pages
        self.k, self.v, self.pos, self.mask_from, self.allocated = k, v, pos, mf, num_pages
        if not self.bounded:
            self.num_pages = num_pages

    def pages_for(self, n_tokens: int) -> int:
        """Pages that hold n_tokens."""
        return math.ceil(n_tokens / self.page_size)

    def pages_to_append(self, seq_id: int, n_tokens: int) -> int:
        """New pages sequence seq_id needs to append n_tokens."""
        s = self.seqs[seq_id]
        return max(0, self.pages_for(s.length + n_tokens) - len(s.pages))

    def held_page_count(self) -> int:
        """Pages held by sequences."""
        return self.allocated - len(self.free_pages)

    def free_page_count(self) -> int:
        """Pages a sequence could take now, within the budget (unbounded pools always have room)."""
        return self.num_pages - self.held_page_count() if self.bounded else 1 << 62

    def _take_pages(self, s: _Seq, n: int) -> None:
        if n > len(self.free_pages):
            if self.bounded and n > self.free_page_count():
                raise OutOfPages(f"KV pool: need {n} free pages, have {self.free_page_count()} of {self.num_pages}")
            want = max(2 * self.allocated, self.allocated + n - len(self.free_pages))
            self._grow(min(want, self.num_pages) if self.bounded else want)
        for _ in range(n):
            s.pages.append(self.free_pages.pop())
        self.peak_pages = max(self.peak_pages, self.held_page_count())

    def _slots(self, s: _Seq, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Slot index of each held token start..stop-1 of a sequence, in order (int64)."""
        stop = s.length if stop is None else stop
        idx = torch.arange(start, stop, device=self.device)
        pages = torch.tensor(s.pages, dtype=torch.int64, device=self.device)
        return pages[idx // self.page_size] * self.page_size + idx % self.page_size

    # ------------------------------------------------------------------------- sequences

    def add(self, seq_id: int) -> None:
        """Start an empty sequence. Raises ValueError if seq_id is already held."""
        if seq_id in self.seqs:
            raise ValueError(f"PagedKVCache: sequence {seq_id} already exists")
        self.seqs[seq_id] = _Seq()

    def free(self, seq_id: int) -> None:
        """Drop a sequence and return all its pages to the pool at once."""
        s = self.seqs.pop(seq_id)
        if s.length:
            self.mask_from[self._slots(s)] = EMPTY
        self.free_pages.extend(reversed(s.pages))

    def length(self, seq_id: int) -> int:
        """Tokens held by a sequence."""
        return self.seqs[seq_id].length

    def read(self, seq_id: int):
        """(positions [n], k [L, n, Hkv, D], v [L, n, Hkv, D], mask_from [n]) of the tokens a
        sequence holds, in order (for tests and K/V probes)."""
        slots = self._slots(self.seqs[seq_id])
        k, v = self.k[:, :, slots].transpose(1, 2), self.v[:, :, slots].transpose(1, 2)
        return self.pos[slots], k, v, self.mask_from[slots]

    # ------------------------------------------------------------------------- compaction

    def evict(self, seq_id: int, lo: int, hi: int) -> int:
        """Remove the tokens of a sequence with logical position in [lo, hi]; returns how many."""
        s = self.seqs[seq_id]
        if not s.length:
            return 0
        pos = self.pos[self._slots(s)]
        return self._compact(s, (pos < lo) | (pos > hi))

    def _compact(self, s: _Seq, keep: torch.Tensor) -> int:
        """Keep the held tokens where keep [length] is True, packed to the front in order:
        only the survivors after the first gap move, in one copy for all layers; emptied
        pages at the end return to the pool. Returns the number removed."""
        n_keep = int(keep.sum())
        removed = s.length - n_keep
        if not removed:
            return 0
        first = int((~keep).nonzero()[0])
        slots = self._slots(s, first)
        src = slots[keep[first:]]
        dst = slots[:len(src)]
        if len(src):
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]
            self.pos[dst], self.mask_from[dst] = self.pos[src], self.mask_from[src]
        self.mask_from[slots[len(src):]] = EMPTY
        s.length = n_keep
        n_pages = self.pages_for(n_keep)
        self.free_pages.extend(reversed(s.pages[n_pages:]))
        del s.pages[n_pages:]
        return removed

    # ------------------------------------------------------------------------- forwards

    def batch(self, seq_ids: list[int]) -> "CacheBatch":
        """The view a model forward uses for these sequences (row r = seq_ids[r])."""
        return CacheBatch(self, list(seq_ids))

    def stats(self) -> dict:
        """Pool counters: pages (the budget, free within it, held, peak, allocated), tokens
        held, slots held but unused (fragmentation), bytes held."""
        held_pages = self.held_page_count()
        tokens = sum(s.length for s in self.seqs.values())
        return {"pages": self.num_pages, "free_pages": self.num_pages - held_pages, "held_pages": held_pages,
                "allocated_pages": self.allocated,
                "peak_pages": self.peak_pages, "tokens": tokens, "fragmentation": held_pages * self.page_size - tokens,
                "bytes": tokens * self.bytes_per_token, "sequences": len(self.seqs)}


class CacheBatch:
    """One forward's view of the cache: B rows, each a sequence (PagedKVCache.batch)."""

    def __init__(self, cache: PagedKVCache, seq_ids: list[int]):
        self.cache, self.seq_ids = cache, seq_ids
        self.layers = [_LayerView(self, i) for i in range(cache.n_layers)]

    def append(self, positions: torch.Tensor, mask_from: torch.Tensor | None) -> None:
        """Reserve slots for the new tokens and store their positions and mask_from, once for
        all layers; then prepare the gather of every row's held tokens.

        Args:
            positions: [B, W] int logical positions of the new tokens.
            mask_from: [B, W] int or None (= NEVER); EMPTY marks padding (nothing stored).
        Raises:
            OutOfPages if a bounded pool cannot hold them.
        """
        c = self.cache
        B, W = positions.shape
        mf = torch.full((B, W), NEVER, dtype=torch.int64) if mask_from is None else mask_from.detach().cpu().long()
        valid = mf != EMPTY
        n_new = valid.sum(1).tolist()
        seqs = [c.seqs[i] for i in self.seq_ids]
        for s, n in zip(seqs, n_new):
            c._take_pages(s, c.pages_for(s.length + n) - len(s.pages))
        starts = [s.length for s in seqs]
        for s, n in zip(seqs, n_new):
            s.length += n
        S = max(s.length for s in seqs)
        self.dense = bool(valid.all())  # no padding: the new K/V need no boolean selection
        new_pos = positions.to(c.device).long()
        new_mf = mf.to(c.device)
        if not self.dense:
            self.valid = valid.to(c.device)
            new_pos, new_mf = new_pos[self.valid], new_mf[self.valid]
        # One sequence whose pages are consecutive (the usual single generation) writes and
        # reads its K/V as slices of the pool, with no copy.
        self.span = None
        if B == 1 and self.dense and _consecutive(seqs[0].pages):
            a = seqs[0].pages[0] * c.page_size
            self.span, self.write = slice(a, a + S), slice(a + starts[0], a + S)
            c.pos[self.write], c.mask_from[self.write] = new_pos.view(-1), new_mf.view(-1)
            self.k_pos = c.pos[self.span][None]
            self.k_mask_from = c.mask_from[self.span][None]
            return
        self.write = torch.cat([c._slots(s, st, s.length) for s, st in zip(seqs, starts)])
        c.pos.index_copy_(0, self.write, new_pos.reshape(-1))
        c.mask_from.index_copy_(0, self.write, new_mf.reshape(-1))
        # Every row's held tokens as [B, S] slot indices; short rows point at slot 0 and read
        # as EMPTY. index_select on a flat index: several times faster than x[index] on CPU.
        gather = torch.zeros(B, S, dtype=torch.int64, device=c.device)
        held = torch.zeros(B, S, dtype=torch.bool, device=c.device)
        for r, s in enumerate(seqs):
            gather[r, :s.length] = c._slots(s)
            held[r, :s.length] = True
        self.gather, self.shape = gather.view(-1), (B, S)
        self.k_pos = c.pos.index_select(0, self.gather).view(B, S)
        self.k_mask_from = torch.where(held, c.mask_from.index_select(0, self.gather).view(B, S), EMPTY)


def _consecutive(pages: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(pages, pages[1:]))


class _LayerView:
    """The model's handle on one layer of a CacheBatch."""

    def __init__(self, batch: CacheBatch, layer: int):
        self.batch, self.layer = batch, layer

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new K/V ([B, Hkv, W, D], RoPE applied; padding rows skipped) and
        return (k, v) [B, Hkv, S, D] of every held token of each row, with their positions
        and mask_from [B, S] (EMPTY past a row's end), for memento_attention.attention."""
        b, c = self.batch, self.batch.cache
        kl, vl = c.k[self.layer], c.v[self.layer]  # [Hkv, slots, D]
        k, v = k.transpose(0, 1).to(kl.dtype), v.transpose(0, 1).to(vl.dtype)  # [Hkv, B, W, D]
        if b.dense:
            k, v = k.reshape(k.shape[0], -1, k.shape[-1]), v.reshape(v.shape[0], -1, v.shape[-1])
        else:
            k, v = k[:, b.valid], v[:, b.valid]
        if b.span is not None:
            kl[:, b.write], vl[:, b.write] = k, v
            return kl[None, :, b.span], vl[None, :, b.span], b.k_pos, b.k_mask_from
        kl.index_copy_(1, b.write, k)
        vl.index_copy_(1, b.write, v)
        shape = (c.n_kv_heads, *b.shape, c.head_dim)
        k_all = kl.index_select(1, b.gather).view(shape).transpose(0, 1)
        v_all = vl.index_select(1, b.gather).view(shape).transpose(0, 1)
        return k_all, v_all, b.k_pos, b.k_mask_from
