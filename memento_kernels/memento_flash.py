"""Block-masked flash attention for MEMENTO training and prefill (paper §4, §6.1).

Stage-2 training attends under the memento visibility rule

    key j is visible to query i  iff  j <= i < mask_from[b, j]

(queries and keys are the same T tokens; mask_from[b, j] == NEVER == 2**31 - 1 means key j
is never masked). The paper materialised this as a dense [T, T] boolean mask for SDPA. Here
the rule is evaluated from the O(T) vector `mask_from`, and whole tiles of the score matrix
are classified before any kernel runs:

    skip     every (query, key) pair of the tile is invisible: never visited, K/V never loaded;
    full     every pair is visible: no element-wise mask at all;
    partial  the rest (the causal diagonal, and the edges of evicted blocks).

The host turns the classification into lists, as FlexAttention's block masks do: for each
query tile the key tiles that are full and those that are partial (for the dK/dV kernel, per
key tile, the query tiles), stored compressed (O(tiles visited), csr_lists) in a TileMask
built once per batch and shared by every layer, its backward and its recompute. Each kernel then runs two branch-free loops over its lists, the
partial one with the element mask and the full one without, through one inner loop shared by
both. With no data-dependent branch around the loads, Triton software-pipelines the loops
(asynchronous copies of the next tiles while the current one is multiplied; checked by
bench/compile_check.py and tests/test_kernel.py at compile time, without a GPU).

In OpenMementos-shaped traces (~1,150-token blocks, ~194-token mementos, keep_last_n_blocks=0)
the share of skipped causal tiles grows with length: about 46% at 4K tokens and 77% at 32K
(128 x 64 tiles; bench/bench_attention.py reports it), so the work tracks the visible pairs
rather than the causal triangle.

Inference uses the same forward kernel with explicit logical positions: a chunk of queries
(a prompt being prefilled, a replayed chunk, a memento recomputed in restart mode) against
the keys left in a compacted KV cache, where the rule reads pos[j] <= pos[i] < mask_from[j]
and tiles are classified from per-tile position bounds instead of indices (§6.1).

Public API:
    memento_flash_attention(q, k, v, mask_from, sm_scale=None, q_pos=, k_pos=) -> out
    key_tile_bounds(mask_from, T, block_n) -> (kmax, kmin)                (tile summary)
    key_position_bounds(k_pos, T, block_n) -> (kpmin, kpmax)              (cache keys)
    tile_schedule(mask_from, T, block_m, block_n) -> [B, nQ, nK] int8    (SKIP/FULL/PARTIAL)
    tile_lists(schedule) -> (full_num, full_idx, part_num, part_idx)      (dense lists: the reference)
    csr_lists(schedule) -> (num, start, idx) x (full, partial)           (what kernels iterate)
    TileMask(mask_from)                                                  (all lists, once per batch)
    tile_stats(mask_from, T, block_m, block_n) -> dict                   (skipped fraction)

Runs natively on CUDA; on CPU only under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is imported), which is slow and meant for tests.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from blocks import NEVER  # one sentinel for the whole repository
_INT32_MIN = -(2**31)

# Tile classes returned by tile_schedule.
SKIP, FULL, PARTIAL = 0, 1, 2

_SUPPORTED_D = (16, 32, 64, 128, 256)
# @triton.jit picks the interpreter when the kernels are defined, so what counts is the
# environment at import time, not at call time.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# Tile predicate, evaluated on the host (torch tensors) for every (query tile, key tile).
#
# In logical positions: a query tile holds positions [q_min, q_max] (padding rows do not
# count); a key tile holds positions [kp_min, kp_max] (kp_max counts padding columns as
# beyond every query, so a tile with padding is never "full": full tiles load K/V without
# bounds checks) and mf_max / mf_min are the max / min of mask_from over its real columns.
# Training has positions 0..T-1, so q_min = q_start, q_max = q_last, kp_min = k_start and
# kp_max = k_start + BLOCK_N - 1.
# ---------------------------------------------------------------------------------------
def _tile_skipped(q_min, q_max, kp_min, mf_max):
    # Query i sees key j only if i < mask_from[j] <= mf_max; the smallest query of the tile
    # is q_min, so q_min >= mf_max hides every key from every query. The second clause is
    # causality: the tile's first key comes after its last query.
    return (q_min >= mf_max) | (kp_min > q_max)


def _tile_full(q_min, q_max, kp_max, mf_min):
    # Causal for every pair iff the last key is at most the first query; never masked for
    # every pair iff the last query still comes before the earliest mask_from of the tile.
    return (kp_max <= q_min) & (q_max < mf_min)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # acc + a @ b with fp32 accumulation.
    # UPCAST: the Triton interpreter stores bf16 as uint16 and its dot multiplies those bit
    # patterns (triton-lang/triton#11584, unsupported upstream), so under the interpreter
    # bf16 operands are widened first. bf16 x bf16 products are exact in fp32, so this
    # matches what the tensor cores compute; it is never set for CUDA tensors.
    # IEEE: fp32 inputs would otherwise go through TF32 on the GPU (~1e-3 relative error);
    # this project wants fp32 to mean fp32.
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def row_offsets(rows, stride):
    """rows * stride in int64: the element offset of each row. In the model's layout a token's
    row is Hq * D elements from the next, so int32 would wrap once T * Hq * D >= 2**31 (512K
    tokens at 32 x 128 heads); every row offset of both kernel files goes through here. Paper §4."""
    return rows.to(tl.int64) * stride


@triton.jit
def program_tile(T, BLOCK: tl.constexpr):
    """(tile, batch x head) of this program. The grid is one axis of cdiv(T, BLOCK) x B x H
    programs, tiles of one head consecutive as a 2-D grid would order them: CUDA allows 2**31 - 1
    programs on the first axis but 65,535 on the others, which B x H could pass. Paper §4."""
    n = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    return pid % n, pid // n


# ---------------------------------------------------------------------------------------
# The inner step shared by the forward and dQ loops: load one key tile, score it.
# ---------------------------------------------------------------------------------------
@triton.jit
def load_and_score(q, k_base, v_base, rows, ok, s_k, s_v, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """kT [D, BLOCK_N], v [BLOCK_N, D] of the keys at rows [BLOCK_N] (row indices into k_base /
    v_base, whose rows are s_k / s_v elements apart), and s = q k^T * qk_scale [BLOCK_M,
    BLOCK_N]. MASKED: load only where ok [BLOCK_N] (0 elsewhere); an unmasked tile has no
    bounds check, so that Triton pipelines its loads. Shared with memento_kernels/paged_attention.py."""
    offs_d = tl.arange(0, HEAD_D)
    if MASKED:
        kT = tl.load(k_base + row_offsets(rows, s_k)[None, :] + offs_d[:, None], mask=ok[None, :], other=0.0)
        v = tl.load(v_base + row_offsets(rows, s_v)[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
    else:
        kT = tl.load(k_base + row_offsets(rows, s_k)[None, :] + offs_d[:, None])
        v = tl.load(v_base + row_offsets(rows, s_v)[:, None] + offs_d[None, :])
    s = _mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, IEEE) * qk_scale
    return kT, v, s


@triton.jit
def _key_tile_scores(q, qp, k_base, v_base, mf_base, kp_base, kt, s_kt, s_vt, TK, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                     MASKED: tl.constexpr, HAS_POS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Returns kT [D, BLOCK_N], v [BLOCK_N, D] and the scores s = q k^T * qk_scale [BLOCK_M,
    # BLOCK_N] (base 2), -inf where the rule hides the pair. MASKED: a partial tile, with the
    # element mask and bounds checks; a full tile needs neither (it never reaches past TK).
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < TK
    kT, v, s = load_and_score(q, k_base, v_base, offs_n, col_ok, s_kt, s_vt, qk_scale, BLOCK_M, BLOCK_N, HEAD_D,
                              MASKED, UPCAST, IEEE)
    if MASKED:
        mf = tl.load(mf_base + offs_n, mask=col_ok, other=0)
        if HAS_POS:
            kp = tl.load(kp_base + offs_n, mask=col_ok, other=0)
        else:
            kp = offs_n
        vis = (kp[None, :] <= qp[:, None]) & (qp[:, None] < mf[None, :]) & col_ok[None, :]
        s = tl.where(vis, s, float("-inf"))
    return kT, v, s


# ---------------------------------------------------------------------------------------
# Forward.
#
# Online softmax, in base 2 (exp2 is the native instruction; qk_scale folds in log2 e). For
# each row keep m = running max of the scaled scores, l = sum of exp2(s - m) and acc = sum of
# exp2(s - m) * v. A new tile with row max m' rescales the old sums by alpha = exp2(m - m'),
# so after the last tile out = acc / l and the row's log-sum-exp (base 2) is m + log2(l),
# which the backward uses to rebuild P without a second pass. The order of the tiles does
# not matter, so the partial tiles go first and the full ones after.
#
# A row that has seen only masked scores has m = -inf, and exp2(-inf - -inf) would be NaN.
# The shift m_shift is therefore 0 while m is still -inf: every p is exp2(-inf) = 0 and the
# row stays (m=-inf, l=0, acc=0). Such a row survives to the end only if its query sees no
# key at all (mask_from[i] <= i, impossible for valid inputs); it then gets out = 0, like the
# dense reference, and lse = +inf, which makes its P (hence all its gradients) exactly 0.
# ---------------------------------------------------------------------------------------
@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Fold one key tile (scores s [BLOCK_M, BLOCK_N] in base 2, values v [BLOCK_N, D]) into
    the running (acc, l, m) of every query row; the step every forward loop here and in
    memento_kernels/paged_attention.py takes."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # P is rounded to V's dtype for the tensor cores, as in every flash kernel.
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, qp, k_base, v_base, mf_base, kp_base, idx_base, n_tiles, s_kt, s_vt, TK, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr,
               HAS_POS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    for i in range(0, n_tiles):
        kt = tl.load(idx_base + i)
        kT, v, s = _key_tile_scores(q, qp, k_base, v_base, mf_base, kp_base, kt, s_kt, s_vt, TK, qk_scale,
                                    BLOCK_M, BLOCK_N, HEAD_D, MASKED, HAS_POS, UPCAST, IEEE)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, UPCAST, IEEE)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, MF, O, LSE, QPOS, KPOS, FULL_NUM, FULL_START, FULL_IDX, PART_NUM, PART_START, PART_IDX,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_kt,
    s_vb, s_vh, s_vt,
    s_ob, s_oh, s_ot,
    s_mb, s_pqb, s_pkb, s_nb,
    TQ, TK, H, GROUP, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_POS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # HAS_POS: queries and keys carry explicit logical positions (QPOS [B, TQ], KPOS [B, TK]):
    # a chunk of queries against a compacted KV cache, where keys are cache slots (gaps where
    # blocks were evicted, EMPTY slots with mask_from = -1). Without it queries and keys are
    # the same TQ = TK tokens at 0..T-1. The tile lists hold this query tile's full and
    # partial key tiles (FULL_IDX[FULL_START[b, m]:][:FULL_NUM[b, m]], likewise PART_*).
    pid_m, pid_bh = program_tile(TQ, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    # GQA: the query head reads its key/value head in place; nothing is repeated in memory.
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < TQ
    b64 = b.to(tl.int64)
    if HAS_POS:
        qp = tl.load(QPOS + b64 * s_pqb + offs_m, mask=row_ok, other=0)
    else:
        qp = offs_m
    q = tl.load(Q + b64 * s_qb + h.to(tl.int64) * s_qh + row_offsets(offs_m, s_qt)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b64 * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b64 * s_vb + hk.to(tl.int64) * s_vh
    mf_base = MF + b64 * s_mb
    kp_base = KPOS + b64 * s_pkb
    counts = b64 * s_nb + pid_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qp, k_base, v_base, mf_base, kp_base,
                               PART_IDX + tl.load(PART_START + counts), tl.load(PART_NUM + counts), s_kt, s_vt, TK,
                               qk_scale, BLOCK_M, BLOCK_N, HEAD_D, True, HAS_POS, UPCAST, IEEE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qp, k_base, v_base, mf_base, kp_base,
                               FULL_IDX + tl.load(FULL_START + counts), tl.load(FULL_NUM + counts), s_kt, s_vt, TK,
                               qk_scale,
                               BLOCK_M, BLOCK_N, HEAD_D, False, HAS_POS, UPCAST, IEEE)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(O + b64 * s_ob + h.to(tl.int64) * s_oh + row_offsets(offs_m, s_ot)[:, None] + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * TQ + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------
# Backward (FlashAttention-2 scheme).
#
# With s = sm_scale * q k^T, P = softmax(s), O = P V and upstream gradient dO:
#     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   delta_i = sum_d dO_id O_id,
#     dQ = sm_scale * dS K,   dK = sm_scale * dS^T Q.
# delta_i equals rowsum(P * dP) and is computed once from O (preprocess kernel). P is
# rebuilt tile by tile as exp2(s * log2 e - lse2) from the forward's base-2 log-sum-exp.
# Masked pairs have P = 0, hence dS = 0: skipped tiles contribute nothing to any gradient,
# so the backward kernels visit exactly the tiles the forward visits.
# ---------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    s_ob, s_oh, s_ot,
    s_db, s_dh, s_dt,
    T, H,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m, pid_bh = program_tile(T, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T
    o = tl.load(O + b * s_ob + h * s_oh + row_offsets(offs_m, s_ot)[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + row_offsets(offs_m, s_dt)[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, mf, offs_n, col_ok, q_base, do_base, lse_base, delta_base, idx_base, n_tiles,
                s_qt, s_dt, T, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Work on the transposed tile (keys x queries) so the products land directly in dK and
    # dV's row layout. Rows past T (only in the last query tile) load as zeros with lse =
    # +inf, so their P is 0 even in full tiles.
    offs_d = tl.arange(0, HEAD_D)
    for i in range(0, n_tiles):
        qt = tl.load(idx_base + i)
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        qT = tl.load(q_base + row_offsets(offs_m, s_qt)[None, :] + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + row_offsets(offs_m, s_dt)[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        sT = _mma(k, qT, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, IEEE) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            vis = (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < mf[:, None]) & col_ok[:, None]
            pT = tl.where(vis, pT, 0.0)
        dv = _mma(pT.to(do.dtype), do, dv, UPCAST, IEEE)
        dpT = _mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, IEEE)
        dsT = pT * (dpT - delta[None, :])
        dk = _mma(dsT.to(qT.dtype), tl.trans(qT), dk, UPCAST, IEEE)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, MF, LSE, DELTA, DK, DV, FULL_NUM, FULL_START, FULL_IDX, PART_NUM, PART_START, PART_IDX,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_kt,
    s_vb, s_vh, s_vt,
    s_db, s_dh, s_dt,
    s_dkb, s_dkh, s_dkt,
    s_dvb, s_dvh, s_dvt,
    s_mb, s_nb,
    T, H, HKV, GROUP, sm_scale, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # One program owns one key tile of one KV head and sweeps the query tiles of every
    # query head in its GQA group, so dK/dV of the shared head are summed in registers and
    # written once: no atomics, no per-query-head copies. Its lists hold the query tiles
    # that see this key tile, partially or fully.
    pid_n, pid_bh = program_tile(T, BLOCK_N)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b64 = b.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_n < T
    k = tl.load(K + b64 * s_kb + hk.to(tl.int64) * s_kh + row_offsets(offs_n, s_kt)[:, None] + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b64 * s_vb + hk.to(tl.int64) * s_vh + row_offsets(offs_n, s_vt)[:, None] + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    mf = tl.load(MF + b64 * s_mb + offs_n, mask=col_ok, other=0)
    counts = b64 * s_nb + pid_n
    n_part, part = tl.load(PART_NUM + counts), PART_IDX + tl.load(PART_START + counts)
    n_full, full = tl.load(FULL_NUM + counts), FULL_IDX + tl.load(FULL_START + counts)

    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b64 * H + h
        q_base = Q + b64 * s_qb + h.to(tl.int64) * s_qh
        do_base = DO + b64 * s_db + h.to(tl.int64) * s_dh
        dk, dv = _dkdv_inner(dk, dv, k, v, mf, offs_n, col_ok, q_base, do_base, LSE + bh * T, DELTA + bh * T,
                             part, n_part, s_qt, s_dt, T, qk_scale, BLOCK_M, BLOCK_N, HEAD_D, True,
                             UPCAST, IEEE)
        dk, dv = _dkdv_inner(dk, dv, k, v, mf, offs_n, col_ok, q_base, do_base, LSE + bh * T, DELTA + bh * T,
                             full, n_full, s_qt, s_dt, T, qk_scale, BLOCK_M, BLOCK_N, HEAD_D, False,
                             UPCAST, IEEE)

    dk = dk * sm_scale
    tl.store(DK + b64 * s_dkb + hk.to(tl.int64) * s_dkh + row_offsets(offs_n, s_dkt)[:, None] + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b64 * s_dvb + hk.to(tl.int64) * s_dvh + row_offsets(offs_n, s_dvt)[:, None] + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, qp, k_base, v_base, mf_base, idx_base, n_tiles, s_kt, s_vt, T, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    for i in range(0, n_tiles):
        kt = tl.load(idx_base + i)
        kT, v, s = _key_tile_scores(q, qp, k_base, v_base, mf_base, mf_base, kt, s_kt, s_vt, T, qk_scale,
                                    BLOCK_M, BLOCK_N, HEAD_D, MASKED, False, UPCAST, IEEE)
        p = tl.math.exp2(s - lse[:, None])  # masked pairs have s = -inf: p = 0
        dp = _mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, UPCAST, IEEE)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, MF, LSE, DELTA, DQ, FULL_NUM, FULL_START, FULL_IDX, PART_NUM, PART_START, PART_IDX,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_kt,
    s_vb, s_vh, s_vt,
    s_db, s_dh, s_dt,
    s_dqb, s_dqh, s_dqt,
    s_mb, s_nb,
    T, H, GROUP, sm_scale, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # One program owns one query tile of one query head and walks its key-tile lists like
    # the forward, through the same inner step.
    pid_m, pid_bh = program_tile(T, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T
    q = tl.load(Q + b64 * s_qb + h.to(tl.int64) * s_qh + row_offsets(offs_m, s_qt)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b64 * s_db + h.to(tl.int64) * s_dh + row_offsets(offs_m, s_dt)[:, None] + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b64 * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b64 * s_vb + hk.to(tl.int64) * s_vh
    mf_base = MF + b64 * s_mb
    counts = b64 * s_nb + pid_m

    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, mf_base, PART_IDX + tl.load(PART_START + counts),
                   tl.load(PART_NUM + counts), s_kt, s_vt, T, qk_scale, BLOCK_M, BLOCK_N, HEAD_D, True, UPCAST, IEEE)
    dq = _dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, mf_base, FULL_IDX + tl.load(FULL_START + counts),
                   tl.load(FULL_NUM + counts), s_kt, s_vt, T, qk_scale, BLOCK_M, BLOCK_N, HEAD_D, False, UPCAST, IEEE)
    dq = dq * sm_scale
    tl.store(DQ + b64 * s_dqb + h.to(tl.int64) * s_dqh + row_offsets(offs_m, s_dqt)[:, None] + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------
def _tile_reduce(x: torch.Tensor, T: int, block: int, pad_max: int, pad_min: int):
    # Per tile of `block` columns: (max, min) of x [B, >=T] over columns < T, padding columns
    # standing in as pad_max / pad_min; int64, clamped to the int32 range.
    B = x.shape[0]
    n = triton.cdiv(T, block)
    xs = x[:, :T].to(torch.int64)
    padded_max = torch.full((B, n * block), pad_max, dtype=torch.int64, device=xs.device)
    padded_min = torch.full((B, n * block), pad_min, dtype=torch.int64, device=xs.device)
    padded_max[:, :T] = xs
    padded_min[:, :T] = xs
    hi = padded_max.view(B, n, block).amax(-1).clamp(_INT32_MIN, NEVER)
    lo = padded_min.view(B, n, block).amin(-1).clamp(_INT32_MIN, NEVER)
    return hi, lo


def key_tile_bounds(mask_from: torch.Tensor, T: int, block_n: int):
    """Per-key-tile max and min of mask_from: the two numbers the tile predicate reads (§4).

    Args:
        mask_from: [B, T] integer tensor (any integer dtype), first query position from which
            each key is masked; NEVER (2**31 - 1) = never.
        T: sequence length (number of keys).
        block_n: key tile size in tokens.
    Returns:
        (kmax, kmin), each [B, ceil(T / block_n)] int32 on mask_from's device: max and min of
        mask_from over the real keys of each tile (padding past T is ignored).
    Raises:
        ValueError: mask_from not 2-D or shorter than T, T < 1, or block_n not a positive int.
    """
    if mask_from.dim() != 2 or mask_from.shape[1] < T or T < 1:
        raise ValueError(f"key_tile_bounds: mask_from must be [B, >=T] with T >= 1, got {tuple(mask_from.shape)} and T={T}")
    if not isinstance(block_n, int) or block_n < 1:
        raise ValueError(f"key_tile_bounds: block_n must be a positive int, got {block_n!r}")
    hi, lo = _tile_reduce(mask_from, T, block_n, pad_max=_INT32_MIN, pad_min=NEVER)
    return hi.to(torch.int32), lo.to(torch.int32)


def key_position_bounds(k_pos: torch.Tensor, T: int, block_n: int):
    """Per-key-tile (min, max) logical position, for keys that are KV-cache slots (§6.1).

    Args:
        k_pos: [B, T] integer tensor, logical position of each key slot.
        T: number of keys; block_n: key tile size in tokens.
    Returns:
        (kpmin, kpmax), each [B, ceil(T / block_n)] int32: the smallest position of the tile's
        real keys, and the largest, or NEVER when the tile has padding columns past T (so the
        predicate never calls such a tile "full", which would skip the column bound check).
    Raises:
        ValueError: as key_tile_bounds.
    """
    if k_pos.dim() != 2 or k_pos.shape[1] < T or T < 1 or not isinstance(block_n, int) or block_n < 1:
        raise ValueError(f"key_position_bounds: k_pos must be [B, >=T] with T >= 1 and block_n a positive int, "
                         f"got {tuple(k_pos.shape)}, T={T}, block_n={block_n!r}")
    kpmax, kpmin = _tile_reduce(k_pos, T, block_n, pad_max=NEVER, pad_min=NEVER)
    return kpmin.to(torch.int32), kpmax.to(torch.int32)


def tile_schedule(mask_from: torch.Tensor, T: int, block_m: int, block_n: int, *,
                  q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Class of every (batch, query tile, key tile) under the memento rule (§4, §6.1).

    Without positions, queries and keys are the same T tokens (training). With q_pos [B, Tq]
    and k_pos [B, T], Tq queries at logical positions q_pos attend T key slots at k_pos (a
    KV cache). The kernels visit exactly the FULL and PARTIAL tiles (see tile_lists).

    Args:
        mask_from: [B, T] integer tensor, as for memento_flash_attention.
        T: number of keys.
        block_m, block_n: query and key tile sizes in tokens.
        q_pos, k_pos: optional integer positions (both or neither).
    Returns:
        [B, ceil(Tq / block_m), ceil(T / block_n)] int8 tensor on mask_from's device with
        values SKIP (0: no pair visible, never visited), FULL (1: every pair visible, no
        element-wise mask, no bounds checks on keys) or PARTIAL (2: element-wise mask).
    Raises:
        ValueError: as key_tile_bounds, block_m not a positive int, or one position tensor only.
    """
    if not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"tile_schedule: block_m must be a positive int, got {block_m!r}")
    if (q_pos is None) != (k_pos is None):
        raise ValueError("tile_schedule: pass both q_pos and k_pos, or neither")
    mf_max, mf_min = (t.long() for t in key_tile_bounds(mask_from, T, block_n))
    dev = mf_max.device
    nk = mf_max.shape[1]
    if q_pos is None:
        nq = triton.cdiv(T, block_m)
        q_min = torch.arange(nq, device=dev)[None, :] * block_m
        q_max = torch.clamp(q_min + block_m, max=T) - 1
        k_start = torch.arange(nk, device=dev)[None, :] * block_n
        kp_min, kp_max = k_start, k_start + block_n - 1
    else:
        Tq = q_pos.shape[1]
        q_max, q_min = _tile_reduce(q_pos, Tq, block_m, pad_max=_INT32_MIN, pad_min=NEVER)
        kp_min, kp_max = (t.long() for t in key_position_bounds(k_pos, T, block_n))
    q_min, q_max = q_min[:, :, None], q_max[:, :, None]
    skipped = _tile_skipped(q_min, q_max, kp_min[:, None, :], mf_max[:, None, :])
    full = _tile_full(q_min, q_max, kp_max[:, None, :], mf_min[:, None, :]) & ~skipped
    out = torch.full(skipped.shape, PARTIAL, dtype=torch.int8, device=dev)
    out[skipped] = SKIP
    out[full] = FULL
    return out


