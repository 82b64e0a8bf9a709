"""Paged attention for decode steps and short prefill chunks, as Triton kernels (paper §6.1).

The serving engine keeps the K/V of every sequence in one pool of pages (kv_cache.py). For one
layer the pool is k_cache, v_cache [Hkv, num_slots, D], slot = page * page_size + offset, so
one page of one head is a contiguous [page_size, D] tile. Row b of a batch holds
context_lens[b] tokens, listed in order by its page table: token j sits in slot
page_table[b, j // page_size] * page_size + j % page_size. The K/V of this step's queries
were written to the pool before the call (RoPE applied at write time, at logical positions).

After compaction every held token is visible to the row's next queries (the eviction already
removed what the memento rule hides), so this is ordinary causal attention over the pages:
query i of row b (i < query_lens[b]) sits at context index c_i = context_lens[b] -
query_lens[b] + i and sees keys 0..c_i of its row. Padded query positions (i >=
query_lens[b]) come out as zeros. GQA: query head h reads kv head h // (Hq // Hkv).

Kernels, in the flash-decoding scheme:

    _paged_fwd_kernel     one program per (row, kv head, KV split[, query tile]). It holds the
                          queries of every query head of the GQA group at every query
                          position as one [GROUP * W, D] tile, so each page is read once for
                          the whole group, walks its share of the row's pages through the
                          page table, and keeps an online softmax in fp32.
    _paged_reduce_kernel  with num_splits > 1: combines the splits' partial results
                          (unnormalised acc, running max, sum) into the output. One split
                          skips it.

The paged gather is the only difference from a contiguous flash forward: the key tile's row
addresses come from the page table (one int32 per key, a cached load) instead of a stride,
and Triton software-pipelines the gathered loads like contiguous ones (cp.async; checked by
bench/compile_check.py without a GPU). A key tile (BLOCK_N keys) may span several pages or
part of one: the tile size is chosen for the GPU, independently of the cache's page size.

Public API:
    paged_attention(q, k_cache, v_cache, page_table, context_lens, query_lens=None, *,
                    page_size, sm_scale=None, num_splits=None, max_context=None) -> out
    paged_attention_reference(q, k_cache, v_cache, page_table, context_lens, query_lens=None,
                              *, page_size, sm_scale=None) -> out              (the oracle)
    choose_num_splits(batch, kv_heads, max_context, page_size, num_sms, ...) -> int

Runs natively on CUDA; on CPU only under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is imported), which is slow and meant for tests.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memento_kernels.memento_flash import _INTERPRET, arch_family, load_and_score, online_softmax_step

_SUPPORTED_D = (16, 32, 64, 128, 256)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_QUERY_LEN = 16  # longest query chunk per row: beyond it, use the chunked-prefill kernel
MAX_SPLITS = 16  # the reduce kernel combines at most this many partial results per query
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------
# Forward: one program per (row b, kv head hk, split s, query tile).
#
# Rows of the query tile are (query head g of the group, query position i), r = g * W + i,
# padded to BLOCK_M >= 16 (tl.dot's smallest tile). With qk_scale = sm_scale * log2(e),
# scores are in base 2 (exp2 is the native instruction) and for each tile row keep
#     m = running max of s,   l = sum_j exp2(s_j - m),   acc = sum_j exp2(s_j - m) v_j.
# A new key tile with row max m' rescales the old sums by alpha = exp2(m - m'). At the end
# out = acc / l. Rows that have seen only masked keys keep m = -inf; the shift is then 0 so
# that exp2(-inf - -inf) = NaN never appears, and they stay (m=-inf, l=0, acc=0).
#
# Split-KV: the row's n_tiles key tiles are cut into num_splits contiguous ranges. Split s
# stores (acc_s, m_s, l_s) unnormalised, and the reduce computes, with m* = max_s m_s,
#     out = sum_s exp2(m_s - m*) acc_s / sum_s exp2(m_s - m*) l_s,
# which is the same sum as one pass over all tiles, only in another order.
#
# Causality: key j is visible to row query i iff j <= c_i = ctx - qlen + i. Every key j <=
# ctx - qlen is visible to every query, so the tiles entirely below that bound ("full": all
# but the last one or two, since qlen <= 16 <= BLOCK_N) need no mask and no bounds check;
# only the tail tiles do. Two loops, an unmasked one over the full tiles of this split and a
# masked one over its tail tiles, keep both loops free of data-dependent branches, which is
# what lets Triton software-pipeline them (a branch around the loads would not be).
# ---------------------------------------------------------------------------------------
@triton.jit
def _page_tile(q, qpos, k_base, v_base, pt_base, t, ctx, hide_lo, hide_hi, s_ks, s_vs, qk_scale,
               PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
               MASKED: tl.constexpr, HAS_HIDE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Key tile t = keys t*BLOCK_N .. +BLOCK_N-1 of the row (several pages, or part of one).
    # Returns v [BLOCK_N, D] and the scores s [BLOCK_M, BLOCK_N] (base 2, -inf where hidden).
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < ctx
    # One page id per key (the keys of a page load the same id, from L1) keeps the gather a
    # plain pointer tensor, which the pipeliner turns into asynchronous copies like the K/V.
    if MASKED:
        page = tl.load(pt_base + offs_n // PAGE, mask=col_ok, other=0)
    else:
        page = tl.load(pt_base + offs_n // PAGE)
    slot = page.to(tl.int64) * PAGE + offs_n % PAGE  # int64: pools past 2**31 elements
    _, v, s = load_and_score(q, k_base, v_base, slot, col_ok, s_ks, s_vs, qk_scale, BLOCK_M, BLOCK_N, HEAD_D,
                             MASKED, UPCAST, IEEE)
    if MASKED:
        # keys past ctx are covered too: c_i < ctx for every real query
        s = tl.where(offs_n[None, :] <= qpos[:, None], s, float("-inf"))
    if HAS_HIDE:
        # keys hide_lo..hide_hi of the row are hidden (empty when hide_lo > hide_hi): a block
        # whose memento the token being fed completes, evicted one step later (engine.py)
        s = tl.where((offs_n[None, :] >= hide_lo) & (offs_n[None, :] <= hide_hi), float("-inf"), s)
    return v, s


@triton.jit
def _paged_inner(acc, l_i, m_i, q, qpos, k_base, v_base, pt_base, lo, hi, ctx, hide_lo, hide_hi, s_ks, s_vs, qk_scale,
                 PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                 MASKED: tl.constexpr, HAS_HIDE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    for t in range(lo, hi):
        v, s = _page_tile(q, qpos, k_base, v_base, pt_base, t, ctx, hide_lo, hide_hi, s_ks, s_vs, qk_scale,
                          PAGE, BLOCK_M, BLOCK_N, HEAD_D, MASKED, HAS_HIDE, UPCAST, IEEE)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, UPCAST, IEEE)
    return acc, l_i, m_i


@triton.jit
def _paged_fwd_kernel(
    Q, K, V, PT, CTX, QLEN, HIDE, O, OP, MP, LP,
    s_qb, s_qh, s_qt,
    s_kh, s_ks, s_vh, s_vs,
    s_pb,
    s_ob, s_oh, s_ot,
    HKV, GROUP, W, NSPLIT, qk_scale,
    PAGE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, HAS_HIDE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # Grid (B * HKV, NSPLIT, query tiles). SPLIT: write the partial (acc, m, l) of this split
    # to OP [B, Hq, W, NSPLIT, D], MP / LP [B, Hq, W, NSPLIT] (fp32, contiguous) for the
    # reduce; otherwise normalise and write O directly. HAS_HIDE: HIDE [B, 2] int32 holds each
    # row's hidden key range (lo, hi), inclusive, context indices.
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b64 = b.to(tl.int64)
    ctx = tl.load(CTX + b)
    qlen = tl.load(QLEN + b)
    hide_lo, hide_hi = 0, -1
    if HAS_HIDE:
        hide_lo = tl.load(HIDE + 2 * b)
        hide_hi = tl.load(HIDE + 2 * b + 1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    g = rows // W
    i = rows % W
    h = hk * GROUP + g
    row_in = rows < GROUP * W  # a real (head, position) of the output, padded query or not
    row_ok = row_in & (i < qlen)  # a real query
    qpos = ctx - qlen + i
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(Q + b64 * s_qb + h.to(tl.int64)[:, None] * s_qh + i[:, None] * s_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + hk.to(tl.int64) * s_kh
    v_base = V + hk.to(tl.int64) * s_vh
    pt_base = PT + b64 * s_pb

    # Tiles [0, n_full) lie at or below ctx - qlen (visible to all); [n_full, n_tiles) are
    # the tail. max(qlen, 1): a row without queries must still not read past ctx unmasked.
    n_tiles = (ctx + BLOCK_N - 1) // BLOCK_N
    n_full = tl.maximum(ctx - tl.maximum(qlen, 1) + 1, 0) // BLOCK_N
    per_split = (n_tiles + NSPLIT - 1) // NSPLIT
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    acc, l_i, m_i = _paged_inner(acc, l_i, m_i, q, qpos, k_base, v_base, pt_base, t0, tl.minimum(t1, n_full),
                                 ctx, hide_lo, hide_hi, s_ks, s_vs, qk_scale, PAGE, BLOCK_M, BLOCK_N, HEAD_D, False,
                                 HAS_HIDE, UPCAST, IEEE)
    acc, l_i, m_i = _paged_inner(acc, l_i, m_i, q, qpos, k_base, v_base, pt_base, tl.maximum(t0, n_full), t1,
                                 ctx, hide_lo, hide_hi, s_ks, s_vs, qk_scale, PAGE, BLOCK_M, BLOCK_N, HEAD_D, True,
                                 HAS_HIDE, UPCAST, IEEE)
    # Padded queries saw keys too (their q is 0, in the unmasked loop); drop them here.
    l_i = tl.where(row_ok, l_i, 0.0)
    m_i = tl.where(row_ok, m_i, float("-inf"))
    acc = tl.where(row_ok[:, None], acc, 0.0)

    if SPLIT:
        part = ((b64 * HKV * GROUP + h) * W + i) * NSPLIT + split  # [BLOCK_M] int64
        tl.store(OP + part[:, None] * HEAD_D + offs_d[None, :], acc, mask=row_in[:, None])
        tl.store(MP + part, m_i, mask=row_in)
        tl.store(LP + part, l_i, mask=row_in)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(O + b64 * s_ob + h.to(tl.int64)[:, None] * s_oh + i[:, None] * s_ot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_in[:, None])


@triton.jit
def _paged_reduce_kernel(
    OP, MP, LP, O,
    s_ob, s_oh, s_ot,
    HQ, W, NSPLIT,
    HEAD_D: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    # One program per output row (b, h, i): the combination formula above, over the
    # NSPLIT <= SPLITS_PAD partials. Splits that saw no key (m = -inf, l = 0, acc = 0) get
    # weight 0; a row none of whose splits saw a key (a padded query) comes out 0, not NaN.
    row = tl.program_id(0).to(tl.int64)
    i = row % W
    h = (row // W) % HQ
    b = row // (W * HQ)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_D)
    s_ok = offs_s < NSPLIT
    m = tl.load(MP + row * NSPLIT + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(LP + row * NSPLIT + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(OP + (row * NSPLIT + offs_s)[:, None] * HEAD_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_shift = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_shift)  # exp2(-inf) = 0 for empty splits
    denom = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(O + b * s_ob + h * s_oh + i * s_ot + offs_d, out.to(O.dtype.element_ty))


# ---------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------
# Default CUDA launch configs per architecture family (memento_flash.arch_family: sm_80, sm_86,
# sm_90, sm_100, sm_120, by shared memory) and (fp32?, head dim); fp16 uses bf16's:
#     {"dec": (BLOCK_N, num_warps, num_stages), "chunk": (BLOCK_M, BLOCK_N, num_warps, num_stages)}
# "dec" serves GROUP * W <= 16 query rows (decode with a GQA group up to 16) with a 16-row
# tile; "chunk" serves more rows (prefill chunks) in BLOCK_M-row tiles. BLOCK_N is the key
# tile in tokens, whatever the page size. Chosen without a GPU by `bench/compile_check.py
# --search-paged`: the first candidate, largest tiles and deepest pipeline first, that
# compiles software-pipelined, spill-free and within the shared memory of every GPU of the
# family (at page sizes 16 and 64, with and without split), under both Triton 3.7 (the lock's)
# and 3.9; `compile_check.py --strict` compiles every row in CI. Starting points for tuning on
# a GPU, not timed numbers.
_CUDA_CONFIGS = {
    "sm_80": {
        (False, 16): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 32): {"dec": (64, 4, 3), "chunk": (64, 64, 8, 2)},
        (False, 64): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 128): {"dec": (64, 4, 2), "chunk": (64, 64, 8, 3)},
        (False, 256): {"dec": (64, 4, 3), "chunk": (64, 32, 8, 2)},
        (True, 16): {"dec": (64, 4, 2), "chunk": (128, 64, 8, 3)},
        (True, 32): {"dec": (64, 4, 3), "chunk": (64, 64, 8, 3)},
        (True, 64): {"dec": (64, 4, 3), "chunk": (64, 32, 8, 2)},
        (True, 128): {"dec": (32, 4, 3), "chunk": (16, 32, 8, 2)},
        (True, 256): {"dec": (32, 8, 3), "chunk": (16, 16, 4, 2)},
    },
    "sm_86": {
        (False, 16): {"dec": (64, 4, 2), "chunk": (128, 64, 8, 3)},
        (False, 32): {"dec": (64, 4, 3), "chunk": (64, 32, 4, 3)},
        (False, 64): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 128): {"dec": (64, 4, 2), "chunk": (64, 64, 8, 3)},
        (False, 256): {"dec": (64, 4, 3), "chunk": (64, 32, 8, 2)},
        (True, 16): {"dec": (64, 4, 2), "chunk": (128, 64, 8, 3)},
        (True, 32): {"dec": (64, 4, 2), "chunk": (64, 64, 8, 3)},
        (True, 64): {"dec": (64, 8, 3), "chunk": (64, 32, 8, 2)},
        (True, 128): {"dec": (16, 8, 2), "chunk": (16, 32, 8, 2)},
        (True, 256): {"dec": (32, 8, 3), "chunk": (16, 16, 4, 2)},
    },
    "sm_90": {
        (False, 16): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 32): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 64): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 128): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 256): {"dec": (64, 4, 3), "chunk": (64, 64, 8, 3)},
        (True, 16): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (True, 32): {"dec": (64, 4, 2), "chunk": (64, 64, 8, 3)},
        (True, 64): {"dec": (64, 4, 3), "chunk": (64, 32, 8, 2)},
        (True, 128): {"dec": (64, 8, 2), "chunk": (32, 64, 8, 2)},
        (True, 256): {"dec": (32, 8, 3), "chunk": (16, 16, 8, 2)},
    },
    "sm_100": {
        (False, 16): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 32): {"dec": (64, 4, 3), "chunk": (64, 64, 4, 3)},
        (False, 64): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 128): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 256): {"dec": (64, 4, 3), "chunk": (64, 64, 8, 3)},
        (True, 16): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (True, 32): {"dec": (64, 4, 3), "chunk": (64, 64, 8, 3)},
        (True, 64): {"dec": (64, 4, 2), "chunk": (64, 32, 8, 2)},
        (True, 128): {"dec": (64, 8, 2), "chunk": (32, 64, 8, 3)},
        (True, 256): {"dec": (32, 8, 3), "chunk": (16, 16, 8, 2)},
    },
    "sm_120": {
        (False, 16): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 32): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 64): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (False, 128): {"dec": (64, 4, 3), "chunk": (64, 64, 8, 3)},
        (False, 256): {"dec": (64, 4, 3), "chunk": (64, 32, 8, 2)},
        (True, 16): {"dec": (64, 4, 3), "chunk": (128, 64, 8, 3)},
        (True, 32): {"dec": (64, 8, 3), "chunk": (64, 64, 8, 3)},
        (True, 64): {"dec": (64, 8, 3), "chunk": (32, 64, 8, 3)},
        (True, 128): {"dec": (64, 8, 2), "chunk": (32, 64, 8, 2)},
        (True, 256): {"dec": (32, 8, 2), "chunk": (16, 32, 8, 2)},
    },
}
_REDUCE_WARPS = 4


def config(D: int, dtype: torch.dtype, is_cuda: bool, rows: int, capability: tuple[int, int] = (9, 0)):
    """Launch config (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel (§6.1).

    Args:
        D: head dim; dtype: q/k/v dtype; is_cuda: CUDA (else the interpreter);
        rows: GROUP * W query rows per (row, kv head); capability: the GPU's compute
            capability (major, minor), which picks the family's table (an unknown GPU gets
            sm_86's, searched under the smallest shared memory).
    Returns:
        (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M = 16 when rows <= 16, else the
        "chunk" tile; BLOCK_N in tokens (a key tile may hold several pages or part of one:
        the page size does not change the tiles).
    """
    if not is_cuda:
        # Interpreter: small tiles keep numpy temporaries small; 32-token key tiles hold two
        # pages of 16 or half a page of 64, so the tests cover both kinds of tile.
        return (16 if rows <= 16 else 64), 32, 4, 1
    table = _CUDA_CONFIGS[arch_family(capability)][(dtype == torch.float32, D)]
    if rows <= 16:
        bn, warps, stages = table["dec"]
        bm = 16
    else:
        bm, bn, warps, stages = table["chunk"]
    return bm, bn, warps, stages


def choose_num_splits(batch: int, kv_heads: int, max_context: int, page_size: int, num_sms: int, *,
                      block_n: int | None = None, query_tiles: int = 1, waves: int = 2,
                      max_splits: int = MAX_SPLITS) -> int:
    """How many KV splits a paged-attention call uses (flash-decoding), pure Python (§6.1).

    Without splits the grid has batch * kv_heads * query_tiles programs; a decode step of a
    few sequences leaves most SMs idle while each program walks a long context alone. The
    heuristic splits each row's key tiles into contiguous ranges so that the grid reaches
    `waves` programs per SM, but never into more ranges than the longest row has key tiles
    (an empty split is pure overhead), and never more than max_splits (what the reduce
    combines). A grid that already fills the device gets 1: no reduce, no scratch.

        splits = 1                                            if programs >= waves * num_sms
               = min(ceil(waves * num_sms / programs), ceil(max_context / block_n), max_splits)

    Args:
        batch: sequences in the call; kv_heads: K/V heads (one program per GQA group);
        max_context: longest context in tokens (an upper bound is fine, e.g. the page
            table's capacity); page_size: tokens per page; num_sms: streaming
            multiprocessors of the device (1 for the interpreter);
        block_n: tokens per key tile of the kernel, the unit a split is made of (default
            page_size; paged_attention passes its BLOCK_N, which may span several pages or
            part of one);
        query_tiles: query tiles per (row, kv head) (1 for decode);
        waves: target programs per SM; max_splits: upper bound.
    Returns:
        num_splits, an int in [1, max_splits].
    Raises:
        ValueError: a non-positive argument (max_context may be 0).
    """
    block_n = page_size if block_n is None else block_n
    for name, val in (("batch", batch), ("kv_heads", kv_heads), ("page_size", page_size), ("num_sms", num_sms),
                      ("block_n", block_n), ("query_tiles", query_tiles), ("waves", waves),
                      ("max_splits", max_splits)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"choose_num_splits: {name} must be an int >= 1, got {val!r}")
    if not isinstance(max_context, int) or max_context < 0:
        raise ValueError(f"choose_num_splits: max_context must be an int >= 0, got {max_context!r}")
    programs = batch * kv_heads * query_tiles
    target = waves * num_sms
    if programs >= target:
        return 1
    tiles = max(1, -(-max_context // block_n))
    return min(-(-target // programs), tiles, max_splits)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (0, 0)


def _validate(name, q, k_cache, v_cache, page_table, context_lens, query_lens, page_size, kernel):
    tensors = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("page_table", page_table),
               ("context_lens", context_lens), ("query_lens", query_lens))
    for t_name, t in tensors:
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {t_name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"{name}: q must be 4-D [B, Hq, W, D], got {tuple(q.shape)}")
    B, Hq, W, D = q.shape
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape or k_cache.shape[2] != D:
        raise ValueError(f"{name}: k_cache and v_cache must both be [Hkv, num_slots, D={D}], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    Hkv, num_slots = k_cache.shape[0], k_cache.shape[1]
    if B == 0 or Hq == 0 or W == 0 or Hkv == 0:
        raise ValueError(f"{name}: empty input: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"{name}: query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if W > MAX_QUERY_LEN:
        raise ValueError(f"{name}: query chunk W={W} > {MAX_QUERY_LEN}; prefill longer chunks with "
                         "memento_flash_attention (q_pos/k_pos) on the gathered K/V")
    if D not in _SUPPORTED_D:
        raise ValueError(f"{name}: head dim {D} unsupported; use 16, 32, 64, 128 or 256")
    if q.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {q.dtype} unsupported; use float32, bfloat16 or float16")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"{name}: q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"{name}: page_size must be a positive int, got {page_size!r}")
    if kernel and (page_size < 16 or page_size & (page_size - 1)):
        raise ValueError(f"{name}: page_size {page_size} unsupported by the kernel (needs a power of two >= 16); "
                         "use the gathered path (kv_cache update + memento_attention.attention) for this cache")
    if num_slots % page_size != 0:
        raise ValueError(f"{name}: num_slots ({num_slots}) must be a multiple of page_size ({page_size})")
    if page_table.dim() != 2 or page_table.shape[0] != B or page_table.shape[1] < 1:
        raise ValueError(f"{name}: page_table must be [B={B}, max_pages>=1], got {tuple(page_table.shape)}")
    for t_name, t in (("context_lens", context_lens), ("query_lens", query_lens)):
        if t is not None and tuple(t.shape) != (B,):
            raise ValueError(f"{name}: {t_name} must be [B={B}], got {tuple(t.shape)}")
    for t_name, t in (("page_table", page_table), ("context_lens", context_lens), ("query_lens", query_lens)):
        if t is not None and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            raise ValueError(f"{name}: {t_name} must be an integer tensor (int32 preferred), got {t.dtype}")
    devs = {t.device for _, t in tensors if t is not None}
    if len(devs) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devs))}")
    if kernel and not q.is_cuda and not _INTERPRET:
        raise ValueError(f"{name}: {q.device} tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
                         "importing triton), or use paged_attention_reference off CUDA")


def _check_values(name, page_table, context_lens, query_lens, W, page_size, num_pages):
    # Reads the int tensors on the host: a device sync on CUDA, hence opt-in there.
    ctx, qlen, pt = context_lens.long().cpu(), query_lens.long().cpu(), page_table.long().cpu()
    if bool((qlen < 0).any()) or bool((qlen > W).any()):
        raise ValueError(f"{name}: query_lens must lie in [0, W={W}], got {qlen.tolist()}")
    if bool((ctx < qlen).any()) or bool((ctx > pt.shape[1] * page_size).any()):
        raise ValueError(f"{name}: context_lens must lie in [query_lens, max_pages * page_size = "
                         f"{pt.shape[1] * page_size}], got {ctx.tolist()}")
    for b in range(pt.shape[0]):
        used = pt[b, :(int(ctx[b]) + page_size - 1) // page_size]
        if bool((used < 0).any()) or bool((used >= num_pages).any()):
            raise ValueError(f"{name}: page_table row {b} holds page ids outside [0, {num_pages}): {used.tolist()}")


def _int32(t):
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def paged_attention(q, k_cache, v_cache, page_table, context_lens, query_lens=None, *, page_size, sm_scale=None,
                    num_splits=None, max_context=None, check_values=None, hide=None):
    """Causal attention of a decode step or a short query chunk over a paged KV cache (§6.1).

    Query i of row b (i < query_lens[b]) sits at context index context_lens[b] -
    query_lens[b] + i and attends keys 0..that index of its row, read in place from the pool
    through the row's page table (no gathered copy). One program per (row, kv head, KV
    split) serves every query head of the GQA group; fp32 accumulation and softmax.

    Args:
        q: [B, Hq, W, D] float32, bfloat16 or float16 queries (RoPE applied), 1 <= W <= 16;
            row b uses its first query_lens[b] positions. D in 16, 32, 64, 128, 256.
        k_cache, v_cache: [Hkv, num_slots, D] one layer of the pool, same dtype as q, last dim
            contiguous (other strides free); num_slots a multiple of page_size. Hq must be a
            multiple of Hkv (query head h reads kv head h // (Hq // Hkv)). The keys/values of
            this step's queries must already be in the pool.
        page_table: [B, max_pages] integer tensor (int32 preferred): page ids of row b, in
            token order; entries past the row's last page are never read.
        context_lens: [B] integer tensor, tokens held by each row, this step's queries
            included (0 <= query_lens[b] <= context_lens[b] <= max_pages * page_size).
        query_lens: [B] integer tensor in [0, W], or None for W everywhere.
        page_size: tokens per page, a power of two >= 16.
        sm_scale: softmax scale on q.k; default 1 / sqrt(D).
        num_splits: KV splits per row (1..16; 1 = no split, no reduce kernel); default
            choose_num_splits for this device.
        max_context: upper bound in tokens on context_lens, for the split heuristic only;
            default max_pages * page_size (no device sync).
        check_values: check query_lens, context_lens and the used page ids on the host (a
            device sync); default True off CUDA, False on CUDA.
        hide: [B, 2] integer tensor or None: row b's keys at context indices hide[b, 0] ..
            hide[b, 1] (inclusive; an empty range when the first exceeds the second) are
            hidden from its queries. The engine's asynchronous steps hide a block whose
            memento the token being fed completes, one step before it is evicted (§6.1).
    Returns:
        [B, Hq, W, D] in q's dtype; padded query positions (i >= query_lens[b]) are 0.
    Raises:
        ValueError: wrong ranks, shapes or dtypes (q/k/v must share fp32/bf16/fp16; the int
            tensors must be integer), W > 16, D unsupported, page_size not a power of two
            >= 16 (use the gathered path for such caches), num_slots not a multiple of
            page_size, mixed devices, CPU tensors without TRITON_INTERPRET=1 at import,
            num_splits outside 1..16, and, when checked, out-of-range lengths or page ids.
    """
    name = "paged_attention"
    _validate(name, q, k_cache, v_cache, page_table, context_lens, query_lens, page_size, kernel=True)
    B, Hq, W, D = q.shape
    Hkv = k_cache.shape[0]
    group = Hq // Hkv
    if query_lens is None:
        query_lens = torch.full((B,), W, dtype=torch.int32, device=q.device)
    if check_values is None:
        check_values = not q.is_cuda
    if check_values:
        _check_values(name, page_table, context_lens, query_lens, W, page_size, k_cache.shape[1] // page_size)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    bm, bn, warps, stages = config(D, q.dtype, q.is_cuda, group * W, _capability(q))
    m_tiles = triton.cdiv(group * W, bm)
    if num_splits is None:
        cap = max_context if max_context is not None else page_table.shape[1] * page_size
        num_splits = choose_num_splits(B, Hkv, int(cap), page_size, _num_sms(q.device), block_n=bn,
                                       query_tiles=m_tiles)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"{name}: num_splits must be an int in 1..{MAX_SPLITS}, got {num_splits!r}")

    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{name}: k_cache and v_cache need a contiguous last dim (strides "
                         f"{k_cache.stride()}, {v_cache.stride()}); copying the pool per call would defeat paging")
    page_table, context_lens, query_lens = _int32(page_table), _int32(context_lens), _int32(query_lens)
    if hide is not None:
        if tuple(hide.shape) != (B, 2) or hide.dtype.is_floating_point or hide.device != q.device:
            raise ValueError(f"{name}: hide must be an integer [B={B}, 2] tensor on {q.device}, got "
                             f"{tuple(hide.shape)} {hide.dtype} on {hide.device}")
        hide = _int32(hide)
    out = torch.empty_like(q)
    split = num_splits > 1
    if split:
        o_part = torch.empty((B, Hq, W, num_splits, D), device=q.device, dtype=torch.float32)
        m_part = torch.empty((B, Hq, W, num_splits), device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
    else:
        o_part = m_part = l_part = out  # not read: SPLIT is off
    _paged_fwd_kernel[(B * Hkv, num_splits, m_tiles)](
        q, k_cache, v_cache, page_table, context_lens, query_lens, context_lens if hide is None else hide, out, o_part,
        m_part, l_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        page_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        Hkv, group, W, num_splits, float(sm_scale) * _LOG2E,
        PAGE=page_size, HEAD_D=D, BLOCK_M=bm, BLOCK_N=bn, SPLIT=split, HAS_HIDE=hide is not None,
        UPCAST=q.dtype == torch.bfloat16 and not q.is_cuda, IEEE=q.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )
    if split:
        _paged_reduce_kernel[(B * Hq * W,)](
            o_part, m_part, l_part, out,
            out.stride(0), out.stride(1), out.stride(2),
            Hq, W, num_splits,
            HEAD_D=D, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=_REDUCE_WARPS,
        )
    return out


def paged_attention_reference(q, k_cache, v_cache, page_table, context_lens, query_lens=None, *, page_size,
                              sm_scale=None, hide=None):
    """Pure-PyTorch paged attention: the oracle paged_attention is tested against (§6.1).

    Same arguments, semantics and result as paged_attention (without num_splits; hide as
    there), computed the plain way, one row at a time: gather the row's keys and values through its page
    table, repeat them for the GQA group, dense causal softmax in fp32. Any page_size >= 1
    works here. Values are always checked (on the host).

    Returns:
        [B, Hq, W, D] in q's dtype, zeros at padded query positions.
    Raises:
        ValueError: as paged_attention, except the page-size and interpreter rules.
    """
    name = "paged_attention_reference"
    _validate(name, q, k_cache, v_cache, page_table, context_lens, query_lens, page_size, kernel=False)
    B, Hq, W, D = q.shape
    group = Hq // k_cache.shape[0]
    if query_lens is None:
        query_lens = torch.full((B,), W, dtype=torch.int64)
    _check_values(name, page_table, context_lens, query_lens, W, page_size, k_cache.shape[1] // page_size)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    out = torch.zeros(B, Hq, W, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n, nq = int(context_lens[b]), int(query_lens[b])
        if nq == 0:
            continue
        j = torch.arange(n, device=q.device)
        slots = page_table[b].long()[j // page_size] * page_size + j % page_size
        k = k_cache[:, slots].float().repeat_interleave(group, dim=0)  # [Hq, n, D]
        v = v_cache[:, slots].float().repeat_interleave(group, dim=0)
        qb = q[b, :, :nq].float()  # [Hq, nq, D]
        scores = qb @ k.transpose(1, 2) * scale
        qpos = n - nq + torch.arange(nq, device=q.device)
        scores = scores.masked_fill(j[None, None, :] > qpos[None, :, None], float("-inf"))
        if hide is not None:
            lo, hi = int(hide[b, 0]), int(hide[b, 1])
            scores = scores.masked_fill((j >= lo) & (j <= hi), float("-inf"))
        out[b, :, :nq] = torch.softmax(scores, dim=-1) @ v
    return out.to(q.dtype)
