"""Tests of the block-masked flash attention kernels (memento_kernels/memento_flash.py, paper §4).

Without CUDA every test runs the Triton kernels under the interpreter (TRITON_INTERPRET=1,
which conftest.py sets before anything imports triton); with CUDA they run natively. Shapes are tiny so the
interpreter finishes the file in a few minutes on 2 cores.
"""
import math
import os
import sys

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks import NEVER
from conftest import tiny_model
from memento_kernels.memento_flash import (FULL, PARTIAL, SKIP, TileMask, csr_lists, launch_grid, memento_flash_attention,
                                   row_offsets, tile_lists, tile_schedule, tile_stats)
from memento_attention import attention, attention_reference, visible_mask

CUDA = torch.cuda.is_available()

DEVICE = "cuda" if CUDA else "cpu"

# Tolerances against the fp32 dense reference evaluated on the same (rounded) inputs.
# fp32: both sides do fp32 math; only summation order differs.
# fp16/bf16: the kernel rounds P (and dS) to the input dtype before the second matmul, as
# every flash kernel does, and rounds its outputs; bf16 has 8 mantissa bits, fp16 11.
TOL = {
    torch.float32: dict(out=(1e-4, 1e-4), grad=(1e-4, 1e-4)),
    torch.float16: dict(out=(2e-3, 2e-3), grad=(6e-3, 6e-3)),
    torch.bfloat16: dict(out=(2e-2, 2e-2), grad=(6e-2, 4e-2)),
}


# ---------------------------------------------------------------------------------------
# Memento-structured mask_from, built from the paper's §4 rule independently of the kernel.
# ---------------------------------------------------------------------------------------
def memento_sequence(prompt, blocks, answer, complete_last=True):
    """Token layout: prompt, <think>, per block [<block_start> content <block_end>
    <summary_start> memento <summary_end>], </think>, answer.

    blocks: list of (content_len, memento_len). If complete_last is False the last block
    stops inside its memento (no <summary_end>) and the sequence ends there.
    Returns (T, list of dicts with s, e, z positions; z None when not completed).
    """
    pos = prompt + 1  # after <think>
    info = []
    for bi, (c, m) in enumerate(blocks):
        s = pos
        e = s + 1 + c
        last = bi == len(blocks) - 1
        if last and not complete_last:
            info.append(dict(s=s, e=e, z=None, next_start=None))
            return e + 2 + m, info  # <summary_start> + part of the memento
        z = e + 1 + m + 1
        info.append(dict(s=s, e=e, z=z, next_start=None))
        pos = z + 1
    for a, b in zip(info, info[1:]):
        a["next_start"] = b["s"]
    return pos + 1 + answer, info  # </think> + answer


def memento_mask_from(T, info, keep_last_n_blocks=0, mask_delimiters=False, keep_last_block_for_answer=False):
    mf = torch.full((T,), NEVER, dtype=torch.int64)
    if keep_last_n_blocks < 0:
        return mf
    completed = [b for b in info if b["z"] is not None]
    for bi, blk in enumerate(completed):
        if keep_last_block_for_answer:
            if blk["next_start"] is None:
                continue  # last block before </think>: the answer keeps it
            start = blk["next_start"]
        else:
            later = bi + keep_last_n_blocks
            if later >= len(completed):
                continue  # not yet N newer completed blocks: stays visible
            start = completed[later]["z"]
        lo, hi = (blk["s"], blk["e"] + 1) if mask_delimiters else (blk["s"] + 1, blk["e"])
        mf[lo:hi] = start
    return mf


def _dense_vis(mask_from, T):
    pos = torch.arange(T).expand(mask_from.shape[0], T)
    return visible_mask(pos, pos, mask_from.long().cpu())


def _random_mask_from(g, B, T, never_frac=0.3):
    j = torch.arange(T)
    mf = j + 1 + torch.randint(0, T, (B, T), generator=g)
    mf[torch.rand(B, T, generator=g) < never_frac] = NEVER
    return mf


def _run_case(B, Hq, Hkv, T, D, dtype, mask_from, block_m, block_n, seed=0, sm_scale=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    do = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    mask_from = mask_from.to(torch.int32)

    qd, kd, vd = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    out = memento_flash_attention(qd, kd, vd, mask_from.to(DEVICE), sm_scale, block_m=block_m, block_n=block_n)
    assert out.dtype == dtype and out.shape == (B, Hq, T, D)
    dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), do.to(DEVICE))

    qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
    if sm_scale is not None:  # the reference uses 1/sqrt(D): fold the custom scale into q
        qr_in = qr * (sm_scale * math.sqrt(D))
    else:
        qr_in = qr
    ref = attention_reference(qr_in, kr, vr, mask_from)
    rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), do.float())

    (ao, ro), (ag, rg) = TOL[dtype]["out"], TOL[dtype]["grad"]
    torch.testing.assert_close(out.float().cpu(), ref, atol=ao, rtol=ro)
    for name, a, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float().cpu(), r, atol=ag, rtol=rg, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------