def tile_lists(schedule: torch.Tensor):
    """The visiting lists of a tile schedule, dense, as FlexAttention's block masks hold them:
    the readable reference csr_lists is tested against.

    Args:
        schedule: [B, R, C] int8 from tile_schedule: per row tile R (a query tile for the
            forward and dQ; for dK/dV pass schedule.transpose(1, 2), a key tile per row) the
            class of every column tile.
    Returns:
        (full_num [B, R], full_idx [B, R, C], part_num [B, R], part_idx [B, R, C]), int32,
        contiguous: row r visits columns full_idx[b, r, :full_num[b, r]] without a mask and
        part_idx[b, r, :part_num[b, r]] with one, in increasing order; SKIP tiles appear in
        neither. The work is O(B * R * C) tensor ops, on the schedule's device.
    """
    out = []
    for cls in (FULL, PARTIAL):
        hit = schedule == cls
        num = hit.sum(-1, dtype=torch.int32)
        # a stable sort of "not this class" puts this class's columns first, in order
        idx = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        out += [num.contiguous(), idx.contiguous()]
    return tuple(out)


def csr_lists(schedule: torch.Tensor):
    """The visiting lists of a tile schedule in compressed rows: memory O(tiles visited).

    Args:
        schedule: [B, R, C] int8 from tile_schedule (for dK/dV its transpose(1, 2)).
    Returns:
        (full_num, full_start, full_idx, part_num, part_start, part_idx): *_num [B, R] int32,
        *_start [B, R] int64, *_idx [visited tiles of the class] int32. Row r of batch b visits
        columns *_idx[*_start[b, r]:*_start[b, r] + *_num[b, r]], in increasing order: the
        same lists as tile_lists, without its [B, R, C] padding. One host sync (the count of
        visited tiles sizes *_idx).
    Paper §4.
    """
    out = []
    for cls in (FULL, PARTIAL):
        hit = schedule == cls
        num = hit.sum(-1, dtype=torch.int32)
        start = (torch.cumsum(num.flatten(), 0, dtype=torch.int64) - num.flatten()).view_as(num)
        idx = hit.nonzero()[:, 2].to(torch.int32)  # row-major: each row's columns, in order
        out += [num.contiguous(), start.contiguous(), idx.contiguous()]
    return tuple(out)


