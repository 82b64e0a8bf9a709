"""Memento attention: which key a query may see, and the one attention function.

Paper: "MEMENTO: Teaching LLMs to Manage Their Own Context" (Kontonis et al., 2026),
§4 (block masking) and §6.1 (inference). The rule used everywhere in this repository:

    key j is visible to query i  iff  pos[j] <= pos[i] < mask_from[j]

where pos are logical positions in the whole token sequence (prompt + response) and
mask_from[j] is the first query position from which key j is masked (NEVER when it is
never masked). Plain causal attention is mask_from == NEVER everywhere. Which positions get
which mask_from is the block format's business (blocks.py).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from blocks import NEVER


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
    q_pos, k_pos, mask_from = _defaults(q, k, mask_from, q_pos, k_pos)
    vis = visible_mask(q_pos.long(), k_pos.long(), mask_from.long())[:, None, None]  # [B,1,1,Tq,Tk]
    # GQA without copies: the `rep` query heads sharing a kv head form one group.
    rep = Hq // Hkv
    qf = q.float().reshape(B, Hkv, rep * Tq, D)
    scores = (qf @ k.float().transpose(-1, -2)).view(B, Hkv, rep, Tq, Tk) / math.sqrt(D)
    scores = scores.masked_fill(~vis, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (p.view(B, Hkv, rep * Tq, Tk) @ v.float()).view(B, Hq, Tq, D).to(q.dtype)


BACKENDS = ("torch", "sdpa", "triton")


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The attention backend in force: `backend`, else $MEMENTO_ATTN_BACKEND, else "triton" on
    CUDA and "sdpa" elsewhere. Raises ValueError for an unknown name."""
    backend = backend or os.environ.get("MEMENTO_ATTN_BACKEND") or ("triton" if torch.device(device).type == "cuda" else "sdpa")
    if backend not in BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; use 'torch', 'sdpa' or 'triton' (or set MEMENTO_ATTN_BACKEND)")
    return backend


def attention(q, k, v, mask_from=None, *, q_pos=None, k_pos=None, backend=None):
    """Causal attention under the memento visibility rule (§4); the model's only attention.

    Args:
        q: [B, Hq, Tq, D] float (fp32/bf16/fp16), queries.
        k, v: [B, Hkv, Tk, D], keys and values; Hq must be a multiple of Hkv (grouped-query
            attention, no K/V copies needed by callers). Tk >= Tq.
        mask_from: [B, Tk] int or None. Key j is visible to query i iff
            k_pos[j] <= q_pos[i] < mask_from[j]. None means plain causal attention. Or
            prepare_mask's result (a model forward's, shared by its layers), or a TileMask
            with positions (a KV cache's batch, shared by its layers; give q_pos/k_pos too,
            for the other backends).
        q_pos, k_pos: optional [B, Tq] / [B, Tk] int logical positions. By default keys sit
            at 0..Tk-1 and queries are the last Tq of them (training, prefill, and decoding
            against a cache whose entries are all visible).
        backend: "torch" (the dense reference below, the oracle of every test), "sdpa"
            (torch's fused scaled_dot_product_attention with the same rule as a dense boolean
            [B, 1, Tq, Tk] mask: what the paper trained with, and the fast CPU path), or
            "triton" (the block-masked flash kernel of memento_kernels/, CUDA or TRITON_INTERPRET=1).
            None reads $MEMENTO_ATTN_BACKEND, else picks triton on CUDA and sdpa elsewhere.
            "triton" never builds a Tq x Tk tensor: whole sequences (training) run the
            differentiable kernel, queries against a KV cache (any number of them) its
            forward with positions. (A serving engine's decode steps read the paged pool
            directly: kv_cache.py and memento_kernels/paged_attention.py.)
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


def prepare_mask(mask_from: torch.Tensor | None, shape: tuple[int, int], device, backend: str | None = None):
    """What a model forward hands every layer as mask_from (§4): under the triton backend a
    memento_kernels.memento_flash.TileMask, whose tile lists are built once and shared by all layers,
    their backward and gradient checkpointing's recompute; under the others mask_from as is.

    Args:
        mask_from: [B, T] int or None (plain causal). shape: (B, T). device: the model's.
        backend: as for `attention` (None: $MEMENTO_ATTN_BACKEND or the device's default).
    Raises ValueError for an unknown backend or a mask_from that is not [B, T] integers.
    """
    if resolve_backend(device, backend) != "triton":
        return mask_from
    from memento_kernels.memento_flash import TileMask  # triton only when asked for (see _attention)

    if mask_from is None:
        mask_from = torch.full(shape, NEVER, device=device, dtype=torch.int32)
    if tuple(mask_from.shape) != tuple(shape):
        raise ValueError(f"attention: mask_from must be [B, T] = {list(shape)}, got {list(mask_from.shape)}")
    return TileMask(mask_from)


def _attention(q, k, v, mask_from, q_pos, k_pos, backend):
    tiles = None
    if mask_from is not None and not isinstance(mask_from, torch.Tensor):  # prepare_mask's TileMask
        tiles, mask_from = mask_from, mask_from.mask_from
    _check(q, k, v, mask_from)
    backend = resolve_backend(q.device, backend)
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    if backend == "triton" and q_pos is None and k_pos is None and Tq == Tk:
        # imported here: on a CPU the kernels only run under TRITON_INTERPRET=1, which must be
        # set before triton is imported (tests do); the other backends never need triton
        from memento_kernels.memento_flash import memento_flash_attention

        if mask_from is None:
            mask_from = torch.full((B, Tk), NEVER, device=q.device, dtype=torch.int32)
        # Any integer dtype: the kernel clamps to int32 itself, so NEVER-like int64 values
        # above 2**31 - 1 stay "never" instead of wrapping negative.
        return memento_flash_attention(q, k, v, tiles or mask_from)
    if backend == "torch":
        return attention_reference(q, k, v, mask_from, q_pos=q_pos, k_pos=k_pos)
    q_pos, k_pos, mask_from = _defaults(q, k, mask_from, q_pos, k_pos)
    if backend == "triton":
        from memento_kernels.memento_flash import memento_flash_attention  # see above

        if tiles is not None and tiles.q_pos is not None:  # positions and lists built once for every layer
            return memento_flash_attention(q, k, v, tiles)
        return memento_flash_attention(q, k, v, mask_from, q_pos=q_pos, k_pos=k_pos)
    vis = visible_mask(q_pos.long(), k_pos.long(), mask_from.long())[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, enable_gqa=True)


def _defaults(q, k, mask_from, q_pos, k_pos):
    """(q_pos, k_pos, mask_from) with the defaults of `attention`: keys at 0..Tk-1, queries the
    last Tq of them, nothing masked."""
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    if k_pos is None:
        k_pos = torch.arange(Tk, device=q.device).expand(B, Tk)
    if q_pos is None:
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device).expand(B, Tq)
    if mask_from is None:
        mask_from = torch.full((B, Tk), NEVER, device=q.device, dtype=torch.int64)
    return q_pos, k_pos, mask_from
