"""Asynchronous scheduling (engine.py, paper §6.1) against the synchronous engine, the reference.

The asynchronous engine plans and launches a step before it has read the previous step's
tokens, hides a block on the device when the token in flight completes its memento, and
evicts it one step later. Whatever the workload, a request must get exactly what the
synchronous engine gives it: tokens, log-probabilities, KV curve, preemptions, stop reason.
The model is a small one trained on the embedded task (conftest.toy_policy), so that its
samples complete blocks and mementos and the hidden-range path really runs (counted).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocks import MementoConfig
from checkpoint import local_checkpoint
from engine import Engine, EngineConfig, Mode
from model import Qwen3
from sampling import SamplingParams
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def policy(toy_policy):
    path = local_checkpoint(toy_policy)
    return Qwen3.from_pretrained(path).eval(), Tokenizer.from_dir(path)


PROMPTS = [f"sum {n} blocks from {s}" for n, s in ((3, 1), (4, 7), (5, 2), (6, 0), (3, 9), (4, 4), (5, 5), (6, 8))]


def run(model, tok, asynchronous, requests, **config):
    """(per request: tokens, log-probs, curve, preemptions, stop reason; the engine's stats;
    the tokens on_token streamed per request)."""
    streamed = {}
    eng = Engine(model, tok, EngineConfig(async_scheduling=asynchronous, **config),
                 on_token=lambda i, t, kind: streamed.setdefault(i, []).append(t))
    seqs = [eng.add(tok.prompt_ids(p), sp, mode=m) for p, sp, m in requests]
    eng.run()
    out = [(s.tokens, s.curve, s.preemptions, s.stop_reason) for s in seqs]
    return out, eng.stats, [streamed.get(s.id, []) for s in seqs], eng, [s.logprobs for s in seqs]


def requests(n, mode="memento", max_tokens=160, **sp):
    return [(PROMPTS[i % len(PROMPTS)], SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=max_tokens,
                                                       seed=i, **sp), mode) for i in range(n)]


def compare(policy, reqs, **config):
    """Run both engines; tokens, curves, preemptions and stop reasons must be equal, the log-
    probabilities equal within 1e-4 (a step that runs ahead still holds the rows whose token in
    flight ended them, so its matrix products have other shapes: float rounding moves)."""
    model, tok = policy
    sync, _, sync_streamed, _, sync_lp = run(model, tok, False, reqs, **config)
    got, stats, streamed, eng, lp = run(model, tok, True, reqs, **config)
    assert got == sync
    for a, b in zip(lp, sync_lp):
        assert len(a) == len(b) and [x != x for x in a] == [x != x for x in b]  # NaN where forced
        assert all(abs(x - y) <= 1e-4 for x, y in zip(a, b) if x == x), max(abs(x - y) for x, y in zip(a, b) if x == x)
    assert streamed == [t for t, *_ in got] == sync_streamed  # only final tokens are streamed
    assert eng.inflight is None and not eng.running and eng.cache.held_page_count() == 0
    return stats


def test_decoding_ahead_equals_the_synchronous_engine(policy):
    """Eight requests with room for all: most steps run ahead, and blocks are hidden on the
    device and evicted a step later, many times; every request's tokens, log-probabilities,
    curve and stop reason equal the synchronous engine's."""
    stats = compare(policy, requests(8, logprobs=2), max_num_seqs=8, unbounded_kv_cache=True)
    assert stats["ahead"] > 0.5 * stats["steps"], stats
    assert stats["ahead_evictions"] >= 8, stats  # the hidden-range path ran


def test_under_pool_pressure_preemptions_are_the_same(policy):
    """A pool that holds about two of six sequences: preemptions happen (in synchronous steps)
    and are the same, request by request, as are all results."""
    stats = compare(policy, requests(6), max_num_seqs=6, kv_cache_tokens=16 * 14, page_size=16,
                    max_num_batched_tokens=64)
    assert stats["preemptions"] > 0 and stats["ahead"] > 0, stats


@pytest.mark.parametrize("masking", [MementoConfig(1), MementoConfig(0, keep_last_block_for_answer=True),
                                     MementoConfig(0, mask_delimiters=True)], ids=["keep1", "answer", "delims"])
def test_other_masking_rules(policy, masking):
    stats = compare(policy, requests(4), max_num_seqs=4, unbounded_kv_cache=True, masking=masking)
    assert stats["ahead"] > 0, stats


def test_restart_and_full_modes_and_stops(policy):
    """Restart mode (its memento steps run synchronously), full mode, stop strings, stop token
    ids and max_block_tokens (a forced <|block_end|>) side by side."""
    reqs = requests(2, mode="restart") + requests(2, mode="full") + \
        [(PROMPTS[4], SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=120, seed=11, stop=["</think>"]), "memento"),
         (PROMPTS[5], SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=120, seed=12, stop_token_ids=(44,)),
          "memento")]
    stats = compare(policy, reqs, max_num_seqs=6, unbounded_kv_cache=True, max_block_tokens=9)
    assert stats["ahead"] > 0, stats


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), pool=st.integers(6, 40), page=st.sampled_from([4, 16]), seqs=st.integers(1, 6),
       budget=st.integers(6, 48), modes=st.lists(st.sampled_from(["memento", "full", "restart"]), min_size=6, max_size=6),
       max_tokens=st.integers(1, 120), greedy=st.booleans())
def test_random_workloads(policy, n, pool, page, seqs, budget, modes, max_tokens, greedy):
    """Random pools, page sizes, batch limits, modes and lengths: the same results as the
    synchronous engine, request by request."""
    reqs = [(PROMPTS[i], SamplingParams(temperature=0.0 if greedy else 1.0, top_k=0, top_p=1.0, max_tokens=max_tokens,
                                        seed=i, logprobs=0), modes[i]) for i in range(n)]
    compare(policy, reqs, max_num_seqs=seqs, kv_cache_tokens=page * pool, page_size=page,
            max_num_batched_tokens=max(budget, seqs))


def test_the_paged_kernel_hides_the_block(policy, monkeypatch):
    """The same comparison with the Triton backend (the paged-attention kernel under the
    interpreter reads the pool in place and applies the hidden range itself)."""
    monkeypatch.setenv("MEMENTO_ATTN_BACKEND", "triton")
    stats = compare(policy, requests(3, max_tokens=100), max_num_seqs=3, unbounded_kv_cache=False,
                    kv_cache_tokens=16 * 64, page_size=16)
    assert stats["ahead_evictions"] > 0, stats