class TileMask:
    """One batch's memento mask, prepared once for every layer's kernels (paper §4).

    A model forward under the triton backend wraps its mask_from in one TileMask and hands it
    to every layer (memento_attention.prepare_mask); gradient checkpointing's recompute and
    the backward get the same object. The forward, dQ and dK/dV visiting lists of a launch
    config are built together on first use (`lists`) and reused by every layer after: one
    build per batch instead of three per layer, four with recompute.

    Memory: mask_from [B, T] int32, and per config three compressed list sets (csr_lists):
    O(B x row tiles) counts and starts plus O(tiles visited) indices, where the dense lists
    of tile_lists hold B x R x C. `nbytes()` reports what is held.

    The positions form (queries against a KV cache, §6.1): with q_pos [B, Tq] and k_pos [B, T]
    the lists are the forward's only, and a prefill chunk's forward builds them once for all
    its layers (kv_cache.py hands every layer the same TileMask).

    Attributes:
        mask_from: [B, T] int32 (clamped as memento_flash_attention does).
        T: tokens (keys) per row. q_pos, k_pos: int32 positions or None.
        builds: how many list sets were built (tests, benchmarks).
    Raises:
        ValueError (constructor) for a mask_from that is not a [B, T] integer tensor, or
        positions not given together.
    """

    def __init__(self, mask_from: torch.Tensor, q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None):
        if not isinstance(mask_from, torch.Tensor) or mask_from.dim() != 2 or mask_from.dtype.is_floating_point \
                or mask_from.dtype == torch.bool:
            raise ValueError("TileMask: mask_from must be a [B, T] integer tensor")
        if (q_pos is None) != (k_pos is None):
            raise ValueError("TileMask: give q_pos and k_pos together")
        self.mask_from = _int32(mask_from)
        self.q_pos = None if q_pos is None else _int32(q_pos)
        self.k_pos = None if k_pos is None else _int32(k_pos)
        self.T = mask_from.shape[1]
        self.builds = 0
        self._lists = {}

    def lists(self, cfg: dict) -> dict:
        """{kernel: csr_lists} for the launch config cfg ({"fwd"|"dq"|"dkdv": (BLOCK_M,
        BLOCK_N, warps, stages)}), built together the first time this tiling is asked for;
        dK/dV's rows are key tiles (the schedule transposed)."""
        if self.q_pos is not None:  # the positions form: the forward's list only
            key = cfg["fwd"][:2]
            if key not in self._lists:
                self._lists[key] = {"fwd": csr_lists(tile_schedule(self.mask_from, self.T, *key, q_pos=self.q_pos,
                                                                   k_pos=self.k_pos))}
                self.builds += 1
            return self._lists[key]
        key = tuple(cfg[k][:2] for k in ("fwd", "dq", "dkdv"))
        if key not in self._lists:
            schedules = {}
            for bm, bn in {cfg[k][:2] for k in ("fwd", "dq", "dkdv")}:
                schedules[bm, bn] = tile_schedule(self.mask_from, self.T, bm, bn)
            self._lists[key] = {"fwd": csr_lists(schedules[cfg["fwd"][:2]]),
                                "dq": csr_lists(schedules[cfg["dq"][:2]]),
                                "dkdv": csr_lists(schedules[cfg["dkdv"][:2]].transpose(1, 2))}
            self.builds += 1
        return self._lists[key]

    def nbytes(self) -> int:
        """Bytes held: mask_from and every list set built so far."""
        held = [self.mask_from] + [t for sets in self._lists.values() for lists in sets.values() for t in lists]
        return sum(t.numel() * t.element_size() for t in held)


