"""Segmentation of a scored trace into blocks (paper §3).

Given n sentences with token lengths L_0..L_{n-1} and n-1 boundary scores (scores[i] is
the boundary between sentence i and i+1), choose K >= min_blocks contiguous blocks, every
block >= min_tokens tokens, maximizing

    J = (sum of scores at the K-1 cuts) / K  -  lam * pstdev(block lengths) / mean(block lengths)

`segment` is exact. The coefficient of variation does not decompose over blocks, so the
usual "one best candidate per (sentence, K)" DP (kept here as `segment_one_candidate`, the
shape of the official pipeline's DP) can miss the optimum. Exactness comes from two facts:

* for fixed K the mean block length is total/K, so pstdev/mean = sqrt(K*SS - T^2) / T with
  SS the sum of squared block lengths and T the total: J depends on a partition only
  through (K, S, SS), and for fixed (K, S) it is decreasing in SS (lam >= 0);
* boundary scores live on a small grid (integers for one scoring pass, multiples of 0.5
  after averaging two), so S takes few values.

Hence a DP over (block end, K, integer score sum) keeping the minimum SS is exact.
"""
from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np

__all__ = ["segment", "segment_one_candidate", "objective", "score_grid"]


def score_grid(scores) -> tuple[list[int], float]:
    """Write boundary scores as integers times a common unit (§9.4).

    Args: scores: sequence of non-negative finite numbers, each a multiple of 0.25.
    Returns: (ints, unit) with scores[i] == ints[i] * unit; unit is 0.25 * gcd so that the
        integers are as small as possible (integer scores give unit 1, a 0.5 grid 0.5).
    Raises: ValueError naming the first offending score when one is negative, not finite,
        or off the 0.25 grid (the exact DP needs a grid; average at most 4 integer passes
        or round the scores to quarters first).
    """
    quarters = []
    for i, s in enumerate(scores):
        x = float(s)
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"segment: boundary score {s!r} at index {i} must be a finite "
                             f"number >= 0; fix the scoring output")
        q = x * 4.0
        r = round(q)
        if abs(q - r) > 1e-9:
            raise ValueError(f"segment: boundary score {s!r} at index {i} is not a multiple of "
                             f"0.25; round scores to a 0.25 grid before segmenting")
        quarters.append(int(r))
    g = 0
    for q in quarters:
        g = math.gcd(g, q)
    g = g or 1
    return [q // g for q in quarters], g / 4.0


def _check(scores, token_lengths, min_tokens, lam, min_blocks) -> list[int]:
    lengths = [int(x) for x in token_lengths]
    if len(lengths) == 0:
        raise ValueError("segment: no sentences; pass at least one token length")
    if any(x < 0 for x in lengths) or any(int(x) != x for x in token_lengths):
        raise ValueError("segment: token_lengths must be non-negative integers (tokens per sentence)")
    if len(scores) != len(lengths) - 1:
        raise ValueError(f"segment: got {len(scores)} boundary scores for {len(lengths)} sentences; "
                         f"need exactly one score per boundary (n-1)")
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"segment: lam={lam!r} must be a finite number >= 0")
    if min_tokens < 0 or min_blocks < 1:
        raise ValueError(f"segment: need min_tokens >= 0 and min_blocks >= 1 "
                         f"(got {min_tokens}, {min_blocks})")
    return lengths


