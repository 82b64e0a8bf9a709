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
of one forward): `append` fills the slots of the new tokens once for all layers, and each
layer's `attend` stores its K/V and attends over every held token of each row. After
compaction a sequence's pages hold only tokens its next queries may see (evicted blocks are
gone, and a chunk never crosses a mask event), so decoding needs ordinary causal attention
over pages: on a GPU the paged-attention kernel (memento_kernels/paged_attention.py) reads them in
place through the page table; elsewhere, or for a cache that still holds masked tokens, the
rows are gathered into a padded view for memento_attention.attention.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from blocks import EMPTY, NEVER
from memento_attention import attention, resolve_backend

log = logging.getLogger("memento.kv_cache")


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
    row: int                                              # its row of the device page table
    pages: list[int] = field(default_factory=list)
    length: int = 0                                       # tokens held
    masked: int = 0                                       # held tokens with a mask_from other than NEVER


class PagedKVCache:
    """K/V of many sequences in one pool of pages, with per-sequence compaction (§6.1, §A.3.1).

    Args:
        model_config: a model.Qwen3Config (layers, KV heads, head_dim).
        dtype, device: of the pool.
        page_size: token slots per page (>= 1). The paged-attention kernel needs a power of
            two >= 16; other sizes read K/V through the gathered path (one warning).
        num_pages: pool size in pages (the KV budget); None = unbounded (grows by doubling).
        preallocate: allocate a bounded pool's memory at once (default: on CUDA, where
            growing later would fragment device memory); otherwise it grows by doubling up
            to num_pages as pages are first used.
    Pool tensors: k, v [L, Hkv, slots, D] (each head's keys contiguous, and one page of one
    head a contiguous [page_size, D] tile, as the paged kernel reads it); pos, mask_from
    [slots] int64 (EMPTY on free slots). One page past the allocated ones is scratch: right
    padding of a batch is written there, so writes need no boolean selection (which would
    read a count back to the host). The page table lives on the device, int32 [rows, max
    pages], one row per sequence; the host keeps the same lists and only sends the entries
    of newly allocated pages (compaction keeps a prefix of a sequence's pages, so it changes
    no entry). Accounting: `stats()`; per sequence the engine counts tokens held after each
    token (§A.3.1).
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
        self.allocated = 0                # pages with memory behind them (the scratch page not counted)
        self.k = self.v = self.pos = self.mask_from = None
        self.free_pages: list[int] = []   # allocated pages that hold nothing
        self.seqs: dict[int, _Seq] = {}
        self.peak_pages = 0
        self.page_table = torch.zeros(8, 8, dtype=torch.int32, device=self.device)
        self.free_rows: list[int] = list(range(7, -1, -1))
        self.pending: list[tuple[int, int, int]] = []  # (row, column, page) not yet on the device
        self.paged_kernel = page_size >= 16 and not page_size & (page_size - 1)
        self.gather_buffers = [torch.empty(0, dtype=dtype, device=self.device) for _ in range(2)]  # K, V views
        if preallocate is None:
            preallocate = self.device.type == "cuda"
        self._grow(num_pages if (preallocate and num_pages) else min(16, num_pages or 16))

    # ------------------------------------------------------------------------- pages

    def _grow(self, num_pages: int) -> None:
        """Allocate memory for num_pages pages in all, plus the scratch page (old pages keep
        their index; the scratch page moves to the new end)."""
        slots = (num_pages + 1) * self.page_size
        k = torch.zeros(self.n_layers, self.n_kv_heads, slots, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        pos = torch.zeros(slots, dtype=torch.int64, device=self.device)
        mf = torch.full((slots,), EMPTY, dtype=torch.int64, device=self.device)
        if self.k is not None:  # page ids stay valid: old slots keep their index
            old = self.allocated * self.page_size
            k[:, :, :old], v[:, :, :old] = self.k[:, :, :old], self.v[:, :, :old]
            pos[:old], mf[:old] = self.pos[:old], self.mask_from[:old]
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
            page = self.free_pages.pop()
            self.pending.append((s.row, len(s.pages), page))
            s.pages.append(page)
        self.peak_pages = max(self.peak_pages, self.held_page_count())

    def _slots(self, s: _Seq, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Slot index of each held token start..stop-1 of a sequence, in order (int64), computed
        on the device from its page-table row: no host-to-device copy, no sync."""
        stop = s.length if stop is None else stop
        self.flush_page_table()
        idx = torch.arange(start, stop, device=self.device)
        return self.page_table[s.row].long()[idx // self.page_size] * self.page_size + idx % self.page_size

    def _page_table_fits(self, rows: int, cols: int) -> None:
        """Grow the device page table (by doubling) to at least rows x cols."""
        r, c = self.page_table.shape
        if rows <= r and cols <= c:
            return
        R, C = max(r, rows), max(c, cols)
        R, C = (R if R == r else max(R, 2 * r)), (C if C == c else max(C, 2 * c))
        table = torch.zeros(R, C, dtype=torch.int32, device=self.device)
        table[:r, :c] = self.page_table
        self.free_rows = list(range(R - 1, r - 1, -1)) + self.free_rows
        self.page_table = table

    def flush_page_table(self) -> None:
        """Send the page-table entries of pages allocated since the last send, in one copy
        (paper §6.1; `CacheBatch.upload` sends them with a step's metadata instead)."""
        if not self.pending:
            return
        host = torch.tensor(self.pending, dtype=torch.int64).T.contiguous()
        if self.device.type == "cuda":
            host = host.pin_memory()
        rows, cols, pages = host.to(self.device, non_blocking=True)
        self.page_table[rows, cols] = pages.to(torch.int32)
        self.pending = []

    # ------------------------------------------------------------------------- sequences

    def add(self, seq_id: int) -> None:
        """Start an empty sequence. Raises ValueError if seq_id is already held."""
        if seq_id in self.seqs:
            raise ValueError(f"PagedKVCache: sequence {seq_id} already exists")
        if not self.free_rows:
            self._page_table_fits(self.page_table.shape[0] + 1, 1)
        self.seqs[seq_id] = _Seq(self.free_rows.pop())

    def free(self, seq_id: int) -> None:
        """Drop a sequence and return all its pages (and its page-table row) to the pool at once."""
        s = self.seqs.pop(seq_id)
        if s.length:
            self.mask_from[self._slots(s)] = EMPTY
        self.free_pages.extend(reversed(s.pages))
        self.pending = [u for u in self.pending if u[0] != s.row]
        self.free_rows.append(s.row)

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

    def remove(self, seq_id: int, first: int, count: int) -> int:
        """Remove `count` held tokens of a sequence from index `first` on (in the order it holds
        them; paper §6.1 compaction): the tokens after them move left in one copy for all
        layers, emptied pages at the end return to the pool. The caller knows which indices
        hold a block (the engine keeps the held positions on the host), so nothing is read back
        from the device: no sync. Returns count. Raises ValueError for a range outside what
        the sequence holds."""
        s = self.seqs[seq_id]
        if count <= 0:
            return 0
        if first < 0 or first + count > s.length:
            raise ValueError(f"PagedKVCache.remove: tokens {first}..{first + count - 1} of sequence {seq_id}, "
                             f"which holds {s.length}")
        slots = self._slots(s, first)
        after = s.length - first - count
        if after:
            src, dst = slots[count:], slots[:after]
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]
            self.pos[dst], self.mask_from[dst] = self.pos[src], self.mask_from[src]
        self.mask_from[slots[after:]] = EMPTY
        s.length -= count
        if s.masked:  # only a cache prefilled with masks (a probe) counts them; it reads them back
            s.masked = int((self.mask_from[self._slots(s)] != NEVER).sum())
        n_pages = self.pages_for(s.length)
        self.free_pages.extend(reversed(s.pages[n_pages:]))
        del s.pages[n_pages:]
        return count

    def evict(self, seq_id: int, lo: int, hi: int) -> int:
        """Remove the tokens of a sequence with logical position in [lo, hi]; returns how many.
        Reads the sequence's positions back from the pool (a device sync; tests and probes:
        the engine knows the indices and calls `remove`)."""
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
        if s.masked:
            s.masked = int((self.mask_from[self._slots(s)] != NEVER).sum())
        n_pages = self.pages_for(n_keep)
        self.free_pages.extend(reversed(s.pages[n_pages:]))
        del s.pages[n_pages:]
        return removed

    # ------------------------------------------------------------------------- forwards

    def batch(self, seq_ids: list[int], query_lens: list[int] | None = None, hide: bool = False) -> "CacheBatch":
        """The view a model forward uses for these sequences (row r = seq_ids[r]).

        query_lens: the number of new tokens of each row (right padding after them), known
        on the host, as a serving engine knows them: slots are reserved at once, the new
        tokens are plain causal (mask_from NEVER), and no step of the forward reads a device
        tensor back (no host sync). None: read from the mask_from given to the forward (any
        memento mask; EMPTY marks padding), which costs one host copy.
        hide: the forward will get a hidden key range per row (CacheBatch.hide), so every read
        path applies one (the engine's asynchronous steps, paper §6.1).
        Raises OutOfPages if a bounded pool cannot hold the new tokens, ValueError for an
        unknown sequence or a query length < 0.
        """
        return CacheBatch(self, list(seq_ids), query_lens, hide)

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
    """One forward's view of the cache: B rows, each a sequence (PagedKVCache.batch).

    The host decides everything about the step (which slots the new tokens take, how long
    each row is, which attention path runs) from its own lists; the device receives it in
    one copy (`upload`, pinned and non-blocking on CUDA) and computes slot addresses itself
    from the page table (paper §6.1). Three ways to read K/V:
      paged     the paged-attention kernel reads each row's pages in place (CUDA, or the
                Triton interpreter with MEMENTO_ATTN_BACKEND=triton): every held token is
                visible, the queries are at most 16 per row, the page size a power of two >= 16.
      plain     every held token visible, the "sdpa" backend (the CPU default): the rows'
                pages are gathered into a padded view and attended with one causal mask per
                batch (none for equal rows), a batch of decode rows by `_decode_attention`.
      gathered  the cache still holds masked tokens (a probe prefilling whole traces with
                their masks), or the "torch"/"triton" backend without the kernel: the padded
                view goes through memento_attention.attention with the memento rule.
    One sequence on consecutive pages is read as a slice of the pool, with no copy.

    `hide` ([B, 2] int64 on the device, set before the forward, or None): row b's keys at
    indices hide[b, 0]..hide[b, 1] of what it holds are hidden from its queries in every read
    path (an empty range when the first exceeds the second). The engine's asynchronous steps
    feed a token before the host knows whether it completes a memento; if it does, its block
    is hidden here and evicted one step later (paper §6.1; engine.py).
    """

    def __init__(self, cache: PagedKVCache, seq_ids: list[int], query_lens: list[int] | None, hide: bool = False):
        unknown = [i for i in seq_ids if i not in cache.seqs]
        if unknown:
            raise ValueError(f"CacheBatch: sequence {unknown[0]} is not in the cache; add it first")
        self.cache, self.seq_ids = cache, seq_ids
        self.seqs = [cache.seqs[i] for i in seq_ids]
        self.layers = [_LayerView(self, i) for i in range(cache.n_layers)]
        self.meta = None  # device metadata, after upload
        self.query_lens = None
        self.hiding, self.hide = hide, None
        self.tiles = None  # the memento kernel's tile lists of this step (triton backend, gathered path)
        if query_lens is not None:
            if len(query_lens) != len(seq_ids) or min(query_lens, default=0) < 0:
                raise ValueError(f"CacheBatch: query_lens {query_lens} must give one length >= 0 per row")
            self._reserve(list(query_lens), masked=[0] * len(seq_ids))

    def _reserve(self, query_lens: list[int], masked: list[int]) -> None:
        """Take the pages of the new tokens (host lists) and choose the attention path."""
        c = self.cache
        self.starts = [s.length for s in self.seqs]
        for s, n, m in zip(self.seqs, query_lens, masked):
            c._take_pages(s, c.pages_for(s.length + n) - len(s.pages))
            s.length += n
            s.masked += m
        self.query_lens = query_lens
        self.lengths = [s.length for s in self.seqs]
        self.max_length = max(self.lengths)
        width = max(query_lens)
        c._page_table_fits(1 + max(s.row for s in self.seqs), max(len(s.pages) for s in self.seqs))
        visible = not any(s.masked for s in self.seqs)
        backend = resolve_backend(c.device)
        self.paged = backend == "triton" and c.paged_kernel and visible and width <= _paged_max_query_len()
        # Without the kernel, a compacted (all-visible) batch still needs no memento rule: SDPA
        # over the gathered view with one causal mask per batch ("sdpa", the CPU default).
        self.plain = visible and backend == "sdpa"
        # Equal rows that are a decode step, or a first prefill of whole equal prompts: keys
        # cut to the length need no mask (decode) or only the plain causal one (prefill).
        fresh = all(st == 0 for st in self.starts) and min(query_lens) == width
        self.same_length = min(self.lengths) == self.max_length and (width == 1 or fresh)
        self.causal = width > 1
        if visible and backend == "triton" and not c.paged_kernel and not _warned:
            _warned.append(True)
            log.warning("page size %d: the paged-attention kernel needs a power of two >= 16; reading K/V "
                        "through the gathered path", c.page_size)
        # One sequence whose pages are consecutive (the usual single generation) writes and
        # reads its K/V as slices of the pool, with no copy.
        self.span = None
        s = self.seqs[0]
        if not self.paged and not self.hiding and len(self.seqs) == 1 and _consecutive(s.pages):
            a = s.pages[0] * c.page_size
            self.span = slice(a, a + s.length)

    @classmethod
    def planned(cls, cache: PagedKVCache, rows, starts, query_lens, lengths, *, max_length: int,
                hide: torch.Tensor | None = None) -> "CacheBatch":
        """A decode batch whose metadata already sits on the device (cuda_graphs.py records a
        step on such static buffers): rows, starts, query_lens, lengths [B] int64 device
        tensors as `upload` makes them, hide [B, 2] or None; every row reads the paged path,
        one query each, with the kernel's KV splits chosen for contexts up to max_length
        tokens (paper §6.1): a function of the bucket and the page table's capacity only, so
        a replayed graph and the same step run eagerly make the same choice."""
        self = cls.__new__(cls)
        self.hiding, self.hide, self.tiles = hide is not None, hide, None
        self.cache, self.seq_ids, self.seqs = cache, [], []
        self.layers = [_LayerView(self, i) for i in range(cache.n_layers)]
        self.meta = (rows, starts, query_lens, lengths)
        self.query_lens = [1] * rows.shape[0]  # planned on the host: the model reads nothing back
        self.paged, self.span, self.max_length = True, None, max_length
        return self

    def upload(self, *host: torch.Tensor) -> list[torch.Tensor]:
        """Send this step's metadata (rows, starts, query and context lengths, new page-table
        entries) to the device with the caller's own host int64 tensors (token ids, positions:
        any shapes) in one copy, pinned and non-blocking on CUDA (paper §6.1); returns those
        tensors on the device, same shapes, int64. Needs query_lens (given to
        PagedKVCache.batch); raises nothing itself."""
        c = self.cache
        rows = [s.row for s in self.seqs]
        upd = c.pending
        c.pending = []
        head = rows + self.starts + self.query_lens + self.lengths + [u[0] for u in upd] + [u[1] for u in upd] \
            + [u[2] for u in upd]
        flat = torch.cat([torch.tensor(head, dtype=torch.int64)] + [t.reshape(-1).long() for t in host])
        if c.device.type == "cuda":
            flat = flat.pin_memory().to(c.device, non_blocking=True)
        else:
            flat = flat.to(c.device)
        B, U = len(rows), len(upd)
        rows, starts, qlens, lengths, urow, ucol, upage = flat[:4 * B + 3 * U].split([B, B, B, B, U, U, U])
        if U:
            c.page_table[urow, ucol] = upage.to(torch.int32)
        out, at = [], 4 * B + 3 * U
        for t in host:
            out.append(flat[at:at + t.numel()].view(t.shape))
            at += t.numel()
        self.meta = (rows, starts, qlens, lengths)
        return out

    def append(self, positions: torch.Tensor, mask_from: torch.Tensor | None) -> None:
        """Store the new tokens' positions and mask_from in their slots, once for all layers;
        then prepare how each layer reads K/V (paged, or the gather of every row's tokens).

        Args:
            positions: [B, W] int logical positions of the new tokens (on the pool's device).
            mask_from: [B, W] int or None (= NEVER). With query_lens known it must be None;
                without, EMPTY marks right padding (nothing stored) and is read on the host.
        Raises:
            OutOfPages if a bounded pool cannot hold them; ValueError for padding that is
            not at the right end of a row, or mask_from given with query_lens.
        """
        c = self.cache
        B, W = positions.shape
        if self.query_lens is None:  # the general path: the masks decide the lengths, on the host
            mf = torch.full((B, W), NEVER, dtype=torch.int64) if mask_from is None else mask_from.detach().cpu().long()
            valid = mf != EMPTY
            n_new = valid.sum(1)
            if not bool((valid == (torch.arange(W)[None] < n_new[:, None])).all()):
                raise ValueError("CacheBatch.append: padding (mask_from EMPTY) must sit at the right end of each row")
            self._reserve(n_new.tolist(), ((mf != NEVER) & valid).sum(1).tolist())
            self.upload()
        elif mask_from is not None:
            raise ValueError("CacheBatch.append: mask_from must be None when query_lens were given (all NEVER)")
        elif self.meta is None:
            self.upload()
        rows, starts, qlens, lengths = self.meta
        P = c.page_size
        table = c.page_table.index_select(0, rows)  # [B, max_pages] this batch's page tables
        # Slots of the new tokens; padding goes to the scratch page past the allocated ones.
        j = starts[:, None] + torch.arange(W, device=c.device)
        new = torch.arange(W, device=c.device)[None] < qlens[:, None]
        page = table.gather(1, (j // P).clamp(max=table.shape[1] - 1)).long()
        self.write = torch.where(new, page * P + j % P, c.allocated * P).view(-1)
        c.pos.index_copy_(0, self.write, positions.reshape(-1).long())
        if mask_from is None:
            c.mask_from.index_fill_(0, self.write, NEVER)
        else:
            c.mask_from.index_copy_(0, self.write, mask_from.reshape(-1).long())
        if self.paged:
            self.table, self.lengths_i32, self.qlens_i32 = table, lengths.to(torch.int32), qlens.to(torch.int32)
            return
        if self.span is not None:
            self.k_pos = c.pos[self.span][None]
            self.k_mask_from = c.mask_from[self.span][None]
            return
        # Every row's pages, whole: [B, S] tokens with S = its longest row's pages x page_size.
        # Copying pages (page_size x D values each) instead of single tokens is several times
        # faster on the CPU; slots past a row's length read as EMPTY.
        n_pages = -(-self.max_length // P)
        self.gather = table[:, :n_pages].reshape(-1).long()
        S = n_pages * P
        self.shape = (B, S)
        if self.plain:  # query i of a row sits at context index length - query_len + i
            if not self.same_length or self.hiding:  # (equal decode rows need no mask: keys are cut to length)
                ctx = (lengths - qlens)[:, None] + torch.arange(W, device=c.device)
                keys = torch.arange(self.max_length if self.same_length else S, device=c.device)
                visible = keys[None, None] <= ctx[:, :, None]
                if self.hiding:
                    visible &= ~self._hidden(keys)[:, None]
                self.attn_mask = visible[:, None]
            return
        held = torch.arange(S, device=c.device)[None] < lengths[:, None]
        self.k_pos = c.pos.view(-1, P).index_select(0, self.gather).view(B, S)
        self.k_mask_from = torch.where(held, c.mask_from.view(-1, P).index_select(0, self.gather).view(B, S), EMPTY)
        if self.hiding:  # a hidden key's mask starts at its row's first query
            self.k_mask_from = torch.where(self._hidden(torch.arange(S, device=c.device)), positions[:, :1].long(),
                                           self.k_mask_from)

    def _hidden(self, keys: torch.Tensor) -> torch.Tensor:
        """[B, len(keys)] bool: which of these key indices fall in each row's hidden range."""
        return (keys[None] >= self.hide[:, :1]) & (keys[None] <= self.hide[:, 1:])

    def gathered(self, pool: torch.Tensor, which: int) -> torch.Tensor:
        """One layer's pool [Hkv, slots, D] gathered page by page into the rows' padded view,
        head-major: [Hkv, B, S, D], each head's rows contiguous. Without autograd it fills one
        buffer per K/V that the cache keeps for every layer and step (the view is valid until
        the next gather), head by head: a dim-0 index_select of whole pages, faster on the
        CPU than one index_select of tokens across heads (paper §6.1; a one-off measurement on
        the development machine). which: 0 for K, 1 for V (the buffer to fill)."""
        c = self.cache
        B, S = self.shape
        pages = pool.view(c.n_kv_heads, -1, c.page_size * c.head_dim)  # [Hkv, pages, page_size * D]
        if torch.is_grad_enabled():
            out = pages.index_select(1, self.gather)
        else:
            n = c.n_kv_heads * len(self.gather) * pages.shape[2]
            if c.gather_buffers[which].numel() < n:  # kept by the cache: no fresh memory each step
                c.gather_buffers[which] = torch.empty(2 * n, dtype=pool.dtype, device=pool.device)
            out = c.gather_buffers[which][:n].view(c.n_kv_heads, len(self.gather), pages.shape[2])
            for h in range(c.n_kv_heads):
                torch.index_select(pages[h], 0, self.gather, out=out[h])
        return out.view(c.n_kv_heads, B, S, c.head_dim)


_warned: list = []  # the page-size warning is logged once per process


def _paged_max_query_len() -> int:
    from memento_kernels.paged_attention import MAX_QUERY_LEN  # triton: CUDA, or CPU under the interpreter

    return MAX_QUERY_LEN


def _consecutive(pages: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(pages, pages[1:]))


class _LayerView:
    """The model's handle on one layer of a CacheBatch."""

    def __init__(self, batch: CacheBatch, layer: int):
        self.batch, self.layer = batch, layer

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this layer's new K/V ([B, Hkv, W, D], RoPE applied, cast to the pool's dtype)
        to their slots, padding to the scratch page (paper §6.1)."""
        b, c = self.batch, self.batch.cache
        kl, vl = c.k[self.layer], c.v[self.layer]  # [Hkv, slots, D]
        k = k.transpose(0, 1).reshape(k.shape[1], -1, k.shape[-1]).to(kl.dtype)  # [Hkv, B*W, D]
        v = v.transpose(0, 1).reshape(v.shape[1], -1, v.shape[-1]).to(vl.dtype)
        kl.index_copy_(1, b.write, k)
        vl.index_copy_(1, b.write, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """Store the new K/V, then attend: q [B, Hq, W, D] (RoPE applied) against every token
        each row holds, under the memento rule (§4; after compaction that is plain causal
        attention over the held tokens, §6.1). q_pos: [B, W] logical positions of the queries.
        Returns [B, Hq, W, D] in q's dtype; padded query positions carry no meaning."""
        b, c = self.batch, self.batch.cache
        self.store(k, v)
        kl, vl = c.k[self.layer], c.v[self.layer]
        if b.paged:
            from memento_kernels.paged_attention import paged_attention  # triton: CUDA, or CPU under the interpreter

            y = paged_attention(q.to(kl.dtype), kl, vl, b.table, b.lengths_i32, b.qlens_i32, page_size=c.page_size,
                                max_context=b.max_length, check_values=False, hide=b.hide)
            return y.to(q.dtype)
        if b.span is not None:
            k_all, v_all = kl[None, :, b.span], vl[None, :, b.span]
        else:
            k_all, v_all = b.gathered(kl, 0), b.gathered(vl, 1)  # [Hkv, B, S, D]
            if b.plain and b.same_length:
                k_all, v_all = k_all[:, :, :b.max_length], v_all[:, :, :b.max_length]
            if b.plain and q.shape[2] == 1 and q.shape[0] > 1:
                mask = None if b.same_length and not b.hiding else b.attn_mask
                dt = _compute_dtype(q, k_all)
                return _decode_attention(q.to(dt), k_all.to(dt), v_all.to(dt), mask).to(q.dtype)
            k_all, v_all = k_all.transpose(0, 1), v_all.transpose(0, 1)
        if b.plain and (b.same_length or b.span is None):
            # one causal mask per batch, none for a decode step of equal rows
            dt = _compute_dtype(q, k_all)
            masked = not b.same_length or b.hiding
            y = F.scaled_dot_product_attention(q.to(dt), k_all.to(dt), v_all.to(dt),
                                               attn_mask=b.attn_mask if masked else None,
                                               is_causal=not masked and b.causal, enable_gqa=True)
            return y.to(q.dtype)
        mask = b.k_mask_from
        if resolve_backend(c.device) == "triton":  # the kernel's tile lists, built once for every layer
            if b.tiles is None:
                from memento_kernels.memento_flash import TileMask  # triton: CUDA, or CPU under the interpreter

                b.tiles = TileMask(b.k_mask_from, q_pos, b.k_pos)
            mask = b.tiles
        return attention(q, k_all, v_all, mask, q_pos=q_pos, k_pos=b.k_pos)


def _compute_dtype(q: torch.Tensor, k: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's when it is on (as memento_attention.attention
    and a training forward do), else the pool's."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return k.dtype


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row over the gathered keys, as batched matrix products over (KV head,
    row), each KV head's query group one matrix: q [B, Hq, 1, D]; k, v head-major [Hkv, B, S,
    D] as `CacheBatch.gathered` leaves them (no copy of them is made); mask [B, 1, 1, S] bool
    (True = visible) or None. Returns [B, Hq, 1, D] in q's dtype (paper §6.1). On the CPU this
    was faster than SDPA's kernel for batches of decode rows, whose scores are only [Hq, S]
    per row (a one-off measurement on the development machine); SDPA stays for one row."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[0], k.shape[2]
    qg = q.reshape(B, Hkv, Hq // Hkv, D).transpose(0, 1).reshape(Hkv * B, Hq // Hkv, D)  # small copy
    scores = torch.bmm(qg, k.flatten(0, 1).transpose(1, 2)) * D ** -0.5  # [Hkv * B, group, S]
    if mask is not None:
        scores = scores.view(Hkv, B, -1, S).masked_fill(~mask.view(1, B, 1, S), float("-inf")).view(Hkv * B, -1, S)
    y = torch.bmm(torch.softmax(scores, -1), v.flatten(0, 1))  # [Hkv * B, group, D]
    return y.view(Hkv, B, Hq // Hkv, D).transpose(0, 1).reshape(B, Hq, 1, D)
