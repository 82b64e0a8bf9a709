"""The serving engine and its paged cache against independent references (paper §6.1, §A.3.1).

References: one full forward of each sequence with its memento mask (no cache at all), the
same request run alone, an unlimited pool, and page bookkeeping recounted from scratch.
"""
import math
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO, memento_text, run_generate, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Engine, SampleConfig
from generate import generate
from kv_cache import PagedKVCache
from memento_attention import MementoConfig, MementoTokens, build_mask_from
from tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
IDS = MementoTokens.from_tokenizer(TOK)
CONFIGS = [MementoConfig(-1), MementoConfig(0), MementoConfig(1), MementoConfig(0, mask_delimiters=True),
           MementoConfig(0, keep_last_block_for_answer=True)]


def _requests(seed, n, blocks=(1, 5)):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = TOK.encode(TOK.chat_prompt("sum " + " ".join(str(rng.randrange(10)) for _ in range(rng.randint(1, 8)))))
        out.append((prompt, TOK.encode(memento_text(rng, rng.randint(*blocks)))))
    return out


def _full_forward(model, ids, cfg):
    x = torch.tensor([ids])
    with torch.no_grad():
        return model(x, mask_from=build_mask_from(x, IDS, cfg))[0]


def _run_over_time(model, cfg, reqs, **kw):
    """Requests arriving over time: two at the start, then one more every other step."""
    eng = Engine(model, TOK, cfg, keep_logits=True, **kw)
    seqs, pending, step = [], list(reqs), 0
    while pending or eng.waiting or eng.running:
        if pending and (step < 1 or step % 2 == 0):
            for _ in range(2 if step == 0 else 1):
                if pending:
                    p, r = pending.pop(0)
                    seqs.append(eng.add(p, forced=r, max_new_tokens=len(r)))
        eng.step()
        step += 1
    return seqs, eng


@pytest.mark.parametrize("page_size", [1, 16, 7])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_engine_logits_equal_full_forward(page_size, cfg):
    model = tiny_model(seed=1)
    reqs = _requests(page_size, 5)
    seqs, eng = _run_over_time(model, cfg, reqs, page_size=page_size, max_num_seqs=3, replay_chunk=5,
                               max_num_batched_tokens=9)
    assert eng.stats["max_running"] == 3  # they really ran together
    for (p, r), s in zip(reqs, seqs):
        ref = _full_forward(model, p + r, cfg)
        assert s.stop_reason == "end of trace"
        assert (torch.stack(s.logits) - ref).abs().max().item() <= 1e-4
        alone, _ = generate(model, TOK, [p], cfg, forced=[r], max_new_tokens=len(r))  # the request run alone
        assert alone[0].curve == s.curve and len(s.curve) == len(p) + len(r)
    assert eng.cache.stats()["held_pages"] == 0  # every page came back


def _pool_counts_are_consistent(cache):
    st = cache.stats()
    held = sum(math.ceil(s.length / cache.page_size) for s in cache.seqs.values())
    assert all(len(s.pages) == math.ceil(s.length / cache.page_size) for s in cache.seqs.values())
    assert st["held_pages"] == held and st["free_pages"] + held == st["pages"]
    pages = [p for s in cache.seqs.values() for p in s.pages]
    assert len(set(pages)) == len(pages) and not set(pages) & set(cache.free_pages)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_preemption_gives_the_same_results_as_an_unlimited_pool(page_size):
    model = tiny_model(seed=2)
    cfg = MementoConfig(0)
    reqs = _requests(7, 6, blocks=(3, 6))
    prompts = [p for p, _ in reqs]
    tight = 160 // page_size * page_size  # one sequence of up to ~115 tokens fits; two or three run at once
    for forced in (None, [r for _, r in reqs]):
        ref, _ = generate(model, TOK, prompts, cfg, forced=forced, max_new_tokens=80,
                          sampling=SampleConfig(temperature=0), page_size=page_size)
        eng = Engine(model, TOK, cfg, sampling=SampleConfig(temperature=0), page_size=page_size, kv_cache_tokens=tight,
                     max_num_seqs=6, replay_chunk=3)
        seqs = [eng.add(p, forced=None if forced is None else forced[i], max_new_tokens=80 if forced is None else len(forced[i]))
                for i, p in enumerate(prompts)]
        while eng.waiting or eng.running:
            eng.step()
            _pool_counts_are_consistent(eng.cache)
            assert eng.cache.stats()["held_pages"] <= eng.cache.num_pages
        assert eng.stats["preemptions"] > 0
        for a, b in zip(ref, seqs):
            assert a.tokens == b.tokens and a.curve == b.curve  # evicted blocks stayed evicted
        assert any(s.preemptions for s in seqs)


def test_sampled_tokens_do_not_depend_on_batching_or_the_pool():
    model = tiny_model(seed=3)
    prompts = [p for p, _ in _requests(11, 5)]
    runs = [generate(model, TOK, prompts, MementoConfig(0), max_new_tokens=40, seed=5, **kw)[0]
            for kw in ({}, {"max_num_seqs": 1}, {"max_num_seqs": 2, "kv_cache_tokens": 128, "page_size": 8})]
    assert [s.tokens for s in runs[0]] == [s.tokens for s in runs[1]] == [s.tokens for s in runs[2]]