def _prefix_and_kmax(lengths: list[int], min_tokens: int) -> tuple[list[int], int]:
    """Prefix sums P (P[i] = tokens of sentences 0..i-1) and the largest block count any
    valid partition can have (each block >= min_tokens tokens, at most one per sentence).
    Both segmenters return the single block when it is below 2 or min_blocks."""
    P = [0]
    for x in lengths:
        P.append(P[-1] + x)
    kmax = len(lengths) if min_tokens == 0 else min(len(lengths), P[-1] // min_tokens)
    return P, kmax


def _cv(k: int, ss: float, total: int) -> float:
    # pstdev/mean with mean = total/k, written so that the radicand is an exact integer.
    if total == 0:
        return 0.0
    return math.sqrt(max(k * ss - total * total, 0)) / total


def objective(blocks, scores, token_lengths, lam: float = 0.5) -> float:
    """The segmentation objective J of a partition (§9.4).

    Args: blocks: inclusive sentence ranges [[start, end], ...] covering 0..n-1 in order;
        scores: n-1 boundary scores; token_lengths: n token counts (tokens); lam: weight.
    Returns: J = (sum of scores at the cuts)/K - lam * pstdev/mean of block token lengths.
    Raises: ValueError if the blocks are not a contiguous cover of the sentences.
    """
    n = len(token_lengths)
    pos = 0
    for a, b in blocks:
        if a != pos or b < a:
            raise ValueError(f"objective: blocks {blocks} are not a contiguous cover of {n} sentences")
        pos = b + 1
    if pos != n:
        raise ValueError(f"objective: blocks {blocks} are not a contiguous cover of {n} sentences")
    k = len(blocks)
    s = sum(float(scores[b]) for _, b in blocks[:-1])
    lens = [sum(token_lengths[a:b + 1]) for a, b in blocks]
    return s / k - lam * _cv(k, sum(x * x for x in lens), sum(lens))


def segment(scores, token_lengths, min_tokens: int = 200, lam: float = 0.5,
            min_blocks: int = 1) -> list[list[int]]:
    """Exact optimal segmentation of a trace into blocks (§3).

    Args:
        scores: n-1 boundary scores (scores[i] is between sentence i and i+1), each >= 0 and
            a multiple of 0.25 (one LLM pass gives integers 0..3, two passes averaged 0.5s).
        token_lengths: n non-negative integers, the token count of each sentence.
        min_tokens: every block must hold at least this many tokens.
        lam: weight of the coefficient of variation of block lengths (paper: 0.5).
        min_blocks: the partition must have at least this many blocks.
    Returns:
        Inclusive sentence ranges [[start, end], ...] of the partition maximizing J (see
        module docstring). Ties go to the smaller K, then the larger score sum. When no
        partition satisfies min_tokens and min_blocks (a short trace, or too few tokens for
        min_blocks blocks), the whole trace is returned as one block [[0, n-1]].
    Raises:
        ValueError on inconsistent lengths, negative/non-finite/off-grid scores, lam < 0.

    Cost: O(K_max * n^2 * S) elementary numpy operations at worst, with K_max <= total /
    min_tokens and S the number of reachable score sums (<= 6 * K for a 0.5 grid); the
    Monge bound on the optimal block start cuts most of the n^2 in practice. Measured
    ~0.8 s for 400 sentences of 20-60 tokens, ~8 s for 800 (2-core CPU,
    data/pipeline/bench_segment.py). min_tokens near 0 makes K_max ~ n: much slower.
    """
    lengths = _check(scores, token_lengths, min_tokens, lam, min_blocks)
    w, unit = score_grid(scores)
    n = len(lengths)
    whole = [[0, n - 1]]
    P, kmax = _prefix_and_kmax(lengths, min_tokens)
    if kmax < max(2, min_blocks):
        return whole
    T = P[n]

    Pa = np.asarray(P, dtype=np.float64)
    # cut weight at prefix j (a block ends after sentence j-1); only 1..n-1 can be cuts.
    wcut = np.zeros(n + 1, dtype=np.int64)
    wcut[1:n] = w
    maxw = int(max(w, default=0))
    # i can end a non-final block only if at least min_tokens tokens remain after it.
    can_continue = np.array([T - P[i] >= min_tokens for i in range(n + 1)])
    can_continue[n] = False
    jmax = [min(i - 1, bisect_right(P, P[i] - min_tokens) - 1) for i in range(n + 1)]

    # layer k: F[i, s] = min sum of squared block lengths over partitions of prefix i
    # (sentences 0..i-1) into k blocks with cut-score sum s (integer units); inf if none.
    F = np.full((n + 1, 1), np.inf)
    for i in range(1, n + 1):
        if P[i] >= min_tokens:
            F[i, 0] = float(P[i]) ** 2
    back: list[np.ndarray | None] = [None, None]  # back[k][i, s] = start prefix of block k
    finals: list[np.ndarray | None] = [None, F[n].copy()]
    for k in range(2, kmax + 1):
        src = F.copy()
        src[~can_continue] = np.inf
        alive = np.isfinite(src).any(axis=1)
        if not alive.any():
            break
        S_old = src.shape[1]
        # shift every row by its cut weight so rows can be min-combined column-wise.
        G = np.full((n + 1, S_old + maxw), np.inf)
        for v in np.unique(wcut[alive]):
            rows = np.nonzero(alive & (wcut == v))[0]
            G[rows, v:v + S_old] = src[rows]
        live_cols = np.nonzero(np.isfinite(G).any(axis=0))[0]
        G = G[:, : live_cols[-1] + 1]
        lo = int(np.argmax(alive))
        Fn = np.full_like(G, np.inf)
        Bk = np.zeros(G.shape, dtype=np.int16 if n < 2**15 else np.int32)  # kept for all k
        GT = np.ascontiguousarray(G.T)  # reduce over j along the contiguous axis (faster)
        cols = np.arange(GT.shape[0])
        buf = np.empty_like(GT)
        # The cost (P_i - P_j)^2 with the staircase constraint j <= jmax(i) is Monge, so for
        # every score column the leftmost optimal j never decreases as i grows: row i only
        # needs j >= the smallest optimum of the last computed row over its finite columns.
        start = lo
        for i in range(lo + 1, n + 1):
            hi = jmax[i]
            if hi < start or (i < n and not can_continue[i]):
                continue
            d = Pa[i] - Pa[start:hi + 1]
            cand = np.add(GT[:, start:hi + 1], d * d, out=buf[:, : hi + 1 - start])
            idx = cand.argmin(axis=1)
            vals = cand[cols, idx]
            Fn[i] = vals
            Bk[i] = idx + start
            finite = np.isfinite(vals)
            if finite.any():
                start += int(idx[finite].min())
        F = Fn
        back.append(Bk)
        finals.append(F[n].copy())

    best = None  # (J, -k, s, k)
    for k in range(max(min_blocks, 1), len(finals)):
        row = finals[k]
        for s in np.nonzero(np.isfinite(row))[0]:
            J = s * unit / k - lam * _cv(k, float(row[s]), T)
            key = (J, -k, int(s))
            if best is None or key > best[0]:
                best = (key, k, int(s))
    if best is None:
        return whole
    _, k, s = best
    blocks = []
    i = n
    while k > 1:
        j = int(back[k][i, s])
        blocks.append([j, i - 1])
        s -= int(wcut[j])
        i, k = j, k - 1
    blocks.append([0, i - 1])
    return blocks[::-1]


def segment_one_candidate(scores, token_lengths, min_tokens: int = 200, lam: float = 0.5,
                          min_blocks: int = 1) -> list[list[int]]:
    """The non-exact DP that keeps one candidate per (sentence, K) (reference heuristic).

    This is the structure of the official pipeline's DP, kept to test that `segment` is
    never worse. For every prefix end i and block count k it keeps only the partition of
    the prefix that maximizes the objective evaluated on the prefix alone
    (S/k - lam * cv of the prefix's blocks); the final answer maximizes the true J over K.
    Arguments, return value, fallback and errors are as for `segment`. O(K n^2) Python.
    """
    lengths = _check(scores, token_lengths, min_tokens, lam, min_blocks)
    score_grid(scores)  # same validation as segment
    n = len(lengths)
    whole = [[0, n - 1]]
    P, kmax = _prefix_and_kmax(lengths, min_tokens)
    if kmax < max(2, min_blocks):
        return whole
    T = P[n]
    # cand[k][i] = (prefix objective, S, SS, j) for the kept partition of prefix i.
    cand = [dict() for _ in range(kmax + 1)]
    for i in range(1, n + 1):
        if P[i] >= min_tokens:
            cand[1][i] = (0.0, 0.0, float(P[i]) ** 2, 0)
    for k in range(2, kmax + 1):
        for i in range(1, n + 1):
            best = None
            for j, (_, S, SS, _) in cand[k - 1].items():
                if j >= i or j == n or P[i] - P[j] < min_tokens:
                    continue
                S2 = S + float(scores[j - 1])
                SS2 = SS + float(P[i] - P[j]) ** 2
                val = S2 / k - lam * _cv(k, SS2, P[i])
                if best is None or val > best[0]:
                    best = (val, S2, SS2, j)
            if best is not None:
                cand[k][i] = best
    best = None
    for k in range(max(min_blocks, 1), kmax + 1):
        if n in cand[k]:
            _, S, SS, _ = cand[k][n]
            J = S / k - lam * _cv(k, SS, T)
            if best is None or J > best[0]:
                best = (J, k)
    if best is None:
        return whole
    k = best[1]
    blocks, i = [], n
    while k >= 1:
        j = cand[k][i][3]
        blocks.append([j, i - 1])
        i, k = j, k - 1
    return blocks[::-1]