def launch_grid(tiles: int, batch_heads: int) -> tuple[int]:
    """The one-axis grid of program_tile: tiles x batch_heads programs. Raises ValueError past
    CUDA's 2**31 - 1 programs on that axis (never reached below ~10^12 tokens x heads). Paper §4."""
    n = tiles * batch_heads
    if n > 2**31 - 1:
        raise ValueError(f"memento_flash_attention: {tiles} tiles x {batch_heads} batch-heads = {n} programs exceed "
                         "CUDA's 2**31 - 1; split the batch")
    return (n,)


def tile_stats(mask_from: torch.Tensor, T: int, block_m: int, block_n: int) -> dict:
    """Tile counts for one tiling, for benchmarks (§4).

    Args:
        mask_from: [B, T] integer tensor; T, block_m, block_n as for tile_schedule.
    Returns:
        dict with integer counts `causal_tiles` (tiles not excluded by causality alone),
        `skipped` (those of them skipped by the memento rule), `full`, `partial`, and
        `skipped_fraction` = skipped / causal_tiles (0.0 for pure causal attention).
        Counts are summed over the batch.
    Raises:
        ValueError: as tile_schedule.
    """
    sched = tile_schedule(mask_from, T, block_m, block_n)
    nq, nk = sched.shape[1], sched.shape[2]
    q_start = torch.arange(nq)[:, None] * block_m
    q_last = torch.clamp(q_start + block_m, max=T) - 1
    k_start = torch.arange(nk)[None, :] * block_n
    causal = (k_start <= q_last).to(sched.device)  # the causal clause of _tile_skipped
    n_causal = int(causal.sum()) * sched.shape[0]
    skipped = int(((sched == SKIP) & causal).sum())
    full = int((sched == FULL).sum())
    partial = int((sched == PARTIAL).sum())
    return {
        "causal_tiles": n_causal,
        "skipped": skipped,
        "full": full,
        "partial": partial,
        "skipped_fraction": skipped / max(n_causal, 1),
    }


