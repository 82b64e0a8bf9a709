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


def attention_reference(q, k, v, mask_from=None, *, q_pos=None, k_pos=None):
    """Dense PyTorch memento attention: the oracle every faster path is tested against.

    Computes softmax(q k^T / sqrt(D) + mask) v in fp32 with the visibility of
    `visible_mask`, and returns the result in q's dtype. Shapes as in `attention`.
    A query that can see no key at all (impossible for sequences built by this repo,
    since every token sees itself) gets a zero output instead of NaN.
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
    vis = visible_mask(q_pos.long(), k_pos.long(), mask_from.long())[:, None]  # [B,1,Tq,Tk]
    rep = Hq // Hkv
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~vis, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (p @ vf).to(q.dtype)


def attention(q, k, v, mask_from=None, *, q_pos=None, k_pos=None, backend=None):
    """Causal attention under the memento visibility rule (§4); the model's only attention.

    Args:
        q: [B, Hq, Tq, D] float (fp32/bf16/fp16), queries.
        k, v: [B, Hkv, Tk, D], same dtype, keys and values; Hq must be a multiple of Hkv
            (grouped-query attention, no K/V copies needed by callers). Tk >= Tq.
        mask_from: [B, Tk] int or None. Key j is visible to query i iff
            k_pos[j] <= q_pos[i] < mask_from[j]. None means plain causal attention.
        q_pos, k_pos: optional [B, Tq] / [B, Tk] int logical positions. By default keys sit
            at 0..Tk-1 and queries are the last Tq of them (training, prefill, and decoding
            against a cache whose entries are all visible).
        backend: "torch" (dense reference) or "triton" (block-masked flash kernel, CUDA or
            TRITON_INTERPRET=1); None reads $MEMENTO_ATTN_BACKEND, else picks triton on
            CUDA and torch elsewhere.
    Returns:
        [B, Hq, Tq, D] in q's dtype.
    Raises:
        ValueError on inconsistent shapes or an unknown backend.
    """
    _check(q, k, v, mask_from)
    backend = backend or os.environ.get("MEMENTO_ATTN_BACKEND") or ("triton" if q.is_cuda else "torch")
    if backend == "torch":
        return attention_reference(q, k, v, mask_from, q_pos=q_pos, k_pos=k_pos)
    if backend == "triton":
        if q_pos is not None or k_pos is not None or q.shape[2] != k.shape[2]:
            # The kernel covers square self-attention (training, prefill); decoding against
            # a compacted cache is one query over visible keys, where the dense path is exact.
            return attention_reference(q, k, v, mask_from, q_pos=q_pos, k_pos=k_pos)
        from kernels.memento_flash import memento_flash_attention

        if mask_from is None:
            mask_from = torch.full(q.shape[:1] + q.shape[2:3], NEVER, device=q.device, dtype=torch.int32)
        return memento_flash_attention(q, k, v, mask_from.to(torch.int32))
    raise ValueError(f"attention: unknown backend {backend!r}; use 'torch' or 'triton' (or set MEMENTO_ATTN_BACKEND)")