# Forward and backward against the dense reference.
# ---------------------------------------------------------------------------------------
def _memento_case(keep, delims, answer_keep=False, complete_last=True, blocks=None):
    # Blocks longer than two 16-token tiles, so that whole key tiles get evicted and the
    # skip / full / partial paths of the kernels all run.
    blocks = blocks or [(40, 4), (50, 5), (35, 4)]
    T, info = memento_sequence(prompt=5, blocks=blocks, answer=6, complete_last=complete_last)
    return T, memento_mask_from(T, info, keep, delims, answer_keep)[None]


MEMENTO_CASES = {
    # name: (keep_last_n_blocks, mask_delimiters, keep_last_block_for_answer, complete_last)
    "keep-1": (-1, False, False, True),
    "keep0": (0, False, False, True),
    "keep0-delims": (0, True, False, True),
    "keep1": (1, False, False, True),
    "keep1-delims": (1, True, False, True),
    "keep0-answer-keeps-last": (0, False, True, True),
    "keep0-unfinished-last-block": (0, False, False, False),
}


@pytest.mark.parametrize("name", list(MEMENTO_CASES))
def test_memento_layouts_match_reference(name):
    keep, delims, answer_keep, complete_last = MEMENTO_CASES[name]
    T, mf = _memento_case(keep, delims, answer_keep, complete_last)
    vis = _dense_vis(mf, T)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    # The layout must really mask something (else this would only re-test causal attention),
    # and with 16-token tiles it must exercise skipped, full and partial tiles.
    assert bool((vis[0] == causal).all()) == (keep < 0)
    stats = tile_stats(mf, T, 16, 16)
    assert stats["full"] > 0 and stats["partial"] > 0
    assert (stats["skipped"] > 0) == (keep >= 0)
    _run_case(B=1, Hq=2, Hkv=1, T=T, D=16, dtype=torch.float32, mask_from=mf, block_m=16, block_n=16)


def test_delimiters_change_what_is_masked():
    T, info = memento_sequence(prompt=5, blocks=[(9, 3), (14, 4)], answer=6)
    off = memento_mask_from(T, info, 0, False)
    on = memento_mask_from(T, info, 0, True)
    s, e = info[0]["s"], info[0]["e"]
    assert off[s] == NEVER and off[e] == NEVER and on[s] == info[0]["z"] and on[e] == info[0]["z"]
    assert torch.equal(off[s + 1:e], on[s + 1:e])


def test_batch_of_different_layouts_gqa4():
    # Two sequences of one batch with different layouts (and keep semantics), GQA 4:1.
    T1, a = _memento_case(0, False, blocks=[(9, 3), (14, 4), (6, 2), (11, 3)])
    T0, _ = memento_sequence(prompt=3, blocks=[(20, 5), (8, 2)], answer=0)
    _, info = memento_sequence(prompt=3, blocks=[(20, 5), (8, 2)], answer=T1 - T0)
    b = memento_mask_from(T1, info, 1, True)[None]
    assert a.shape[1] == b.shape[1] == T1
    _run_case(B=2, Hq=4, Hkv=1, T=T1, D=16, dtype=torch.float32, mask_from=torch.cat([a, b]), block_m=32, block_n=16)


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("T", [45, 64, 7])  # not a multiple of the tile / a multiple / < one tile
def test_random_layouts_gqa_and_lengths(Hq, Hkv, T):
    g = torch.Generator().manual_seed(T * 10 + Hq + Hkv)
    mf = _random_mask_from(g, 2, T)
    _run_case(B=2, Hq=Hq, Hkv=Hkv, T=T, D=16, dtype=torch.float32, mask_from=mf, block_m=32, block_n=32, seed=T)


def test_rectangular_tiles_and_d32():
    g = torch.Generator().manual_seed(3)
    _run_case(B=1, Hq=2, Hkv=1, T=83, D=32, dtype=torch.float32, mask_from=_random_mask_from(g, 1, 83),
              block_m=16, block_n=32)
    _run_case(B=1, Hq=2, Hkv=1, T=83, D=32, dtype=torch.float32, mask_from=_random_mask_from(g, 1, 83),
              block_m=32, block_n=16)


def test_no_blocks_is_causal():
    T, info = memento_sequence(prompt=20, blocks=[], answer=30)
    mf = memento_mask_from(T, info, 0, True)[None]
    assert bool((mf == NEVER).all())
    _run_case(B=1, Hq=2, Hkv=2, T=T, D=16, dtype=torch.float32, mask_from=mf, block_m=16, block_n=16)


def test_diagonal_only():
    # mask_from[j] = j + 1: every query sees only itself, so out == v of its own kv head.
    T = 40
    mf = (torch.arange(T) + 1)[None]
    _run_case(B=1, Hq=4, Hkv=2, T=T, D=16, dtype=torch.float32, mask_from=mf, block_m=16, block_n=16)
    v = torch.randn(1, 2, T, 16)
    out = memento_flash_attention(torch.randn(1, 4, T, 16).to(DEVICE), torch.randn(1, 2, T, 16).to(DEVICE),
                                  v.to(DEVICE), mf.to(DEVICE), block_m=16, block_n=16)
    torch.testing.assert_close(out.cpu(), v.repeat_interleave(2, dim=1), atol=1e-6, rtol=0)


