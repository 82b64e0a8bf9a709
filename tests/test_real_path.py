"""The CUDA path, emulated on the CPU: bf16, the Triton backend, seeds, chunked loss (paper §4, §6.1).

CI has no GPU. What a CUDA run does differently is: bf16 autocast (or a bf16 model), the
Triton kernel as the default attention backend, and sampling with a seed on CUDA logits.
Here the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1) and
autocast runs on the CPU with the same bf16 rules, against fp32 dense references. With a GPU
the same tests run on CUDA, natively (bench/gpu_check.sh).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import memento_text, tiny_model

import memento_attention
import sft
from data import openmementos, toy_task
from engine import EngineConfig, SamplingParams
from sampling import sample
from engine import generate
from memento_kernels import memento_flash
from blocks import MementoConfig, MementoTokens, build_mask_from
from model import IGNORE_INDEX
from tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
IDS = MementoTokens.from_tokenizer(TOK)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model(**kw):
    kw.setdefault("head_dim", 16)  # the kernel's smallest head dim (CUDA runs it for prefill too)
    return tiny_model(**kw).to(DEV)


def _count_calls(monkeypatch):
    """Record the query count of every kernel call (the memento kernel; the paged kernel) and
    every dense reference call."""
    from memento_kernels import paged_attention

    calls = {"kernel": [], "reference": [], "paged": []}
    real_paged = paged_attention.paged_attention

    def paged(q, *a, **kw):
        calls["paged"].append(q.shape[2])
        return real_paged(q, *a, **kw)

    monkeypatch.setattr(paged_attention, "paged_attention", paged)
    real_kernel, real_ref = memento_flash.memento_flash_attention, memento_attention.attention_reference

    def kernel(q, *a, **kw):
        mask = a[2] if len(a) > 2 else kw.get("mask_from")  # positions as arguments, or carried by a TileMask
        with_pos = kw.get("q_pos") is not None or getattr(mask, "q_pos", None) is not None
        calls["kernel"].append((q.shape[2], with_pos))
        return real_kernel(q, *a, **kw)

    def reference(q, *a, **kw):
        calls["reference"].append(q.shape[2])
        return real_ref(q, *a, **kw)

    monkeypatch.setattr(memento_flash, "memento_flash_attention", kernel)
    monkeypatch.setattr(memento_attention, "attention_reference", reference)
    return calls


def _toy_batch(n=2, seed=5):
    recs = [toy_task.example(seed, i) for i in range(n)]
    ex, _ = openmementos.tokenize(recs, TOK, 4096)
    ids, labels = openmementos.collate(ex, TOK.token_id("<|endoftext|>"))
    return ids.to(DEV), labels.to(DEV), sft.stage_mask(ids, IDS, MementoConfig(0)).to(DEV)


def _step(model, ids, labels, mask_from):
    loss = model(ids, mask_from=mask_from, labels=labels).sum()
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ mixed precision (item 1)

def test_autocast_reaches_attention_in_one_dtype(monkeypatch):
    """Under bf16 autocast RMSNorm's fp32 weight makes q and k fp32 while v is bf16: whatever
    reaches the backend must be one dtype (the autocast one), as autocast does for SDPA."""
    seen = []
    real = memento_attention._attention

    def spy(q, k, v, *a):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *a)

    monkeypatch.setattr(memento_attention, "_attention", spy)
    model = _model(layers=2, head_dim=16)
    ids = torch.randint(0, 256, (1, 20), device=DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = model(ids)
    assert seen and all(s == (torch.bfloat16,) * 3 for s in seen)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="share one dtype outside autocast"):
        memento_attention.attention(q, q, q.bfloat16())


@pytest.mark.parametrize("precision", ["autocast", "bf16-model"])
def test_stage2_training_step_triton_bf16_matches_fp32_reference(monkeypatch, precision):
    """A full stage-2 step (memento mask, chunked loss, backward) through the Triton kernel in
    bf16 matches the fp32 dense reference within bf16 tolerance, and the kernel really ran."""
    ids, labels, mask_from = _toy_batch()
    assert (mask_from < memento_attention.NEVER).any()
    monkeypatch.setenv("MEMENTO_ATTN_BACKEND", "torch")
    ref_loss, ref_grad = _step(_model(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=16).train(), ids, labels, mask_from)
    calls = _count_calls(monkeypatch)
    monkeypatch.setenv("MEMENTO_ATTN_BACKEND", "triton")
    model = _model(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=16).train()
    if precision == "autocast":
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss, grad = _step(model, ids, labels, mask_from)
    else:
        loss, grad = _step(model.to(torch.bfloat16), ids, labels, mask_from)
    assert [c[0] for c in calls["kernel"]] == [ids.shape[1]] * 2 and not calls["reference"]
    assert abs(loss - ref_loss) <= 2e-2 * abs(ref_loss)
    assert _rel(grad, ref_grad) <= 0.05  # measured ~0.011 (autocast) and ~0.013 (bf16 model)


# ------------------------------------------------------------------ generation (items 2, 3, 6)

def _replay_case(n_blocks=4, seed=3):
    import random

    rng = random.Random(seed)
    prompt = TOK.encode(TOK.chat_prompt("sum the digits of " + "1 2 3 4 5 6 7 8 9 " * 3))
    resp = TOK.encode(memento_text(rng, n_blocks, block_len=(20, 40), memento_len=(16, 20)))
    return prompt, resp


@pytest.mark.parametrize("precision", ["autocast", "bf16-model"])
def test_generate_triton_bf16_matches_fp32_reference(monkeypatch, precision):
    """Chunked prefill, chunked replay and restart-mode recomputation through the Triton
    kernel with explicit positions, in bf16: logits match one fp32 full forward with the
    dense mask; no dense reference runs at all: chunks of more than 16 queries run the memento
    kernel with positions, shorter ones the paged kernel."""
    model = _model(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=16)
    prompt, resp = _replay_case()
    cfg = MementoConfig(0)
    full = prompt + resp
    with torch.no_grad():
        ids = torch.tensor([full], device=DEV)
        ref = model(ids, mask_from=build_mask_from(ids, IDS, cfg))[0].cpu()
    calls = _count_calls(monkeypatch)
    monkeypatch.setenv("MEMENTO_ATTN_BACKEND", "triton")
    config = EngineConfig(cfg, keep_logits=True, replay_chunk=32, max_num_batched_tokens=24, max_num_seqs=1)
    if precision == "autocast":
        with torch.autocast(DEV, dtype=torch.bfloat16):
            seqs, _ = generate(model, TOK, [prompt], config, forced=[resp])
    else:
        seqs, _ = generate(model.to(torch.bfloat16), TOK, [prompt], config, forced=[resp])
    got = torch.stack(seqs[0].logits)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert calls["kernel"] and all(with_pos for _, with_pos in calls["kernel"])
    assert max(n for n, _ in calls["kernel"]) > 16 and calls["paged"] and max(calls["paged"]) <= 16
    assert not calls["reference"]


def test_no_dense_reference_on_the_kernel_backend(monkeypatch):
    """Training, prefill, replay chunks, restart recomputation and decoding never run the dense
    reference on the triton backend: decode steps read the pages with the paged kernel."""
    calls = _count_calls(monkeypatch)
    monkeypatch.setenv("MEMENTO_ATTN_BACKEND", "triton")
    model = _model(layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16)
    prompt, resp = _replay_case(n_blocks=3)
    with torch.no_grad():
        generate(model, TOK, [prompt], EngineConfig(MementoConfig(0), mode="restart", replay_chunk=64, max_num_batched_tokens=40,
                                                    max_num_seqs=1), forced=[resp])
        generate(model, TOK, [prompt], EngineConfig(MementoConfig(0)), SamplingParams(max_tokens=5), seed=0)
    ids, labels, mask_from = _toy_batch(1)
    model.train()(ids, mask_from=mask_from, labels=labels).sum().backward()
    assert calls["kernel"] and not calls["reference"]
    assert 1 in calls["paged"]  # decoding did run, one query per step, on the paged kernel


# ------------------------------------------------------------------ seeds (item 2)

def _reference_token(row, sc, u):
    """Inverse-CDF sampling written out: sort, top-k, softmax, nucleus, walk the CDF."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if sc.top_k > 0:
        order = order[:sc.top_k]
    z = [row[i] / sc.temperature for i in order]
    m = max(z)
    p = [math.exp(x - m) for x in z]
    total = sum(p)
    p = [x / total for x in p]
    kept, mass = [], 0.0
    for i, x in zip(order, p):
        if mass > sc.top_p:
            break
        kept.append((i, x))
        mass += x
    target = u * sum(x for _, x in kept)
    acc = 0.0
    for i, x in kept:
        acc += x
        if acc > target:
            return i
    return kept[-1][0]


