"""CUDA graphs for decode steps: one launch per step instead of one per operator (paper §6.1).

A decode step of a small model is launch-bound: each layer is a dozen small kernels, and the
host takes longer to issue them than the GPU to run them. A CUDA graph records one step's
launches once and replays them as one. It replays fixed shapes on fixed addresses, so at
engine start we record one graph per batch-size bucket (vLLM's capture sizes: 1, 2, 4, then
multiples of 8 up to 256, then of 16, up to max_num_seqs), each reading its inputs from its
own static buffer (int64, 11 x bucket):

    rows | starts | query lengths | context lengths | token ids | positions
    | prev | hide token | hide lo | hide hi

A row's token is its id in the buffer, or, where `prev` >= 0, the prev-th id the last step
sampled (model_runner's last_ids, a fixed device buffer): the asynchronous engine launches a
step before it has read the tokens it feeds. If that token equals the row's hide token, the
row's keys hide lo..hi are hidden from it (a block whose memento the token completes, evicted
one step later; model_runner.py). A step of B decode rows takes the smallest bucket >= B; the
rows past B point at a page-table row kept empty, with query and context length 0, so the
paged kernel writes zeros for them and their K/V go to the pool's scratch page. Before a
replay the host copies that buffer in (one pinned, non-blocking copy) and sends the page-table
entries of newly allocated pages; the graph then runs the cache writes, every layer (compiled,
when the engine compiles them), the paged-attention kernel and the LM head of the B rows.
Sampling stays outside the graph: its parameters vary per request.

The same bucketed step runs eagerly when graphs are off (`record=False`): the same kernels,
the same padding and the same number of KV splits, so a graph replay and the eager step give
the same logits bit for bit.

What a graph holds fixed, and so what must not move after capture: the KV pool (a bounded pool
is allocated at once on CUDA), the device page table (sized at start for max_num_seqs + 1
rows and a sequence's longest page list), and the kernel's number of KV splits (chosen for
the longest possible context). If the page table must grow later (keep_cache holding more
sequences than max_num_seqs), the graphs are dropped and steps run eagerly, with one warning.
`--enforce-eager` (vLLM's flag) never records them; on the CPU they are never used.
"""
from __future__ import annotations

import logging
import math

import torch

from kv_cache import CacheBatch, PagedKVCache
from model import EAGER_OPS

FIELDS = 10  # rows of a bucket's static buffer (see the module docstring)