def test_custom_sm_scale():
    g = torch.Generator().manual_seed(5)
    _run_case(B=1, Hq=2, Hkv=1, T=30, D=16, dtype=torch.float32, mask_from=_random_mask_from(g, 1, 30),
              block_m=16, block_n=16, sm_scale=0.37)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    T, mf = _memento_case(0, False)
    _run_case(B=1, Hq=4, Hkv=2, T=T, D=32, dtype=dtype, mask_from=mf, block_m=32, block_n=16, seed=1)


def test_fully_masked_query_gives_zero_not_nan():
    # Invalid input on purpose: mask_from[10] = 10 hides key 10 from itself, and every
    # earlier key is gone too (mask_from[j] = j + 1), so query 10 sees nothing.
    T = 24
    mf = (torch.arange(T) + 1)[None].clone()
    mf[0, 10] = 10
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    out = memento_flash_attention(q, k, v, mf.to(DEVICE), block_m=16, block_n=16)
    assert torch.isfinite(out).all()
    assert bool((out[:, :, 10] == 0).all())
    torch.testing.assert_close(out.detach().cpu(), attention_reference(q.detach().cpu(), k.detach().cpu(),
                                                                        v.detach().cpu(), mf), atol=1e-5, rtol=1e-5)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert bool((dq[:, :, 10] == 0).all())  # no key, no score, no gradient


def test_non_contiguous_inputs():
    # The model will hand in transposed views of [B, T, H, D] projections.
    B, T, Hq, Hkv, D = 1, 37, 4, 2, 16
    g = torch.Generator().manual_seed(9)
    qb, kb, vb = (torch.randn(B, T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    mf = _random_mask_from(g, B, T)
    q, k, v = (t.to(DEVICE).transpose(1, 2).requires_grad_() for t in (qb, kb, vb))
    assert not q.is_contiguous()
    out = memento_flash_attention(q, k, v, mf.to(DEVICE), block_m=16, block_n=16)
    ref = attention_reference(*(t.detach().cpu() for t in (q, k, v)), mf)
    torch.testing.assert_close(out.detach().cpu(), ref, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(out, (q, k, v), out.detach() * 0 + 1)
    qr, kr, vr = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    rgrads = torch.autograd.grad(attention_reference(qr, kr, vr, mf).sum(), (qr, kr, vr))
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a.cpu(), r, atol=1e-4, rtol=1e-4)


def _count_kernel_calls(monkeypatch):
    # memento_attention.attention imports the kernel at call time, so patching the module
    # attribute catches every call; a silent fallback to the reference would count 0.
    from memento_kernels import memento_flash

    calls = []
    real = memento_flash.memento_flash_attention

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(memento_flash, "memento_flash_attention", counting)
    return calls


def test_attention_dispatch_to_triton(monkeypatch):
    # memento_attention.attention(backend="triton") and $MEMENTO_ATTN_BACKEND reach the kernel.
    calls = _count_kernel_calls(monkeypatch)
    T, mf = _memento_case(0, False)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, T, 32, generator=g).to(DEVICE) for h in (4, 2, 2))
    ref = attention(q, k, v, mf.to(DEVICE), backend="torch")
    torch.testing.assert_close(attention(q, k, v, mf.to(DEVICE), backend="triton"), ref, atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("MEMENTO_ATTN_BACKEND", "triton")
    torch.testing.assert_close(attention(q, k, v, mf.long().to(DEVICE)), ref, atol=1e-4, rtol=1e-4)
    causal = attention(q, k, v, None, backend="torch")
    torch.testing.assert_close(attention(q, k, v, None), causal, atol=1e-4, rtol=1e-4)
    assert len(calls) == 3


def test_int64_mask_from_beyond_int32_stays_never():
    # Through attention(backend="triton"), an int64 "never" larger than int32 must not wrap
    # to a small number (which would hide those keys from every query).
    T, mf = _memento_case(0, False)
    big = mf.clone()
    big[big == NEVER] = 2**40
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, T, 16, generator=g).to(DEVICE) for h in (2, 1, 1))
    ref = attention(q, k, v, mf.to(DEVICE), backend="torch")
    torch.testing.assert_close(attention(q, k, v, big.to(DEVICE), backend="triton"), ref, atol=1e-4, rtol=1e-4)


def test_cpu_tensors_without_interpreter_get_one_clear_error(monkeypatch):
    from memento_kernels import memento_flash

    monkeypatch.setattr(memento_flash, "_INTERPRET", False)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        memento_flash_attention(q, q, q, torch.full((1, 8), NEVER, dtype=torch.int32))


# The tile shapes _config picks on CUDA, per head dim, dtype and architecture, run under the
# interpreter here (warps and stages mean nothing to it); natively they are the defaults.
_CUDA_TILE_CASES = [(64, torch.float32, (9, 0)), (128, torch.float32, (9, 0)), (64, torch.bfloat16, (9, 0)),
                    (128, torch.bfloat16, (8, 6)), (128, torch.bfloat16, (9, 0)), (128, torch.bfloat16, (8, 0)),
                    (128, torch.bfloat16, (12, 0)), (128, torch.bfloat16, (10, 0))]