# Shared memory per block (the opt-in maximum), bytes, of each architecture family: what its
# config table below was searched under. sm_80: A100 (and sm_87); sm_86: the 8.6 / 8.9 GPUs
# (RTX 30/40, A10, L4, L40); sm_90: H100 / H200; sm_100: B200 / GB200 (and 10.x); sm_120:
# consumer Blackwell (RTX 50) and 12.x.
ARCH_SMEM = {"sm_80": 166912, "sm_86": 101376, "sm_90": 232448, "sm_100": 232448, "sm_120": 101376}


def arch_family(capability: tuple[int, int]) -> str:
    """The config-table family of a CUDA compute capability (major, minor); an unknown one
    gets sm_86's table, searched under the smallest shared memory of the families (99 KB). Paper §4."""
    major, minor = capability
    if major == 8:
        return "sm_80" if minor in (0, 7) else "sm_86"
    return {9: "sm_90", 10: "sm_100", 12: "sm_120"}.get(major, "sm_86")


# Default CUDA launch configs {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)} per family
# and (fp32?, head dim). Picked without a GPU by `bench/compile_check.py --search --arch N`:
# for each kernel the first of its candidates, largest tiles first, that compiles
# software-pipelined, without register spills and within the family's ARCH_SMEM, under both
# Triton 3.7 (what torch 2.13's CUDA wheels bring, and CI's lock) and 3.9 (spills differ between
# them: nine rows were searched again so that both pass). fp16 uses the bf16 rows. Starting
# points for tuning, not timed numbers.
_CUDA_CONFIGS = {
    "sm_80": {
        (False, 16): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 32): {"fwd": (128, 64, 8, 2), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 64): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 128): {"fwd": (128, 64, 8, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 64, 8, 2)},
        (False, 256): {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2)},
        (True, 16): {"fwd": (64, 64, 4, 3), "dq": (128, 32, 8, 3), "dkdv": (64, 64, 8, 2)},
        (True, 32): {"fwd": (64, 32, 4, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (True, 64): {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (16, 32, 8, 2)},
        (True, 128): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (32, 32, 8, 2)},
        (True, 256): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (16, 16, 4, 2)},
    },
    "sm_86": {
        (False, 16): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 32): {"fwd": (128, 64, 8, 2), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 64): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 128): {"fwd": (128, 64, 8, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 64, 8, 2)},
        (False, 256): {"fwd": (16, 32, 8, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2)},
        (True, 16): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (True, 32): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 64, 8, 2)},
        (True, 64): {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2)},
        (True, 128): {"fwd": (16, 32, 8, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2)},
        (True, 256): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (16, 16, 4, 2)},
    },
    "sm_90": {
        (False, 16): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 32): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 64): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 128): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 256): {"fwd": (32, 32, 4, 2), "dq": (128, 32, 8, 3), "dkdv": (32, 32, 8, 2)},
        (True, 16): {"fwd": (64, 64, 4, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (True, 32): {"fwd": (128, 64, 8, 2), "dq": (128, 32, 8, 3), "dkdv": (32, 32, 8, 2)},
        (True, 64): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (32, 32, 8, 2)},
        (True, 128): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (32, 32, 8, 2)},
        (True, 256): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (16, 32, 8, 2)},
    },
    "sm_100": {
        (False, 16): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 32): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 64, 8, 2)},
        (False, 64): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 128): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (64, 64, 8, 2)},
        (False, 256): {"fwd": (64, 32, 4, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 32, 8, 2)},
        (True, 16): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (True, 32): {"fwd": (128, 64, 8, 3), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 8, 2)},
        (True, 64): {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2)},
        (True, 128): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (32, 32, 8, 2)},
        (True, 256): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (16, 32, 8, 2)},
    },
    "sm_120": {
        (False, 16): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 32): {"fwd": (128, 64, 8, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 128, 8, 2)},
        (False, 64): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (False, 128): {"fwd": (128, 64, 8, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 64, 8, 2)},
        (False, 256): {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2)},
        (True, 16): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2)},
        (True, 32): {"fwd": (128, 64, 8, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 64, 8, 2)},
        (True, 64): {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2)},
        (True, 128): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (32, 32, 8, 2)},
        (True, 256): {"fwd": (16, 32, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (16, 32, 8, 2)},
    },
}