def test_engine_keeps_no_autograd_history_when_called_with_grad_enabled():
    """A caller outside torch.no_grad (eval.py, experiments) must not grow a graph through the
    KV pool: that once took a 2,400-sample evaluation to 24 GB."""
    model = tiny_model(seed=3).requires_grad_(True)
    eng = Engine(model, TOK, MementoConfig(0), sampling=SampleConfig(temperature=0), keep_cache=True)
    seqs = [eng.add(p, max_new_tokens=12) for p, _ in _requests(3, 2)]
    assert torch.is_grad_enabled()
    eng.run()
    assert eng.cache.k.grad_fn is None and eng.cache.v.grad_fn is None and not eng.cache.k.requires_grad
    assert all(len(s.tokens) > 0 for s in seqs)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(4, 40), st.lists(st.tuples(st.integers(0, 5), st.integers(0, 12), st.integers(0, 30)),
                                                       min_size=1, max_size=40))
def test_no_page_leaks(page_size, num_pages, ops):
    """Random appends, evictions and frees on a bounded pool: after every operation each
    sequence holds ceil(tokens / page_size) pages, held + free = total, no page is shared."""
    cfg = tiny_model().config
    cache = PagedKVCache(cfg, torch.float32, "cpu", page_size=page_size, num_pages=num_pages)
    pos = {}
    for sid, n, x in ops:
        if sid not in cache.seqs:
            cache.add(sid)
            pos[sid] = 0
        if x >= 25:
            cache.free(sid)
            del pos[sid]
        elif x >= 15 and cache.length(sid):
            others = {o: cache.read(o) for o in cache.seqs if o != sid}
            lo = pos[sid] - 1 - x % max(1, cache.length(sid))
            cache.evict(sid, lo, pos[sid] - 1)
            for o, before in others.items():  # evicting one sequence's block touches only that sequence
                assert all(torch.equal(a, b) for a, b in zip(before, cache.read(o)))
        elif n and cache.pages_to_append(sid, n) <= cache.free_page_count():
            p = torch.arange(pos[sid], pos[sid] + n)[None]
            b = cache.batch([sid])
            b.append(p, None)
            for layer in b.layers:
                layer.update(torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim),
                             torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim))
            pos[sid] += n
        _pool_counts_are_consistent(cache)
    for sid in list(cache.seqs):
        cache.free(sid)
    assert len(cache.free_pages) == num_pages == cache.stats()["free_pages"]


def test_engine_edge_cases():
    model = tiny_model(seed=4)
    cfg = MementoConfig(0)
    prompt, resp = _requests(3, 1)[0]
    # replay of an empty response ends (it used to hang); a stop token is fed and counted
    seqs, _ = generate(model, TOK, [prompt], cfg, forced=[[]])
    assert seqs[0].stop_reason == "end of trace" and len(seqs[0].curve) == len(prompt)
    seqs, _ = generate(model, TOK, [prompt], cfg, max_new_tokens=300, seed=0, sampling=SampleConfig(1.0, 1.0, 0))
    s = seqs[0]
    if s.stop_reason == "stop token":
        assert s.tokens[-1] in (TOK.token_id("<|im_end|>"), TOK.token_id("<|endoftext|>"))
    assert len(s.curve) == len(prompt) + len(s.tokens)  # every token, the last included, was fed
    # a prompt that needs more pages than the pool holds is rejected; the others still run
    long = TOK.encode(TOK.chat_prompt("x" * 200))
    seqs, eng = generate(model, TOK, [prompt, long, prompt], cfg, forced=[resp, resp, resp], kv_cache_tokens=160,
                         page_size=16)
    assert seqs[1].stop_reason.startswith("rejected: the prompt needs") and not seqs[1].tokens
    assert seqs[0].stop_reason == seqs[2].stop_reason == "end of trace" and eng.stats["rejected"] == 1
    for bad in (dict(page_size=0), dict(kv_cache_tokens=0), dict(max_num_seqs=0), dict(kv_cache_tokens=8, page_size=16)):
        with pytest.raises(ValueError):
            Engine(model, TOK, cfg, **bad)
    with pytest.raises(ValueError, match="empty prompt"):
        Engine(model, TOK, cfg).add([])


def test_cli_many_prompts_and_budget_errors(checkpoint, tmp_path):
    import json

    prompts = tmp_path / "p.txt"
    prompts.write_text("sum 3 blocks from 1\n\n" + json.dumps({"problem": "sum 4 blocks from 2"}) + "\n")
    r = run_generate("--checkpoint", str(checkpoint), "--prompts-file", str(prompts), "--num-samples", "3", "--max-new-tokens", "20",
             "--json", "--max-num-seqs", "2", "--kv-cache-tokens", "512", "--page-size", "8")
    assert r.returncode == 0, r.stderr
    out = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(out) == 6 and [o["name"] for o in out][:3] == [f"{prompts}:1#{k}" for k in range(3)]
    assert len({tuple(o["token_ids"]) for o in out[:3]}) > 1  # three samples, three seeds
    for flag, value in (("--kv-cache-tokens", "0"), ("--page-size", "-1"), ("--max-num-seqs", "0"), ("--kv-cache-gib", "0")):
        r = run_generate("--checkpoint", str(checkpoint), "--prompt", "x", flag, value)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and flag in r.stderr, (flag, r.stderr)
    r = run_generate("--checkpoint", str(checkpoint), "--prompt", "x", "--kv-cache-tokens", "8", "--page-size", "16")
    assert r.returncode == 2 and "hold no page" in r.stderr


def test_serving_benchmark_runs():
    # bench/bench_serve.py end to end on a tiny model and workload (the real run is minutes)
    r = subprocess.run([sys.executable, "bench/bench_serve.py", "--quick"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "all requests finished: True" in r.stdout and "memento / full: throughput" in r.stdout