@pytest.mark.parametrize("D,dtype,sm", _CUDA_TILE_CASES, ids=lambda x: str(x).removeprefix("torch."))
def test_head_dims_64_and_128_with_the_cuda_default_tiles(monkeypatch, D, dtype, sm):
    from memento_kernels import memento_flash

    real, used = memento_flash._config, []

    def cuda_config(D_, dtype_, is_cuda, block_m, block_n, capability=(9, 0)):
        used.append(real(D_, dtype_, True, block_m, block_n, sm))
        return used[-1]

    monkeypatch.setattr(memento_flash, "_config", cuda_config)
    # A prompt longer than a key tile and blocks longer than a 128-token tile: the big
    # default tiles still meet skip, full and partial cases; T is not a multiple of any tile.
    T, info = memento_sequence(prompt=70, blocks=[(150, 10), (140, 8), (20, 3)], answer=6)
    mf = memento_mask_from(T, info, 0)[None]
    assert T % 64 != 0
    bm, bn = real(D, dtype, True, None, None, sm)["fwd"][:2]
    sched = tile_schedule(mf, T, bm, bn)
    assert (sched == SKIP).any() and (sched == FULL).any()
    _run_case(B=1, Hq=2, Hkv=1, T=T, D=D, dtype=dtype, mask_from=mf, block_m=None, block_n=None, seed=D)
    assert used and used[0] == real(D, dtype, True, None, None, sm)


# ---------------------------------------------------------------------------------------
# Tile skipping.
# ---------------------------------------------------------------------------------------
def _mask_from_strategy():
    @st.composite
    def build(draw):
        B = draw(st.integers(1, 2))
        T = draw(st.integers(1, 160))
        rows = []
        for _ in range(B):
            kind = draw(st.sampled_from(["valid", "memento", "runs", "arbitrary"]))
            if kind == "arbitrary":  # includes invalid values (<= j, negative)
                vals = draw(st.lists(st.integers(-5, T + 5), min_size=T, max_size=T))
                rows.append(torch.tensor(vals, dtype=torch.int64))
            elif kind == "runs":  # piecewise-constant, like evicted blocks: whole tiles share one value
                vals, j = [], 0
                while j < T:
                    n = draw(st.integers(1, 40))
                    vals += [draw(st.one_of(st.integers(j + n, j + n + T), st.just(NEVER)))] * n
                    j += n
                rows.append(torch.tensor(vals[:T], dtype=torch.int64))
            elif kind == "memento":
                nb = draw(st.integers(0, 5))
                blocks = [(draw(st.integers(1, 70)), draw(st.integers(1, 6))) for _ in range(nb)]
                Tm, info = memento_sequence(draw(st.integers(0, 10)), blocks, draw(st.integers(0, 10)))
                mf = memento_mask_from(Tm, info, draw(st.integers(-1, 2)), draw(st.booleans()))
                mf = torch.cat([mf, torch.full((max(T - Tm, 0),), NEVER, dtype=torch.int64)])[:T]
                rows.append(mf)
            else:
                offs = draw(st.lists(st.one_of(st.integers(1, T + 1), st.just(NEVER)), min_size=T, max_size=T))
                rows.append(torch.tensor([j + o if o != NEVER else NEVER for j, o in enumerate(offs)]).clamp(max=NEVER))
        bm = draw(st.sampled_from([16, 32, 64]))
        bn = draw(st.sampled_from([16, 32, 64]))
        return torch.stack(rows), T, bm, bn
    return build()


@settings(max_examples=300, deadline=None)
@given(_mask_from_strategy())
def test_tile_predicate_is_conservative(case):
    mask_from, T, bm, bn = case
    sched = tile_schedule(mask_from, T, bm, bn)
    vis = _dense_vis(mask_from, T)
    B, nq, nk = sched.shape
    assert (nq, nk) == (math.ceil(T / bm), math.ceil(T / bn))
    for b in range(B):
        for qi in range(nq):
            for ki in range(nk):
                tile = vis[b, qi * bm:(qi + 1) * bm, ki * bn:(ki + 1) * bn]
                c = int(sched[b, qi, ki])
                if c == SKIP:
                    assert not tile.any(), f"skipped tile ({b},{qi},{ki}) holds a visible pair"
                if c == FULL:
                    assert tile.all(), f"full tile ({b},{qi},{ki}) holds an invisible pair"
                    # The kernels do not bound-check columns in full tiles: none may be padding.
                    assert (ki + 1) * bn <= T
    # The kernels visit exactly their lists: per query tile (forward, dQ) and per key tile
    # (dK/dV, the transposed schedule), every FULL and every PARTIAL tile once, in order.
    for s in (sched, sched.transpose(1, 2)):
        full_num, full_idx, part_num, part_idx = tile_lists(s)
        for b in range(B):
            for r in range(s.shape[1]):
                want = {c: [i for i in range(s.shape[2]) if int(s[b, r, i]) == c] for c in (FULL, PARTIAL)}
                assert full_idx[b, r, :int(full_num[b, r])].tolist() == want[FULL]
                assert part_idx[b, r, :int(part_num[b, r])].tolist() == want[PARTIAL]
        _assert_csr_equals_dense(csr_lists(s), tile_lists(s))


def _assert_csr_equals_dense(csr, dense):
    # What the kernels read (compressed rows) holds exactly the dense lists, row by row, and
    # nothing else: O(tiles visited).
    for (num, start, idx), (dnum, didx) in zip((csr[:3], csr[3:]), (dense[:2], dense[2:])):
        assert torch.equal(num, dnum) and idx.numel() == int(dnum.sum())
        B, R = num.shape
        for b in range(B):
            for r in range(R):
                a, n = int(start[b, r]), int(num[b, r])
                assert idx[a:a + n].tolist() == didx[b, r, :n].tolist()