def _config(D: int, dtype: torch.dtype, is_cuda: bool, block_m, block_n, capability: tuple[int, int] = (9, 0)):
    """Launch configs {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)} for one call.

    Explicit block_m / block_n (tests, tuning) apply to every kernel; the interpreter gets
    small tiles; CUDA gets _CUDA_CONFIGS. Raises ValueError for a block size that is not a
    power of 2 >= 16.
    """
    if block_m is not None or block_n is not None:
        bm = block_m or 64
        bn = block_n or 64
        for name, val in (("block_m", bm), ("block_n", bn)):
            if not isinstance(val, int) or val < 16 or val & (val - 1):
                raise ValueError(f"memento_flash_attention: {name}={val!r} must be a power of 2 >= 16")
        cfg = (bm, bn, 4, 2)
        return {"fwd": cfg, "dkdv": cfg, "dq": cfg}
    if not is_cuda:
        cfg = (32, 32, 4, 1)  # interpreter: small tiles keep numpy temporaries small
        return {"fwd": cfg, "dkdv": cfg, "dq": cfg}
    return dict(_CUDA_CONFIGS[arch_family(capability)][(dtype == torch.float32, D)])


def _capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (0, 0)


def _validate(q, k, v, mask_from, q_pos, k_pos):
    name = "memento_flash_attention"
    for t_name, t in (("q", q), ("k", k), ("v", v), ("mask_from", mask_from)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {t_name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be 4-D [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if (q_pos is None) != (k_pos is None):
        raise ValueError(f"{name}: pass both q_pos and k_pos, or neither")
    if q_pos is None and (k.shape[0] != B or Tk != Tq or k.shape[3] != D):
        raise ValueError(f"{name}: k/v must be [B={B}, Hkv, T={Tq}, D={D}] (square self-attention; "
                         f"pass q_pos and k_pos for queries against other keys), got {tuple(k.shape)}")
    if q_pos is not None and (k.shape[0] != B or k.shape[3] != D or Tk < 1):
        raise ValueError(f"{name}: k/v must be [B={B}, Hkv, Tk>=1, D={D}], got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{name}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if Tq == 0 or B == 0 or Hq == 0:
        raise ValueError(f"{name}: empty input {tuple(q.shape)}")
    if D not in _SUPPORTED_D:
        raise ValueError(f"{name}: head dim {D} unsupported; use 16, 32, 64, 128 or 256")
    if q.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {q.dtype} unsupported; use float32, bfloat16 or float16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    ints = (("mask_from", mask_from, Tk), ("q_pos", q_pos, Tq), ("k_pos", k_pos, Tk))
    for t_name, t, n in ints:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {t_name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (B, n):
            raise ValueError(f"{name}: {t_name} must be [B, {'Tq' if t_name == 'q_pos' else 'Tk'}] = [{B}, {n}], "
                             f"got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name}: {t_name} must be an integer tensor (int32 preferred), got {t.dtype}")
    devs = {t.device for t in (q, k, v, mask_from, q_pos, k_pos) if t is not None}
    if len(devs) != 1:
        raise ValueError(f"{name}: q, k, v, mask_from (and positions) must be on one device, got {sorted(map(str, devs))}")
    if not q.is_cuda and not _INTERPRET:
        raise ValueError(f"{name}: {q.device} tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
                         "importing triton), or use backend='torch' or 'sdpa' off CUDA")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _int32(t):
    # Any integer dtype in; values clamped so that NEVER-like int64 stays "never", not wrapped.
    if t.dtype != torch.int32:
        t = t.to(torch.int64).clamp(_INT32_MIN, NEVER).to(torch.int32)
    return t.contiguous()


def _forward(q, k, v, mask_from, sm_scale, cfg, lists, q_pos=None, k_pos=None):
    """Launch the forward kernel over csr_lists `lists`: (out [B, Hq, Tq, D] in q's dtype,
    lse [B, Hq, Tq] fp32, base 2)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    fbm, fbn, warps, stages = cfg["fwd"]
    has_pos = q_pos is not None
    if not has_pos:
        q_pos = k_pos = mask_from  # not read: HAS_POS is off
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)
    _fwd_kernel[launch_grid(triton.cdiv(Tq, fbm), B * Hq)](
        q, k, v, mask_from, o, lse, q_pos, k_pos, *lists,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        mask_from.stride(0), q_pos.stride(0), k_pos.stride(0), lists[0].stride(0),
        Tq, Tk, Hq, Hq // Hkv, sm_scale * 1.4426950408889634,  # log2(e): the kernels work in base 2
        HEAD_D=D, BLOCK_M=fbm, BLOCK_N=fbn, HAS_POS=has_pos,
        UPCAST=q.dtype == torch.bfloat16 and not q.is_cuda, IEEE=q.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )
    return o, lse


class _MementoFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tiles, sm_scale, block_m, block_n):
        D = q.shape[-1]
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        cfg = _config(D, q.dtype, q.is_cuda, block_m, block_n, _capability(q))
        o, lse = _forward(q, k, v, tiles.mask_from, sm_scale, cfg, tiles.lists(cfg)["fwd"])
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cfg = (sm_scale, cfg, tiles)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        sm_scale, cfg, tiles = ctx.cfg
        mask_from, lists = tiles.mask_from, tiles.lists(cfg)
        qk_scale = sm_scale * 1.4426950408889634
        upcast, ieee = q.dtype == torch.bfloat16 and not q.is_cuda, q.dtype == torch.float32
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        do = _last_dim_contiguous(do)
        if do.dtype != q.dtype:
            do = do.to(q.dtype)

        delta = torch.empty_like(lse)
        _bwd_delta_kernel[launch_grid(triton.cdiv(T, 64), B * Hq)](
            o, do, delta,
            o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            T, Hq, HEAD_D=D, BLOCK_M=64,
        )
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        # Each kernel has its own tiling, hence its own lists; dK/dV's run over query tiles.
        bm, bn, warps, stages = cfg["dkdv"]
        _bwd_dkdv_kernel[launch_grid(triton.cdiv(T, bn), B * Hkv)](
            q, k, v, do, mask_from, lse, delta, dk, dv, *lists["dkdv"],
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            mask_from.stride(0), lists["dkdv"][0].stride(0),
            T, Hq, Hkv, Hq // Hkv, sm_scale, qk_scale,
            HEAD_D=D, BLOCK_M=bm, BLOCK_N=bn, UPCAST=upcast, IEEE=ieee,
            num_warps=warps, num_stages=stages,
        )
        bm, bn, warps, stages = cfg["dq"]
        _bwd_dq_kernel[launch_grid(triton.cdiv(T, bm), B * Hq)](
            q, k, v, do, mask_from, lse, delta, dq, *lists["dq"],
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            mask_from.stride(0), lists["dq"][0].stride(0),
            T, Hq, Hq // Hkv, sm_scale, qk_scale,
            HEAD_D=D, BLOCK_M=bm, BLOCK_N=bn, UPCAST=upcast, IEEE=ieee,
            num_warps=warps, num_stages=stages,
        )
        return dq, dk, dv, None, None, None, None


def memento_flash_attention(q, k, v, mask_from, sm_scale=None, *, q_pos=None, k_pos=None, block_m=None, block_n=None):
    """Causal attention under the memento visibility rule, as fused Triton kernels (§4, §6.1).

    Key j is visible to query i iff pos[j] <= pos[i] < mask_from[b, j]. Tiles in which no
    pair is visible are skipped without loading K/V (see tile_schedule); fp32 accumulation.

    Two forms:
    - Self-attention (training, §4): q, k, v are the same T tokens at positions 0..T-1;
      differentiable in q, k, v (forward, dQ, dK, dV kernels).
    - Against a KV cache (prefill and chunked prefill, §6.1): with q_pos and k_pos, Tq queries
      at logical positions q_pos attend Tk key slots at positions k_pos (slots may have gaps
      where blocks were evicted, and empty slots with mask_from = -1). Forward only, for
      inference: memory is O(Tq + Tk) beyond the inputs, never O(Tq * Tk).

    Args:
        q: [B, Hq, Tq, D] float32, bfloat16 or float16 (CUDA, or CPU under TRITON_INTERPRET=1).
        k, v: [B, Hkv, Tk, D], same dtype and device (Tk == Tq without positions); Hq must be
            a multiple of Hkv (GQA: query head h reads key/value head h // (Hq // Hkv), no
            copies are made).
        mask_from: [B, Tk] integer tensor (int32 preferred; others are converted, values
            clamped to int32), first query position from which each key is masked;
            NEVER = 2**31 - 1 for never. Valid inputs have mask_from[b, j] > pos[j]. Or,
            without positions, a TileMask of it: its visiting lists are built once and
            reused by every call given the same object (all layers of a model forward).
        sm_scale: softmax scale applied to q.k; default 1 / sqrt(D).
        q_pos, k_pos: optional [B, Tq] / [B, Tk] integer logical positions (both or neither).
        block_m, block_n: optional tile sizes in tokens (powers of 2, >= 16) for the query
            and key axes of every kernel; default depends on D and device.
    Returns:
        [B, Hq, Tq, D] attention output in q's dtype.
    Raises:
        ValueError: non-tensor inputs, wrong ranks or shapes (k/v must be [B, Hkv, T, D]
            without positions, mask_from [B, Tk], positions [B, Tq] / [B, Tk]), only one of
            q_pos / k_pos, Hq not a multiple of Hkv, head dim not in 16/32/64/128/256,
            unsupported or mixed dtypes, non-integer mask_from or positions, mixed devices,
            empty input, a bad block size, CPU tensors without TRITON_INTERPRET=1 at import,
            or positions while a gradient is required (that form is inference-only).

    A query that sees no key at all (only possible when mask_from[b, i] <= i, which the
    memento builders never produce) gets a zero output row and zero gradients instead of
    NaN, matching memento_attention.attention_reference; no error is raised for it.
    """
    tiles = mask_from if isinstance(mask_from, TileMask) else None
    if tiles is not None and q_pos is not None:
        raise ValueError("memento_flash_attention: a TileMask carries its own positions (TileMask(mask_from, q_pos, "
                         "k_pos)); do not pass q_pos/k_pos with one")
    if tiles is not None and tiles.q_pos is not None:
        q_pos, k_pos = tiles.q_pos, tiles.k_pos
    _validate(q, k, v, tiles.mask_from if tiles is not None else mask_from, q_pos, k_pos)
    D = q.shape[-1]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    cfg = _config(D, q.dtype, q.is_cuda, block_m, block_n, _capability(q))  # validates block sizes
    if q_pos is None:
        return _MementoFlashAttention.apply(q, k, v, tiles or TileMask(mask_from), float(sm_scale), block_m, block_n)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("memento_flash_attention: with q_pos/k_pos (queries against a KV cache) the kernel is "
                         "forward-only; run it under torch.no_grad(), or train on whole sequences without positions")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if tiles is None:
        tiles = TileMask(mask_from, q_pos, k_pos)
    return _forward(q, k, v, tiles.mask_from, float(sm_scale), cfg, tiles.lists(cfg)["fwd"], tiles.q_pos,
                    tiles.k_pos)[0]