def _reference_uniform(seed, counter):
    """The counter-based uniform written out in Python integers: the 32-bit finaliser (xor-shift
    16, multiply 0x7FEB352D, xor-shift 15, multiply 0x846CA68B, xor-shift 16) applied to the
    seed's low half, then xored with its high half, then with the counter."""
    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)
    seed %= 2**64
    return mix(mix(mix(seed % 2**32) ^ (seed >> 32)) ^ counter) / 2**32


@pytest.mark.parametrize("sc", [SamplingParams(), SamplingParams(1.0, 1.0, 0), SamplingParams(0.7, 0.5, 5)], ids=str)
def test_sampling_is_inverse_cdf_of_one_counter_based_uniform_per_row(sc):
    # row r draws u = hash(its seed, its token index): no generator state
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 50, generator=g) * 3
    for trial in range(20):
        seeds = [trial * 10 + r - 3 for r in range(6)]  # trial 0 has negative seeds
        seeds[5] = 2**70 + trial  # and one beyond 64 bits
        counters = [trial * 7 + r for r in range(6)]
        got = sample(logits, [sc] * 6, seeds, counters)
        want = [_reference_token(logits[r].tolist(), sc, _reference_uniform(seeds[r], counters[r])) for r in range(6)]
        assert got.tolist() == want