@settings(max_examples=60, deadline=None)
@given(_mask_from_strategy(), st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64]))
def test_tile_mask_lists_equal_the_dense_lists_of_each_tiling(case, bm2, bn2):
    """A TileMask builds the forward, dQ and dK/dV lists of a config together, each equal to
    tile_lists of its own tiling (dK/dV's transposed), and builds them once."""
    mask_from, T, bm, bn = case
    tiles = TileMask(mask_from)
    cfg = {"fwd": (bm, bn, 4, 2), "dq": (bm, bn2, 4, 2), "dkdv": (bm2, bn, 4, 2)}
    lists = tiles.lists(cfg)
    _assert_csr_equals_dense(lists["fwd"], tile_lists(tile_schedule(mask_from, T, bm, bn)))
    _assert_csr_equals_dense(lists["dq"], tile_lists(tile_schedule(mask_from, T, bm, bn2)))
    _assert_csr_equals_dense(lists["dkdv"], tile_lists(tile_schedule(mask_from, T, bm2, bn).transpose(1, 2)))
    assert tiles.lists(dict(cfg)) is lists and tiles.builds == 1


@pytest.mark.parametrize("seed", range(6))
def test_tile_predicate_with_positions_is_conservative(seed):
    # Queries against cache slots: the schedule built from position bounds never skips a
    # visible pair, and a FULL tile is all visible with no padding column.
    g = torch.Generator().manual_seed(seed)
    Tk = int(torch.randint(20, 140, (1,), generator=g))
    Tq = int(torch.randint(1, min(Tk, 50) + 1, (1,), generator=g))
    q_pos, k_pos, mf = _cache_layout(g, 2, Tk, Tq)
    bm, bn = 16, (16, 32)[seed % 2]
    sched = tile_schedule(mf, Tk, bm, bn, q_pos=q_pos, k_pos=k_pos)
    vis = visible_mask(q_pos, k_pos, mf)
    assert sched.shape == (2, math.ceil(Tq / bm), math.ceil(Tk / bn))
    for b, qi, ki in torch.cartesian_prod(torch.arange(2), torch.arange(sched.shape[1]), torch.arange(sched.shape[2])).tolist():
        tile = vis[b, qi * bm:(qi + 1) * bm, ki * bn:(ki + 1) * bn]
        if sched[b, qi, ki] == SKIP:
            assert not tile.any()
        if sched[b, qi, ki] == FULL:
            assert tile.all() and (ki + 1) * bn <= Tk


def test_memento_layout_skips_tiles():
    # OpenMementos-like proportions at toy scale: most evicted tiles are skipped.
    T, info = memento_sequence(prompt=20, blocks=[(115, 19)] * 8, answer=30)
    mf = memento_mask_from(T, info, 0, False)[None]
    stats = tile_stats(mf, T, 16, 16)
    assert stats["skipped_fraction"] > 0.5
    assert stats["full"] > 0 and stats["partial"] > 0
    causal = tile_stats(torch.full((1, T), NEVER), T, 16, 16)
    assert causal["skipped"] == 0 and causal["causal_tiles"] == stats["causal_tiles"]


def test_skipped_tiles_are_never_loaded():
    # Poison V of one key tile with NaN. A query tile whose (query, key) tile is skipped must
    # stay finite (K/V of that tile never touched); any tile that is loaded, even if every
    # pair in it is masked, would spread the NaN through P @ V (0 * NaN = NaN).
    T, info = memento_sequence(prompt=4, blocks=[(40, 6), (40, 6)], answer=20)
    mf = memento_mask_from(T, info, 0, False)[None]
    bm = bn = 16
    sched = tile_schedule(mf, T, bm, bn)
    ki = (info[0]["s"] + 1) // bn + 1  # a key tile well inside block 0's content
    assert (sched[0, :, ki] == SKIP).any() and (sched[0, :, ki] != SKIP).any()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, 16, generator=g) for _ in range(3))
    v[:, :, ki * bn:(ki + 1) * bn] = float("nan")
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    out = memento_flash_attention(q, k, v, mf.to(DEVICE), block_m=bm, block_n=bn)
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    for qi in range(sched.shape[1]):
        rows = slice(qi * bm, (qi + 1) * bm)
        skipped = bool(sched[0, qi, ki] == SKIP) or ki * bn > min((qi + 1) * bm, T) - 1
        assert bool(torch.isfinite(out[0, 0, rows]).all()) == skipped, qi
        assert bool(torch.isfinite(dq[0, 0, rows]).all()) == skipped, qi


# ---------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------
def _qkv(B=1, Hq=2, Hkv=1, T=8, D=16, dtype=torch.float32):
    return (torch.randn(B, Hq, T, D, dtype=dtype, device=DEVICE), torch.randn(B, Hkv, T, D, dtype=dtype, device=DEVICE),
            torch.randn(B, Hkv, T, D, dtype=dtype, device=DEVICE))