log = logging.getLogger("memento.cuda_graphs")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch-size buckets recorded for max_num_seqs (vLLM's default capture sizes): 1, 2,
    4, 8, 16, ..., 248 (steps of 8), 256, 272, ... (steps of 16), cut at the first size >=
    max_num_seqs, which is included (paper §6.1 serving). Raises ValueError for max_num_seqs < 1."""
    if max_num_seqs < 1:
        raise ValueError(f"capture_sizes: max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, max(max_num_seqs, 256) + 16, 16))
    return [s for s in sizes if s < max_num_seqs] + [next(s for s in sizes if s >= max_num_seqs)]


class DecodeGraphs:
    """One decode step per batch-size bucket, over one engine's cache (paper §6.1).

    Args:
        model: a model.Qwen3 on CUDA (eval). cache: the engine's PagedKVCache, bounded and
            preallocated. max_num_seqs: the most rows a decode step has. last_ids: [>= max_num_seqs]
            int64 device buffer of the last step's sampled ids (model_runner). ops: the
            model's layer functions (model.EAGER_OPS or compiled_ops()).
        record: record the graphs (CUDA). False runs the same static-buffer step eagerly at
            each `run` (the eager mode of the engine on CUDA, and the CPU tests).
    `run` replays (or runs) the bucket of a planned decode batch and returns its logits.
    Raises ValueError if recording off CUDA, or the cache is not bounded, or its page size does
    not suit the paged kernel (a power of two >= 16).
    """

    def __init__(self, model, cache: PagedKVCache, max_num_seqs: int, last_ids: torch.Tensor, *, ops=EAGER_OPS,
                 record: bool = True):
        if (record and cache.device.type != "cuda") or not cache.bounded or not cache.paged_kernel:
            raise ValueError("DecodeGraphs: needs a bounded KV pool (on CUDA to record) with a page size that is a "
                             "power of two >= 16")
        self.model, self.cache, self.last_ids, self.ops = model, cache, last_ids, ops
        self.sizes = capture_sizes(max_num_seqs)
        longest = min(cache.num_pages, math.ceil(model.config.max_position_embeddings / cache.page_size))
        cache._page_table_fits(max_num_seqs + 1, longest)
        self.page_table = cache.page_table
        self.empty_row = cache.free_rows.pop(0)  # a row no sequence ever takes: the padding rows'
        self.buffers, self.logits, self.graphs = {}, {}, {}
        self.recorded = False
        for b in self.sizes:
            self.buffers[b] = self._padding(b)
        if not record:
            return
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
            self._forward(b)  # warm-up outside the graph: Triton and torch.compile compile here
            torch.cuda.synchronize(cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize(cache.device)
        log.info("CUDA graphs recorded for decode batch sizes %s", self.sizes)
        self.recorded = True

    def _padding(self, b: int) -> torch.Tensor:
        """A bucket's buffer holding only padding rows: the empty page-table row, no query, no
        context, no previous token, an empty hidden range."""
        buf = torch.zeros(FIELDS, b, dtype=torch.int64, device=self.cache.device)
        buf[0], buf[6], buf[7], buf[8] = self.empty_row, -1, -1, 1
        return buf.view(-1)

    def _forward(self, b: int) -> torch.Tensor:
        """The recorded step: bucket b's rows through the model, reading the static buffer."""
        c, buf = self.cache, self.buffers[b]
        rows, starts, qlens, lengths, ids, pos, prev, htok, hlo, hhi = buf.view(FIELDS, b)
        ids = torch.where(prev >= 0, self.last_ids[prev.clamp(min=0)], ids)
        hit = ids == htok
        hide = torch.stack([torch.where(hit, hlo, 1), torch.where(hit, hhi, 0)], 1)
        view = CacheBatch.planned(c, rows, starts, qlens, lengths, max_length=self.page_table.shape[1] * c.page_size,
                                  hide=hide)
        h = self.model.hidden_states(ids[:, None], pos[:, None], None, view, ops=self.ops)
        return self.model.logits(h[:, -1])

    def usable(self, view: CacheBatch) -> bool:
        """Whether a planned batch can run as a bucket: decode rows only (one query each), a
        bucket large enough, and the page table not moved since capture (paper §6.1). Drops
        the buckets, with one warning, the first time the page table has moved."""
        if self.cache.page_table is not self.page_table:
            if self.buffers:
                log.warning("the KV page table grew past its size at capture: CUDA graphs dropped, decoding eagerly")
                self.graphs.clear()
                self.buffers.clear()
            return False
        return bool(self.buffers) and max(view.query_lens) == 1 and min(view.query_lens) == 1 and len(view.seqs) <= self.sizes[-1]

    def run(self, view: CacheBatch, rows) -> torch.Tensor:
        """Replay (or run) the smallest bucket holding this decode batch (planned by
        PagedKVCache.batch with query length 1 per row); rows: its model_runner.RowIn, one
        token each, from the host or the last step's samples. Returns [B, V] float32 logits of
        the B rows (a view of the graph's output, valid until the next replay; paper §6.1).
        Raises nothing itself."""
        c, B = self.cache, len(view.seqs)
        b = next(s for s in self.sizes if s >= B)
        pad = b - B
        hide = [r.hide or (-1, 1, 0) for r in rows]
        host = torch.tensor([s.row for s in view.seqs] + [self.empty_row] * pad + view.starts + [0] * pad
                            + [1] * B + [0] * pad + view.lengths + [0] * pad
                            + [0 if r.ids is None else r.ids[0] for r in rows] + [0] * pad
                            + [r.start for r in rows] + [0] * pad
                            + [-1 if r.ids is not None else r.prev for r in rows] + [-1] * pad
                            + [h[0] for h in hide] + [-1] * pad + [h[1] for h in hide] + [1] * pad
                            + [h[2] for h in hide] + [0] * pad, dtype=torch.int64)
        c.flush_page_table()
        if not self.recorded:
            self.buffers[b].copy_(host)
            return self._forward(b)[:B]
        self.buffers[b].copy_(host.pin_memory(), non_blocking=True)
        self.graphs[b].replay()
        return self.logits[b][:B]
