"""Tests of the paged-attention kernels (memento_kernels/paged_attention.py, paper §6.1).

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, which
conftest.py sets before anything imports triton); shapes are tiny so the file runs in seconds on one core. Each
case is checked against two oracles: paged_attention_reference (the module's own), and
torch SDPA over keys gathered into a dense tensor here, with the slot arithmetic written out
token by token, so the module's gather is not trusted by its own test.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import memento_kernels.paged_attention as pa
from memento_kernels.paged_attention import choose_num_splits, paged_attention, paged_attention_reference

CUDA = torch.cuda.is_available()

DEVICE = "cuda" if CUDA else "cpu"
SPARE_K, SPARE_V = 50.0, 1e3  # K/V of pages no row owns: a wrong page read would swamp the output


def _pool_case(seed, B, Hkv, group, D, W, page, ctx, qlen, dtype, *, q_transposed=False, slot_stride_pad=False):
    """Random pool, shuffled page tables and queries for rows with the given context and query
    lengths. Unused page-table entries point at spare pages filled with SPARE_K / SPARE_V, and
    padded query positions hold NaN: reading either would show in the result."""
    g = torch.Generator().manual_seed(seed)
    pages_of = [math.ceil(c / page) for c in ctx]
    num_pages = sum(pages_of) + 3
    perm = torch.randperm(num_pages, generator=g)
    max_pages = max(pages_of) + 1
    spare = perm[sum(pages_of):]
    table = spare[torch.randint(0, len(spare), (B, max_pages), generator=g)]
    used = 0
    for b, n in enumerate(pages_of):
        table[b, :n] = perm[used:used + n]
        used += n
    slots = num_pages * page
    k = torch.randn(Hkv, slots, D, generator=g)
    v = torch.randn(Hkv, slots, D, generator=g)
    for p in spare.tolist():
        k[:, p * page:(p + 1) * page] = SPARE_K
        v[:, p * page:(p + 1) * page] = SPARE_V
    if slot_stride_pad:  # a pool whose slots are 2*D apart (last dim still contiguous)
        k = torch.cat([k, torch.zeros_like(k)], -1)[..., :D]
        v = torch.cat([v, torch.zeros_like(v)], -1)[..., :D]
    Hq = Hkv * group
    if q_transposed:  # [B, W, Hq, D] as the model makes it, viewed as [B, Hq, W, D]
        q = torch.randn(B, W, Hq, D, generator=g).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, W, D, generator=g)
    for b, n in enumerate(qlen):
        q[b, :, n:] = float("nan")
    return (q.to(dtype), k.to(dtype), v.to(dtype), table.to(torch.int32), torch.tensor(ctx, dtype=torch.int32),
            torch.tensor(qlen, dtype=torch.int32))


def _dense_sdpa(q, k_cache, v_cache, table, ctx, qlen, page, sm_scale=None):
    """Independent oracle: copy each row's keys token by token into a dense [B, Hkv, L, D]
    tensor (token j of row b lives in slot table[b, j // page] * page + j % page), then
    torch SDPA with an explicit boolean mask, in the inputs' dtype."""
    B, Hq, W, D = q.shape
    Hkv = k_cache.shape[0]
    L = int(ctx.max())
    K = torch.zeros(B, Hkv, L, D, dtype=k_cache.dtype)
    V = torch.zeros(B, Hkv, L, D, dtype=v_cache.dtype)
    for b in range(B):
        for j in range(int(ctx[b])):
            slot = int(table[b, j // page]) * page + j % page
            K[b, :, j] = k_cache[:, slot]
            V[b, :, j] = v_cache[:, slot]
    keys = torch.arange(L)
    qpos = ctx[:, None].long() - qlen[:, None].long() + torch.arange(W)[None, :]  # [B, W]
    visible = (keys[None, None, :] <= qpos[:, :, None]) & (keys[None, None, :] < ctx[:, None, None].long())
    pad = torch.arange(W)[None, :] >= qlen[:, None].long()  # [B, W]
    visible |= pad[:, :, None]  # padded queries: any keys (no all-masked row), zeroed below
    q = torch.where(pad[:, None, :, None], torch.zeros((), dtype=q.dtype), q)
    group = Hq // Hkv
    out = F.scaled_dot_product_attention(q, K.repeat_interleave(group, 1), V.repeat_interleave(group, 1),
                                         attn_mask=visible[:, None], scale=sm_scale)
    return out.masked_fill(pad[:, None, :, None], 0.0)


def _run(case, num_splits, **kw):
    q, k, v, table, ctx, qlen = case
    dev = [t.to(DEVICE) for t in case]
    out = paged_attention(*dev, num_splits=num_splits, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    return out.cpu()


def _assert_padding_zero(out, qlen):
    assert torch.isfinite(out).all()
    for b, n in enumerate(qlen.tolist()):
        assert (out[b, :, n:] == 0).all()


def test_hidden_key_ranges_match_a_dense_mask():
    """`hide` (the engine's asynchronous decode steps: a block hidden one step before it is
    evicted) against SDPA over keys gathered token by token with the range masked out by hand;
    an empty range (lo > hi) changes nothing; with and without split."""
    Hkv, group, D, W, page, ctx, qlen = 2, 2, 64, 1, 16, [40, 33, 70, 5], [1, 1, 1, 1]
    case = _pool_case(3, len(ctx), Hkv, group, D, W, page, ctx, qlen, torch.float32)
    q, k, v, table, ctx_t, qlen_t = case
    hide = torch.tensor([[3, 20], [1, 0], [32, 47], [0, 3]], dtype=torch.int32)  # row 1 empty; row 3 all but the last
    B, Hq = q.shape[0], q.shape[1]
    K = torch.zeros(B, Hkv, max(ctx), D)
    V = torch.zeros(B, Hkv, max(ctx), D)
    for b in range(B):
        for j in range(ctx[b]):
            slot = int(table[b, j // page]) * page + j % page
            K[b, :, j], V[b, :, j] = k[:, slot], v[:, slot]
    j = torch.arange(max(ctx))
    visible = (j[None] < torch.tensor(ctx)[:, None]) & ~((j[None] >= hide[:, :1]) & (j[None] <= hide[:, 1:]))
    want = F.scaled_dot_product_attention(q, K.repeat_interleave(group, 1), V.repeat_interleave(group, 1),
                                          attn_mask=visible[:, None, None])
    ref = paged_attention_reference(q, k, v, table, ctx_t, qlen_t, page_size=page, hide=hide)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)
    for splits in (1, 2):
        got = _run(case, splits, page_size=page, hide=hide.to(DEVICE))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    plain = _run(case, 1, page_size=page)
    assert torch.equal(_run(case, 1, page_size=page, hide=torch.tensor([[1, 0]] * B, device=DEVICE)), plain)
    assert not torch.allclose(got[0], plain[0])  # the hidden range mattered
    with pytest.raises(ValueError, match="hide must be an integer"):
        paged_attention(*[t.to(DEVICE) for t in case], page_size=page, hide=torch.zeros(B, 3, dtype=torch.int32))


# (Hkv, group, D, W, page, context_lens, query_lens): GQA groups 1/2/4/8, head dims 64/128,
# query chunks 1/3/16, contexts from 1 token to several pages with ragged ends, rows with
# padded query positions, a context equal to its query chunk, and group x W = 128 rows (two
# query tiles under the interpreter). The interpreter's 32-token key tiles hold two pages of
# 16, one of 32, or half a page of 64.
CASES_FP32 = [
    (2, 1, 64, 1, 16, [1, 37, 64], [1, 1, 1]),
    (1, 2, 128, 3, 16, [3, 50, 96], [3, 2, 3]),
    (1, 4, 64, 16, 32, [16, 70, 129], [16, 5, 16]),
    (1, 8, 128, 1, 64, [2, 33, 100], [1, 1, 1]),
    (1, 8, 64, 16, 16, [16, 47, 80], [16, 3, 9]),
]
CASES_BF16 = [
    (2, 1, 128, 16, 16, [16, 40, 77], [16, 9, 1]),
    (1, 2, 64, 1, 32, [1, 65, 200], [1, 1, 1]),
    (1, 4, 128, 3, 64, [3, 31, 150], [3, 3, 2]),
    (1, 8, 64, 16, 16, [16, 35, 60], [16, 7, 12]),
]


@pytest.mark.parametrize("spec", CASES_FP32, ids=lambda s: f"g{s[1]}-D{s[2]}-W{s[3]}-p{s[4]}")
def test_fp32_matches_both_oracles_with_and_without_split(spec):
    Hkv, group, D, W, page, ctx, qlen = spec
    case = _pool_case(0, len(ctx), Hkv, group, D, W, page, ctx, qlen, torch.float32,
                      q_transposed=W == 3, slot_stride_pad=group == 2)
    q, k, v, table, ctx_t, qlen_t = case
    ref = paged_attention_reference(q, k, v, table, ctx_t, qlen_t, page_size=page)
    dense = _dense_sdpa(q, k, v, table, ctx_t, qlen_t, page)
    torch.testing.assert_close(ref, dense, atol=1e-5, rtol=1e-5)  # the two oracles agree
    one = _run(case, 1, page_size=page)
    split = _run(case, 3, page_size=page)
    torch.testing.assert_close(one, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(one, dense, atol=2e-5, rtol=2e-5)
    # Splitting only reorders the fp32 sums: agreement to fp32 rounding.
    torch.testing.assert_close(split, one, atol=2e-6, rtol=2e-6)
    _assert_padding_zero(one, qlen_t)
    _assert_padding_zero(split, qlen_t)


@triton.jit
def _to_bf16_kernel(X, Y, N: tl.constexpr):
    tl.store(Y + tl.arange(0, N), tl.load(X + tl.arange(0, N)).to(tl.bfloat16))


@pytest.fixture(scope="module")
def triton_bf16_truncates():
    """Whether Triton's fp32 -> bf16 conversion rounds toward zero here. On a GPU it rounds to
    nearest even (cvt.rn); the interpreter of Triton 3.9 drops the low 16 bits instead
    (create_fp_trunc ignores the rounding mode), which doubles every bf16 rounding error of
    the kernel. The bf16 test compares against a baseline rounded the same way."""
    x = torch.tensor([1.0 + 2 ** -8 + 2 ** -10] * 16, device=DEVICE)  # halfway-plus: nearest rounds up
    y = torch.empty(16, dtype=torch.bfloat16, device=DEVICE)
    _to_bf16_kernel[(1,)](x, y, N=16)
    return bool((y.float() < x).all())


def _round_bf16(x, truncate):
    x = x.float().contiguous()
    if truncate:
        return (x.view(torch.int32) & -65536).view(torch.float32)
    return x.to(torch.bfloat16).float()


@pytest.mark.parametrize("spec", CASES_BF16, ids=lambda s: f"g{s[1]}-D{s[2]}-W{s[3]}-p{s[4]}")
def test_bf16_error_within_twice_sdpa_error(spec, triton_bf16_truncates):
    """bf16: the error against the fp32 result of the same (bf16) inputs is at most twice the
    error of bf16 SDPA, plus 1e-3. The kernel rounds P to bf16 before P @ V (every flash
    kernel does) and rounds its output; SDPA on bf16 inputs computes in fp32 and rounds its
    output. Where Triton's bf16 conversion truncates (the interpreter), the SDPA baseline's
    output is truncated likewise, so both sides round the same way (measured: the kernel's
    error is 1.0 to 1.6 times the baseline's on these cases)."""
    Hkv, group, D, W, page, ctx, qlen = spec
    case = _pool_case(1, len(ctx), Hkv, group, D, W, page, ctx, qlen, torch.bfloat16, q_transposed=W == 3)
    q, k, v, table, ctx_t, qlen_t = case
    exact = paged_attention_reference(q.float(), k.float(), v.float(), table, ctx_t, qlen_t, page_size=page)
    sdpa = _dense_sdpa(q.float(), k.float(), v.float(), table, ctx_t, qlen_t, page)  # fp32 math on bf16 values
    if not triton_bf16_truncates:  # bf16 SDPA proper (on CPU: fp32 math, output rounded to nearest)
        sdpa = _dense_sdpa(q, k, v, table, ctx_t, qlen_t, page)
    sdpa_err = (_round_bf16(sdpa, triton_bf16_truncates) - exact).abs().max()
    bound = 2 * sdpa_err + 1e-3
    ref_err = (paged_attention_reference(q, k, v, table, ctx_t, qlen_t, page_size=page).float() - exact).abs().max()
    assert ref_err <= bound
    one = _run(case, 1, page_size=page)
    split = _run(case, 4, page_size=page)
    for out in (one, split):
        assert (out.float() - exact).abs().max() <= bound, ((out.float() - exact).abs().max(), sdpa_err)
        _assert_padding_zero(out, qlen_t)
    # P is rounded to bf16 relative to each split's own running max, so split and unsplit
    # agree to bf16 rounding (not bitwise): within one bf16 step of the output's magnitude.
    torch.testing.assert_close(split.float(), one.float(), atol=2 ** -7, rtol=2 ** -7)


def test_fp16_and_defaults():
    """fp16 inputs; query_lens=None (every row uses all W positions); default num_splits; a
    custom sm_scale; more splits than the row has key tiles (empty splits)."""
    case = _pool_case(2, 2, 2, 2, 64, 2, 16, [5, 40], [2, 2], torch.float16)
    q, k, v, table, ctx, qlen = case
    exact = paged_attention_reference(q.float(), k.float(), v.float(), table, ctx, None, page_size=16, sm_scale=0.3)
    for splits in (None, 1, 16):
        out = paged_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), table.to(DEVICE), ctx.to(DEVICE),
                              page_size=16, sm_scale=0.3, num_splits=splits).cpu()
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), exact, atol=3e-3, rtol=3e-3)


def test_row_without_queries_is_all_zero():
    # query_lens[b] = 0: an idle row of the batch; its whole output is padding.
    case = _pool_case(3, 2, 1, 2, 64, 3, 16, [20, 9], [0, 3], torch.float32)
    for splits in (1, 2):
        out = _run(case, splits, page_size=16)
        _assert_padding_zero(out, case[5])
    ref = paged_attention_reference(*case, page_size=16)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_choose_num_splits():
    # A grid that fills the device twice over: no split.
    assert choose_num_splits(64, 8, 4096, 16, 132) == 1
    # One sequence, 8 kv heads on 132 SMs: ceil(264 / 8) = 33, capped at 16.
    assert choose_num_splits(1, 8, 32768, 16, 132) == 16
    # Short context: no more splits than key tiles (100 tokens, 64-token tiles: 2).
    assert choose_num_splits(1, 8, 100, 16, 132, block_n=64) == 2
    assert choose_num_splits(1, 8, 100, 16, 132) == 7  # block_n defaults to the page size
    # In between: ceil(2 * 108 / (4 * 8)) = 7.
    assert choose_num_splits(4, 8, 1 << 20, 16, 108) == 7
    # Query tiles count as programs too.
    assert choose_num_splits(4, 8, 1 << 20, 16, 108, query_tiles=7) == 1
    assert choose_num_splits(1, 1, 0, 16, 8) == 1
    with pytest.raises(ValueError, match="num_sms"):
        choose_num_splits(1, 1, 10, 16, 0)


def _good(**over):
    args = dict(q=torch.zeros(2, 4, 1, 64), k_cache=torch.zeros(2, 64, 64), v_cache=torch.zeros(2, 64, 64),
                page_table=torch.zeros(2, 2, dtype=torch.int32), context_lens=torch.tensor([3, 17], dtype=torch.int32))
    args.update(over)
    return args


@pytest.mark.parametrize("over, kw, match", [
    (dict(q=torch.zeros(2, 4, 64)), {}, "4-D"),
    (dict(k_cache=torch.zeros(2, 64, 32)), {}, "k_cache and v_cache"),
    (dict(q=torch.zeros(2, 3, 1, 64)), {}, "multiple of kv heads"),
    (dict(q=torch.zeros(2, 4, 17, 64)), {}, "W=17"),
    (dict(q=torch.zeros(2, 4, 1, 48), k_cache=torch.zeros(2, 64, 48), v_cache=torch.zeros(2, 64, 48)), {}, "head dim"),
    (dict(q=torch.zeros(2, 4, 1, 64, dtype=torch.float64), k_cache=torch.zeros(2, 64, 64, dtype=torch.float64),
          v_cache=torch.zeros(2, 64, 64, dtype=torch.float64)), {}, "dtype"),
    (dict(q=torch.zeros(2, 4, 1, 64, dtype=torch.bfloat16)), {}, "share one dtype"),
    ({}, dict(page_size=8), "gathered path"),
    (dict(k_cache=torch.zeros(2, 96, 64), v_cache=torch.zeros(2, 96, 64)), dict(page_size=48), "gathered path"),
    (dict(k_cache=torch.zeros(2, 40, 64), v_cache=torch.zeros(2, 40, 64)), {}, "multiple of page_size"),
    (dict(page_table=torch.zeros(3, 2, dtype=torch.int32)), {}, "page_table must be"),
    (dict(page_table=torch.zeros(2, 2)), {}, "integer"),
    (dict(context_lens=torch.tensor([3])), {}, "context_lens must be"),
    (dict(query_lens=torch.tensor([1, 2])), {}, "query_lens must lie"),
    (dict(context_lens=torch.tensor([3, 33])), {}, "context_lens must lie"),
    (dict(page_table=torch.tensor([[0, 0], [1, 9]])), {}, "page ids outside"),
    ({}, dict(num_splits=0), "num_splits"),
    ({}, dict(num_splits=17), "num_splits"),
    (dict(k_cache=torch.zeros(2, 64, 128)[..., ::2], v_cache=torch.zeros(2, 64, 128)[..., ::2]), {}, "contiguous"),
])
def test_bad_inputs_raise(over, kw, match):
    kw = dict(dict(page_size=16), **kw)
    with pytest.raises(ValueError, match=match):
        paged_attention(**_good(**over), **kw)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(pa, "_INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        paged_attention(**_good(), page_size=16)


def test_reference_accepts_any_page_size():
    # The oracle is the gathered path's semantics: page size 4 (refused by the kernel) works.
    case = _pool_case(4, 2, 1, 2, 16, 1, 4, [3, 10], [1, 1], torch.float32)
    ref = paged_attention_reference(*case, page_size=4)
    torch.testing.assert_close(ref, _dense_sdpa(*case, 4), atol=1e-5, rtol=1e-5)


def test_cuda_kernels_compile_pipelined_and_spill_free():
    """What a GPU would run, checked without one: the paged kernels compiled by Triton for
    sm_90 in bf16 at head dim 128 and page size 16, with paged_attention's default config
    and an aligned launch's specialization (bench/compile_check.py). The page loops must be
    software-pipelined (asynchronous copies in the TTGIR, LDGSTS in the SASS) and nothing may
    spill. Compiling needs triton without the interpreter, hence a subprocess."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    names = ["paged_dec"]  # the decode path; CI's `compile_check.py --strict` covers every variant
    r = subprocess.run([sys.executable, "bench/compile_check.py", "--arch", "90", "--dtypes", "bf16", "--dims", "128",
                        "--kernels", ",".join(names), "--sass", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row["kernel"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == set(names)
    for row in rows.values():
        assert row["stack"] == 0, row  # no spills
        # pipelined: async copies in the TTGIR, LDGSTS/UTMALDG in the SASS, and the PTX counts
        # CI's compile phase reads (without --sass) agree
        assert row["async_copies"] > 0 and row["ldgsts"] + row["utmaldg"] > 0 and row["cp_async"] + row["tma"] > 0, row