def _mf(B=1, T=8):
    return torch.full((B, T), NEVER, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("make,pattern", [
    (lambda: (*_qkv(D=48), _mf()), "head dim 48 unsupported; use 16, 32, 64, 128 or 256"),
    (lambda: (*_qkv(Hq=3, Hkv=2), _mf()), "multiple of key/value heads"),
    (lambda: (_qkv()[0][0], *_qkv()[1:], _mf()), "must be 4-D"),
    (lambda: (_qkv()[0], _qkv(T=9)[1], _qkv(T=9)[2], _mf()), r"k/v must be \[B=1, Hkv, T=8, D=16\]"),
    (lambda: (_qkv()[0], _qkv()[1], _qkv(Hkv=2)[2], _mf()), "must have the same shape"),
    (lambda: (*_qkv(), _mf(T=9)), r"mask_from must be \[B, Tk\] = \[1, 8\]"),
    (lambda: (*_qkv(), _mf().float()), "mask_from must be an integer tensor"),
    (lambda: (*_qkv(dtype=torch.float64), _mf()), "dtype torch.float64 unsupported"),
    (lambda: (_qkv()[0].half(), *_qkv()[1:], _mf()), "must share one dtype"),
    (lambda: (*_qkv(), [0] * 8), "mask_from must be a torch.Tensor"),
])
def test_bad_input_raises_value_error(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        memento_flash_attention(*make())


def test_bad_block_size_raises_value_error():
    with pytest.raises(ValueError, match="block_m=24 must be a power of 2 >= 16"):
        memento_flash_attention(*_qkv(), _mf(), block_m=24)
    with pytest.raises(ValueError, match="block_n=8 must be a power of 2 >= 16"):
        memento_flash_attention(*_qkv(), _mf(), block_n=8)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_model_forward_and_backward_build_the_tile_lists_once(monkeypatch, checkpointing):
    """Every layer's forward, dQ and dK/dV kernels (and gradient checkpointing's recompute)
    read one TileMask: tile_schedule runs once per distinct tiling of the batch, not three
    times per layer; the loss and gradients still equal the dense reference's."""
    from memento_kernels import memento_flash

    g = torch.Generator().manual_seed(0)
    T = 70
    mask_from = torch.full((2, T), NEVER, dtype=torch.int64)
    mask_from[0, 5:30] = 40  # an evicted block in row 0, another in row 1
    mask_from[1, 10:20] = 25
    ids = torch.randint(0, 272, (2, T), generator=g)
    calls = []
    real = memento_flash.tile_schedule
    monkeypatch.setattr(memento_flash, "tile_schedule", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MEMENTO_ATTN_BACKEND", backend)
        model = tiny_model(layers=3, hidden=32, heads=4, kv_heads=2, head_dim=16).to(DEVICE).train()
        model.gradient_checkpointing = checkpointing
        loss = model(ids.to(DEVICE), mask_from=mask_from.to(DEVICE), labels=ids.to(DEVICE)).sum()
        loss.backward()
        grads[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    cfg = memento_flash._config(16, torch.float32, CUDA, None, None, memento_flash._capability(torch.empty(0, device=DEVICE)))
    assert len(calls) == len({cfg[k][:2] for k in cfg})  # 1 on the interpreter's one tiling, at most 3 on CUDA
    (lt, gt), (lk, gk) = grads["torch"], grads["triton"]
    assert abs(lt - lk) <= 1e-4 * abs(lt)
    for n in gt:
        assert (gt[n] - gk[n]).abs().max().item() <= 1e-4 * (1 + gt[n].abs().max().item()), n


@triton.jit
def _offsets_kernel(OUT, base, stride, N: tl.constexpr):
    rows = base + tl.arange(0, N)
    tl.store(OUT + tl.arange(0, N), row_offsets(rows, stride))


def test_row_offsets_and_grid_hold_past_int32():
    """The row offset every load and store computes (row_offsets: rows x stride) is exact in
    int64 where int32 would wrap (T x Hq x D >= 2**31: 600K tokens of 32 x 128 heads), run
    through a kernel on tiny tensors; and the launch grid is one axis of tiles x B x H
    programs, refused only past 2**31 - 1."""
    base, stride = 600_000 - 8, 32 * 128
    out = torch.zeros(16, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, base, stride, N=16)
    want = torch.arange(base, base + 16, dtype=torch.int64) * stride
    assert want.max() > 2**31 and torch.equal(out.cpu(), want)
    assert launch_grid(triton.cdiv(131072, 128), 8 * 32) == (262144,)  # B x H = 256 on one axis
    assert launch_grid(1, 70_000) == (70_000,)  # past 65,535 batch-heads, where a 2-D grid's y axis stops
    with pytest.raises(ValueError, match="exceed"):
        launch_grid(2**16, 2**15)


def test_stage2_training_step_triton_equals_torch(monkeypatch):
    """One stage-2 step of train_sft (memento mask, loss on response tokens, backward) gives
    the same loss and parameter gradients through the Triton kernel as through the dense
    PyTorch reference (fp32; the interpreter on CPU)."""
    import sft
    from data import openmementos, toy_task
    from blocks import MementoConfig, MementoTokens
    from tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    recs = [toy_task.example(5, i) for i in range(2)]
    ex, _ = openmementos.tokenize(recs, tok, 4096)
    ids, labels = openmementos.collate(ex, tok.token_id("<|endoftext|>"))
    mask_from = sft.stage_mask(ids, MementoTokens.from_tokenizer(tok), MementoConfig(0))
    assert (mask_from < NEVER).any()
    results = {}
    calls = _count_kernel_calls(monkeypatch)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MEMENTO_ATTN_BACKEND", backend)
        model = tiny_model(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=16).to(DEVICE).train()
        loss = model(ids.to(DEVICE), mask_from=mask_from.to(DEVICE), labels=labels.to(DEVICE)).sum()
        loss.backward()
        results[backend] = (loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()})
    assert len(calls) == 2  # one kernel call per layer in the triton pass, none in the torch pass
    (lt, gt), (lk, gk) = results["torch"], results["triton"]
    assert abs(lt - lk) <= 1e-4 * abs(lt)
    for n in gt:
        assert (gt[n] - gk[n]).abs().max().item() <= 1e-4 * (1 + gt[n].abs().max().item()), n


# ---------------------------------------------------------------------------------------
# Queries against a compacted KV cache: explicit logical positions (prefill chunks, §6.1).
# ---------------------------------------------------------------------------------------
def _cache_layout(g, B, Tk, Tq, evicted_frac=0.4):
    """Key slots as a compacting cache holds them: increasing logical positions with gaps
    (evicted blocks), some slots EMPTY (mask_from = -1, as kv_cache pads rows), mask_from of
    surviving keys either NEVER or a later position; queries continue after the last key,
    the first few of them overlapping the newest keys (a chunk appended to the cache)."""
    k_pos, mf, q_pos = [], [], []
    for _ in range(B):
        gaps = torch.randint(1, 4, (Tk,), generator=g) * (torch.rand(Tk, generator=g) < evicted_frac)
        pos = torch.cumsum(1 + gaps, 0) - 1
        m = torch.full((Tk,), NEVER, dtype=torch.int64)
        later = torch.rand(Tk, generator=g) < 0.3
        m[later] = pos[later] + 1 + torch.randint(0, 3 * Tq, (int(later.sum()),), generator=g)
        empty = torch.rand(Tk, generator=g) < 0.1
        empty[-Tq:] = False  # the chunk's own keys are real (they may be masked later on)
        m[empty] = -1  # EMPTY slots
        k_pos.append(pos)
        mf.append(m)
        # the chunk's own keys are the last Tq slots: queries sit at their positions
        q_pos.append(pos[-Tq:] if Tq <= Tk else torch.arange(Tq))
    return torch.stack(q_pos), torch.stack(k_pos), torch.stack(mf)


@pytest.mark.parametrize("Tq,Tk,Hq,Hkv,D,dtype", [
    (16, 16, 2, 1, 16, torch.float32),      # a first prefill chunk: the cache holds only it
    (20, 77, 4, 2, 16, torch.float32),      # a chunk against a longer cache, tiles with padding
    (45, 130, 4, 1, 32, torch.float32),
    (33, 64, 2, 2, 64, torch.bfloat16),
])
def test_queries_against_cache_positions_match_reference(Tq, Tk, Hq, Hkv, D, dtype):
    g = torch.Generator().manual_seed(Tq * 7 + Tk)
    B = 2
    q_pos, k_pos, mf = _cache_layout(g, B, Tk, Tq)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    ref = attention_reference(q.float(), k.float(), v.float(), mf, q_pos=q_pos, k_pos=k_pos)
    vis = visible_mask(q_pos, k_pos, mf)
    assert vis.any(-1).all()  # every query sees a key (its own)
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    assert (causal & ~vis).any()  # the memento rule hides keys that causality would show
    with torch.no_grad():
        out = memento_flash_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mf.to(DEVICE), q_pos=q_pos.to(DEVICE),
                                      k_pos=k_pos.to(DEVICE), block_m=16, block_n=16)
    assert out.dtype == dtype and out.shape == (B, Hq, Tq, D)
    atol = TOL[dtype]["out"][0]
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=atol)


def test_cache_positions_skip_evicted_tiles_and_never_load_them():
    # A key tile whose every key is masked for every query of the chunk is skipped: NaN in
    # its V must not reach the output (it would through P @ V if the tile were loaded).
    Tk, Tq = 64, 16
    k_pos = torch.arange(Tk)[None] * 2  # gaps everywhere: positions 0, 2, ..., 126
    mf = torch.full((1, Tk), NEVER)
    mf[0, 16:32] = 100  # hidden from position 100 on
    q_pos = torch.arange(130, 130 + Tq)[None]
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, Tq, 16, generator=g), torch.randn(1, 1, Tk, 16, generator=g), torch.randn(1, 1, Tk, 16, generator=g)
    ref = attention_reference(q, k, v, mf, q_pos=q_pos, k_pos=k_pos)
    v[:, :, 16:32] = float("nan")
    with torch.no_grad():
        out = memento_flash_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mf.to(DEVICE), q_pos=q_pos.to(DEVICE),
                                      k_pos=k_pos.to(DEVICE), block_m=16, block_n=16)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_cache_positions_are_forward_only():
    q, k, v = (t.requires_grad_() for t in _qkv(T=16))
    pos = torch.arange(16, device=DEVICE)[None]
    with pytest.raises(ValueError, match="forward-only"):
        memento_flash_attention(q, k, v, _mf(T=16), q_pos=pos, k_pos=pos)
    with pytest.raises(ValueError, match="pass both q_pos and k_pos"):
        memento_flash_attention(*_qkv(T=16), _mf(T=16), q_pos=pos)