def test_sampling_frequencies_follow_the_filtered_distribution():
    """Chi-square over 100,000 draws (one row each, counters 0..n-1) against the filtered
    distribution computed directly."""
    sc = SamplingParams(temperature=0.8, top_p=0.9, top_k=4)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, 0.5]])
    n = 100_000
    draws = sample(logits.expand(n, -1), [sc] * n, [1234] * n, list(range(n)))
    z = logits[0] / 0.8
    top = z.topk(4)
    p = torch.softmax(top.values, 0)
    keep = (p.cumsum(0) - p) <= 0.9
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    kept = top.indices[keep].tolist()
    assert set(draws.tolist()) <= set(kept)
    counts = torch.stack([(draws == i).sum() for i in kept]).double()
    expected = n * p[keep].double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, chi2  # 3 degrees of freedom at most: p = 0.001


def test_sampling_a_row_alone_or_in_a_batch_of_32_gives_the_same_token():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 40, generator=g) * 2
    params = [SamplingParams(temperature=0.5 + r % 3 * 0.3, top_p=[1.0, 0.9, 0.5][r % 3], top_k=[0, 5, 12][r % 3],
                             min_p=[0.0, 0.05][r % 2]) for r in range(32)]
    seeds, counters = [100 + r for r in range(32)], [r * 3 for r in range(32)]
    batch = sample(logits, params, seeds, counters).tolist()
    alone = [sample(logits[r:r + 1], params[r:r + 1], seeds[r:r + 1], counters[r:r + 1]).item() for r in range(32)]
    assert batch == alone


def test_generate_with_a_seed_is_reproducible_and_seeds_differ():
    model = _model(layers=1)
    prompt = TOK.encode(TOK.chat_prompt("hi"))
    runs = [generate(model, TOK, [prompt, prompt], EngineConfig(MementoConfig(0)), SamplingParams(1.0, 1.0, 0, max_tokens=30),
                     seed=s)[0] for s in (1, 1, 2)]
    a, b, c = ([s.tokens for s in r] for r in runs)
    assert a == b and a != c
    assert a[0] != a[1]  # two rows of one batch draw different uniforms


# ------------------------------------------------------------------ chunked cross-entropy (item 4)

def _ce_step(ids, labels, mask_from, chunk, autocast):
    """(losses [B, T-1], flat gradient) of one backward; chunk None = the plain form: full fp32
    logits and one F.cross_entropy, the independent reference."""
    model = _model(layers=2).train()
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
        if chunk is None:
            logits = model(ids, mask_from=mask_from)
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none",
                                     ignore_index=IGNORE_INDEX).view(ids.shape[0], -1)
        else:
            model.loss_chunk_rows = chunk
            losses = model(ids, mask_from=mask_from, labels=labels)
    losses.sum().backward()
    return losses.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_chunked_cross_entropy_equals_plain_loss_and_gradients():
    ids, labels, mask_from = _toy_batch(3)
    assert (labels == IGNORE_INDEX).any() and ids.numel() > 7 * 20
    l0, g0 = _ce_step(ids, labels, mask_from, None, autocast=False)
    assert l0.shape == (ids.shape[0], ids.shape[1] - 1) and (l0[labels[:, 1:] == IGNORE_INDEX] == 0).all()
    for chunk in (7, 100_000):  # many chunks (not dividing B*T), and one
        l1, g1 = _ce_step(ids, labels, mask_from, chunk, autocast=False)
        torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)  # fp32: summation order only
    # bf16 autocast: the same losses as the plain form under autocast; the gradient is as
    # close to the fp32 one as the plain form's (chunking rounds each chunk's bf16 lm_head
    # gradient separately, which adds no measurable error).
    la, ga = _ce_step(ids, labels, mask_from, None, autocast=True)
    lc, gc = _ce_step(ids, labels, mask_from, 7, autocast=True)
    torch.testing.assert_close(lc, la, atol=1e-5, rtol=1e-5)
    assert _rel(gc, g0) <= 1.2 * _rel(ga, g0) + 1e-3