def test_cuda_kernels_compile_pipelined_and_spill_free():
    """What a GPU would run, checked without one: forward (both forms), dQ and dK/dV compiled
    by Triton for sm_90 at head dim 128 in bf16, with the default launch config and the
    specialization an aligned launch gets. Each main loop must be software-pipelined
    (asynchronous copies in the TTGIR and LDGSTS/UTMALDG in the SASS, which the PTX counts
    bench/compile_check.py uses by default must agree with) and spill nothing.
    Compiling needs triton without the interpreter, hence a subprocess."""
    import json
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "bench/compile_check.py", "--arch", "90", "--dtypes", "bf16", "--dims", "128",
                        "--kernels", "reference,fwd,fwd_pos,dq,dkdv", "--sass", "--json"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row["kernel"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == {"reference", "fwd", "fwd_pos", "dq", "dkdv"}
    for name, row in rows.items():
        # pipelined: async copies in the TTGIR, LDGSTS/UTMALDG in the SASS, and the PTX counts
        # CI's compile phase reads (without --sass) agree
        assert row["async_copies"] > 0 and row["ldgsts"] + row["utmaldg"] > 0 and row["cp_async"] + row["tma"] > 0, row
        assert row["stack"] == 0, row  # no spills
        assert row["hgmma"] > 0 and row["wgmma_ops"] > 0, row  # the dots became Hopper's warpgroup MMA (wgmma)


def test_a_prefill_chunk_against_the_cache_builds_its_tile_lists_once(monkeypatch):
    """A chunk of 40 queries against a cache that still holds masked keys (the gathered path,
    the kernel's positions form): tile_schedule runs once for all 3 layers, and the logits equal
    the dense reference backend's (§6.1)."""
    from blocks import MementoConfig, MementoTokens, build_mask_from
    from kv_cache import PagedKVCache
    from memento_kernels import memento_flash
    from tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    ids = tok.prompt_ids("sum") + tok.encode("<think>\n<|block_start|>abcdefghij<|block_end|><|summary_start|>xy"
                                             "<|summary_end|>klmnopqrstuvwxyzabcdefghijklmnop")
    mf = build_mask_from(torch.tensor([ids]), MementoTokens.from_tokenizer(tok), MementoConfig(0))
    calls = []
    real = memento_flash.tile_schedule
    monkeypatch.setattr(memento_flash, "tile_schedule", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MEMENTO_ATTN_BACKEND", backend)
        model = tiny_model(layers=3, hidden=32, heads=4, kv_heads=2, head_dim=16).to(DEVICE)
        cache = PagedKVCache(model.config, torch.float32, DEVICE, page_size=16)
        cache.add(0)
        T = len(ids)
        pos = torch.arange(T, device=DEVICE)[None]
        ids_t = torch.tensor([ids], device=DEVICE)
        with torch.no_grad():  # a first chunk with its masks, then 40 more queries against it
            model.hidden_states(ids_t[:, :T - 40], pos[:, :T - 40], mf[:, :T - 40].to(DEVICE), cache.batch([0]))
            calls.clear()
            h = model.hidden_states(ids_t[:, T - 40:], pos[:, T - 40:], mf[:, T - 40:].to(DEVICE), cache.batch([0]))
        out[backend] = model.logits(h)
        if backend == "triton":
            assert len(calls) == 1, len(calls)  # one build for the three layers
    torch.testing.assert_close(out["triton"], out["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("capability,family", [((8, 0), "sm_80"), ((8, 7), "sm_80"), ((8, 6), "sm_86"),
                                               ((8, 9), "sm_86"), ((9, 0), "sm_90"), ((10, 0), "sm_100"),
                                               ((10, 3), "sm_100"), ((12, 0), "sm_120"), ((12, 1), "sm_120"),
                                               ((7, 5), "sm_86"), ((11, 0), "sm_86")])
def test_each_architecture_family_has_its_table(capability, family):
    """Compute capabilities map to the config table searched under their shared memory (A100
    163 KB, the 8.6/8.9 GPUs 99 KB, Hopper and B200 227 KB, consumer Blackwell 99 KB); an
    unknown one gets the 99 KB table. Every table covers every dtype class and head dim, and
    every tile fits its family's shared memory at 3 bytes per element of Q/K/V tiles
    (a floor that any config of the kernels exceeds)."""
    from memento_kernels import memento_flash

    assert memento_flash.arch_family(capability) == family
    table = memento_flash._CUDA_CONFIGS[family]
    assert set(table) == {(fp32, D) for fp32 in (False, True) for D in (16, 32, 64, 128, 256)}
    for (fp32, D), cfg in table.items():
        assert cfg == memento_flash._config(D, torch.float32 if fp32 else torch.bfloat16, True, None, None, capability)
        for bm, bn, warps, stages in cfg.values():
            assert bm * D * (4 if fp32 else 2) + stages * bn * D * (4 if fp32 else 2) <= memento_flash.ARCH_SMEM[family]
