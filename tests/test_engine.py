"""The serving engine and its paged cache against independent references (paper §6.1, §A.3.1).

References: one full forward of each sequence with its memento mask (no cache at all), the
same request run alone, an unlimited pool, the §A.3.1 count written out by hand, and page
bookkeeping recounted from scratch.
"""
import json
import math
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO, memento_text, run_generate, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Engine, EngineConfig, SamplingParams, gpu_kv_budget_bytes
from engine import generate
from kv_cache import PagedKVCache
from blocks import MementoConfig, MementoTokens, build_mask_from
from tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
IDS = MementoTokens.from_tokenizer(TOK)
CONFIGS = [MementoConfig(-1), MementoConfig(0), MementoConfig(1), MementoConfig(0, mask_delimiters=True),
           MementoConfig(0, keep_last_block_for_answer=True)]
GREEDY = SamplingParams(temperature=0)


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


def _run_over_time(model, config, reqs):
    """Requests arriving over time: two at the start, then one more every other step."""
    eng = Engine(model, TOK, config)
    seqs, pending, step = [], list(reqs), 0
    while pending or eng.waiting or eng.running:
        if pending and (step < 1 or step % 2 == 0):
            for _ in range(2 if step == 0 else 1):
                if pending:
                    p, r = pending.pop(0)
                    seqs.append(eng.add(p, forced=r))
        eng.step()
        step += 1
    return seqs, eng


def _pool_counts_are_consistent(cache):
    st = cache.stats()
    held = sum(math.ceil(s.length / cache.page_size) for s in cache.seqs.values())
    assert all(len(s.pages) == math.ceil(s.length / cache.page_size) for s in cache.seqs.values())
    assert st["held_pages"] == held and st["free_pages"] + held == st["pages"] and held <= cache.num_pages
    pages = [p for s in cache.seqs.values() for p in s.pages]
    assert len(set(pages)) == len(pages) and not set(pages) & set(cache.free_pages)
    assert len(cache.free_pages) + held == cache.allocated


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("page_size", [1, 16, 7])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_engine_logits_equal_full_forward(page_size, cfg):
    model = tiny_model(seed=1)
    reqs = _requests(page_size, 5)
    config = EngineConfig(cfg, keep_logits=True, page_size=page_size, max_num_seqs=3, replay_chunk=5,
                          max_num_batched_tokens=9)
    seqs, eng = _run_over_time(model, config, reqs)
    assert eng.stats["max_running"] == 3  # they really ran together
    for (p, r), s in zip(reqs, seqs):
        ref = _full_forward(model, p + r, cfg)
        assert s.stop_reason == "end of trace"
        assert (torch.stack(s.logits) - ref).abs().max().item() <= 1e-4
        alone, _ = generate(model, TOK, [p], EngineConfig(cfg), forced=[r])  # the request run alone
        assert alone[0].curve == s.curve and len(s.curve) == len(p) + len(r)
    assert eng.cache.stats()["held_pages"] == 0  # every page came back


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_preemption_gives_the_same_results_as_an_unlimited_pool(page_size):
    model = tiny_model(seed=2)
    reqs = _requests(7, 6, blocks=(3, 6))
    prompts = [p for p, _ in reqs]
    tight = 160 // page_size * page_size  # one sequence of up to ~115 tokens fits; two or three run at once
    for forced in (None, [r for _, r in reqs]):
        params = SamplingParams(temperature=0, max_tokens=80)
        ref, _ = generate(model, TOK, prompts, EngineConfig(page_size=page_size, unbounded_kv_cache=True), params,
                          forced=forced)
        eng = Engine(model, TOK, EngineConfig(page_size=page_size, kv_cache_tokens=tight, max_num_seqs=6, replay_chunk=3))
        seqs = [eng.add(p, params, forced=None if forced is None else forced[i]) for i, p in enumerate(prompts)]
        while eng.waiting or eng.running:
            eng.step()
            _pool_counts_are_consistent(eng.cache)
        assert eng.stats["preemptions"] > 0 and any(s.preemptions for s in seqs)
        for a, b in zip(ref, seqs):
            assert a.tokens == b.tokens and a.curve == b.curve  # evicted blocks stayed evicted


def test_a_preempted_long_trace_comes_back_by_its_compacted_footprint(shared_data):
    """Real traces teacher-forced through a pool that holds each one's compacted peak with room
    to spare, but not the longest one's stream: the newest (the longest trace) is preempted
    after its stream outgrew the pool, comes back because re-admission asks for what its
    re-prefill will hold (not its stream length), and every sequence equals an unlimited
    pool's run: logits, KV curve, tokens."""
    lines = [json.loads(l) for l in (shared_data / "memento_traces.jsonl").read_text().splitlines() if l.strip()]
    traces = [(TOK.encode(TOK.chat_prompt(d["problem"])), TOK.encode(d["response"])) for d in lines]
    order = [1, 0, 0]  # the shorter trace first, then the longest twice: the last one is the newest
    longest = max(len(p) + len(r) for p, r in traces)
    model = tiny_model(layers=1, hidden=16, heads=2, kv_heads=1)
    pool = 9008  # tokens: 1.17x the largest compacted peak (7,686), 0.58x the longest stream (15,658)
    runs = {}
    for name, budget in (("tight", dict(kv_cache_tokens=pool)), ("unlimited", dict(unbounded_kv_cache=True))):
        eng = Engine(model, TOK, EngineConfig(MementoConfig(0), replay_chunk=16, max_num_seqs=4, keep_logits=True, **budget))
        seqs = [eng.add(traces[i][0], forced=traces[i][1]) for i in order]
        preempted_at = []
        real = eng.preempt
        eng.preempt = lambda s: preempted_at.append((s.id, s.length)) or real(s)
        eng.run()
        runs[name] = (seqs, eng, preempted_at)
    seqs, eng, preempted_at = runs["tight"]
    assert max(max(s.curve) for s in seqs) < pool < longest
    assert any(sid == 2 and length > pool for sid, length in preempted_at), preempted_at
    for s, ref in zip(seqs, runs["unlimited"][0]):
        assert s.stop_reason == ref.stop_reason == "end of trace"
        assert s.tokens == ref.tokens and s.curve == ref.curve
        assert (torch.stack(s.logits) - torch.stack(ref.logits)).abs().max().item() <= 1e-5
    assert eng.cache.stats()["held_pages"] == 0


_fmt = st.lists(st.tuples(st.integers(1, 12), st.integers(1, 5)), min_size=0, max_size=5)  # (block, memento) lengths


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), _fmt, st.integers(0, 4), st.booleans()), min_size=1, max_size=6),
       st.integers(1, 8), st.integers(50, 160), st.integers(6, 24), st.sampled_from(["memento", "restart", "full"]))
def test_any_workload_finishes_as_with_an_unlimited_pool(reqs, page_size, pool_tokens, budget, mode):
    """Random arrivals, prompt lengths, block structures, pool sizes, token budgets and modes:
    every request whose compacted peak fits the pool finishes; its tokens, curve and greedy
    samples equal an unlimited pool's; page accounting holds after every step (evictions in
    the middle of a sequence move its survivors left)."""
    model = tiny_model(layers=1, hidden=16, heads=2, kv_heads=1, seed=7)
    pool_pages = max(1, pool_tokens // page_size)
    work = []
    for plen, blocks, arrive, forced in reqs:
        text = "<think>\n" + "".join(f"<|block_start|>{'b' * n}<|block_end|><|summary_start|>{'m' * m}<|summary_end|>"
                                     for n, m in blocks) + "</think>ok"
        work.append((TOK.encode(TOK.chat_prompt("p" * plen)), TOK.encode(text) if forced else None, arrive))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    config = EngineConfig(mode=mode, page_size=page_size, kv_cache_tokens=pool_pages * page_size, max_num_seqs=3,
                          max_num_batched_tokens=budget, replay_chunk=3)
    eng = Engine(model, TOK, config)
    seqs, step = {}, 0
    while len(seqs) < len(work) or eng.waiting or eng.running:
        for i, (p, f, arrive) in enumerate(work):
            if arrive == step:
                seqs[i] = eng.add(p, params, forced=f)
        eng.step()
        _pool_counts_are_consistent(eng.cache)
        step += 1
    for i, (p, f, _) in enumerate(work):
        s = seqs[i]
        alone, _ = generate(model, TOK, [p], EngineConfig(mode=mode, unbounded_kv_cache=True), params,
                            forced=None if f is None else [f])
        peak = max(alone[0].curve)
        if s.stop_reason.startswith("rejected"):
            assert math.ceil((peak if f is not None else len(p) + 1) / page_size) > pool_pages
            continue
        if s.stop_reason.startswith("KV pool full"):  # a sampled sequence that alone outgrew the pool
            assert f is None and math.ceil(peak / page_size) > pool_pages
            # what it sampled stays its response (it was emitted), every token with its KV entry
            assert s.tokens == alone[0].tokens[:len(s.tokens)] and s.curve == alone[0].curve[:s.length]
            continue
        assert s.stop_reason == ("end of trace" if f is not None else "max_tokens"), s.stop_reason
        assert s.tokens == alone[0].tokens and s.curve == alone[0].curve
    assert eng.cache.stats()["held_pages"] == 0


# ------------------------------------------------------------------ scheduling (vLLM V1 order)


def _instrument(eng):
    """Record (step, event, seq id) for admissions and preemptions."""
    log = []
    start, preempt = eng.start, eng.preempt

    def _start(s):
        log.append((eng.stats["steps"], "admit", s.id))
        start(s)

    def _preempt(s):
        log.append((eng.stats["steps"], "preempt", s.id))
        return preempt(s)

    eng.start, eng.preempt = _start, _preempt
    return log


def test_no_request_is_admitted_and_preempted_in_the_same_step():
    model = tiny_model(seed=2)
    eng = Engine(model, TOK, EngineConfig(page_size=4, kv_cache_tokens=160, max_num_seqs=6, replay_chunk=3))
    log = _instrument(eng)
    for p, r in _requests(7, 6, blocks=(3, 6)):
        eng.add(p, forced=r)
    eng.run()
    assert any(e == "preempt" for _, e, _ in log)
    admitted = {(step, sid) for step, e, sid in log if e == "admit"}
    assert not [(step, sid) for step, e, sid in log if e == "preempt" and (step, sid) in admitted]
    assert all(s.stop_reason == "end of trace" for s in eng.sequences)


def test_a_long_prompt_is_prefilled_over_several_steps_while_others_decode():
    model = tiny_model(seed=3)
    eng = Engine(model, TOK, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, unbounded_kv_cache=True))
    short = eng.add(TOK.encode(TOK.chat_prompt("hi")), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    while not short.tokens:
        eng.step()
    long = eng.add(TOK.encode(TOK.chat_prompt("x" * 200)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    steps = 0
    while not long.tokens:
        before = len(short.tokens)
        eng.step()
        steps += 1
        assert len(short.tokens) == before + 1  # the running sequence gets its token every step
    assert steps >= math.ceil(len(long.prompt) / 15)  # 16 tokens a step, one of them the decode's
    eng.run()
    assert long.tokens == generate(model, TOK, [long.prompt], EngineConfig(), long.params)[0][0].tokens


def test_a_sampled_stop_token_never_asks_for_a_slot():
    """The stop token is not fed: a pool with exactly the slots of prompt + the tokens before it
    ends the request normally ("stop token", the token kept, its curve entry counted), where
    feeding it would have needed one more slot."""
    model = tiny_model(seed=5)
    prompt = TOK.encode(TOK.chat_prompt("stop"))
    free_run = generate(model, TOK, [prompt], EngineConfig(MementoConfig(-1)),
                        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0][0]
    k = next(j for j in range(5, 40) if free_run.tokens.index(free_run.tokens[j]) == j)  # a token first seen at j >= 5
    stop = free_run.tokens[k]
    pool = len(prompt) + k  # slots for the prompt and the k tokens fed before the stop token, no more
    eng = Engine(model, TOK, EngineConfig(MementoConfig(-1), page_size=1, kv_cache_tokens=pool))
    a = eng.add(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=(stop,)))
    eng.run()
    assert a.stop_reason == "stop token" and a.tokens == free_run.tokens[:k + 1]
    assert eng.stats["preemptions"] == 0 and len(a.curve) == len(prompt) + k + 1 and a.curve[-1] == len(prompt) + k + 1


# ------------------------------------------------------------------ per-request sampling


def test_requests_with_different_sampling_in_one_batch_equal_each_alone():
    model = tiny_model(seed=3)
    prompts = [p for p, _ in _requests(11, 3)]
    params = [SamplingParams(1.0, 1.0, 0, max_tokens=30, seed=1), SamplingParams(0.7, 0.8, 5, max_tokens=20, seed=2),
              SamplingParams(0.9, 1.0, 0, min_p=0.2, max_tokens=25, seed=3)]
    batch, _ = generate(model, TOK, prompts, EngineConfig(max_num_seqs=3), params)
    for p, sp, s in zip(prompts, params, batch):
        alone = generate(model, TOK, [p], EngineConfig(), sp)[0][0]
        assert s.tokens == alone.tokens and len(s.tokens) <= sp.max_tokens


def test_stop_strings_across_tokens_are_matched_and_excluded():
    model = tiny_model(seed=3)
    prompt = TOK.encode(TOK.chat_prompt("text"))
    params = SamplingParams(1.0, 1.0, 0, max_tokens=60, seed=4, ignore_eos=True)
    free_run = generate(model, TOK, [prompt], EngineConfig(), params)[0][0]
    pieces = [TOK.decode_bytes([t]) for t in free_run.tokens]
    # two printable one-byte tokens in a row: a stop string that spans a token boundary
    j = next(j for j in range(10, 58) if all(len(x) == 1 and 32 <= x[0] < 127 for x in pieces[j:j + 2]))
    stop = (pieces[j] + pieces[j + 1]).decode()
    out = b"".join(pieces)
    at = out.index(stop.encode())  # its first occurrence
    last = next(k for k in range(len(pieces)) if len(b"".join(pieces[:k + 1])) >= at + 2)  # the token completing it
    s = generate(model, TOK, [prompt], EngineConfig(), SamplingParams(1.0, 1.0, 0, max_tokens=60, seed=4, ignore_eos=True,
                                                                      stop=["never appears", stop]))[0][0]
    assert s.stop_reason == "stop string" and s.tokens == free_run.tokens[:last + 1]
    assert s.text == out[:at].decode("utf-8", errors="replace") and stop not in s.text


def test_ignore_eos_runs_to_max_tokens():
    model = tiny_model(seed=3)
    prompt = TOK.encode(TOK.chat_prompt("eos"))
    eos = {TOK.token_id("<|im_end|>"), TOK.token_id("<|endoftext|>")}
    for seed in range(40):  # a seed whose sample meets an EOS token within 150 tokens (fixed model: deterministic)
        params = SamplingParams(1.0, 1.0, 0, max_tokens=150, seed=seed, ignore_eos=True)
        s = generate(model, TOK, [prompt], EngineConfig(), params)[0][0]
        if eos & set(s.tokens[:-1]):
            break
    else:
        pytest.fail("no seed met an EOS token")
    assert s.stop_reason == "max_tokens" and len(s.tokens) == 150
    first = min(i for i, t in enumerate(s.tokens) if t in eos)
    stopped = generate(model, TOK, [prompt], EngineConfig(), SamplingParams(1.0, 1.0, 0, max_tokens=150, seed=seed))[0][0]
    assert stopped.stop_reason == "stop token" and stopped.tokens == s.tokens[:first + 1]


def test_sampled_tokens_do_not_depend_on_batching_or_the_pool():
    model = tiny_model(seed=3)
    prompts = [p for p, _ in _requests(11, 5)]
    params = SamplingParams(max_tokens=40)
    runs = [generate(model, TOK, prompts, EngineConfig(**kw), params, seed=5)[0]
            for kw in ({}, {"max_num_seqs": 1}, {"max_num_seqs": 2, "kv_cache_tokens": 128, "page_size": 8})]
    assert [s.tokens for s in runs[0]] == [s.tokens for s in runs[1]] == [s.tokens for s in runs[2]]


def test_logprobs_are_the_models_and_metrics_are_recorded():
    model = tiny_model(seed=3)
    prompt = TOK.encode(TOK.chat_prompt("lp"))
    s = generate(model, TOK, [prompt], EngineConfig(keep_logits=True),
                 SamplingParams(1.0, 1.0, 0, max_tokens=10, seed=1, logprobs=3, ignore_eos=True))[0][0]
    full = _full_forward(model, prompt + s.tokens, MementoConfig(0))
    want = torch.log_softmax(full[len(prompt) - 1:-1], -1)
    assert len(s.logprobs) == len(s.top_logprobs) == 10
    for j, t in enumerate(s.tokens):
        assert s.logprobs[j] == pytest.approx(want[j, t].item(), abs=1e-4)
        top = want[j].topk(3)
        assert list(s.top_logprobs[j]) == top.indices.tolist()
    m = s.metrics()
    assert 0 <= m["queue_time"] <= m["ttft"] <= m["e2e_latency"] and len(s.itl) == 9 and m["itl_mean"] > 0
    assert m["peak_kv_tokens"] == max(s.curve) and m["final_kv_tokens"] == s.curve[-1] and m["preemptions"] == 0


# ------------------------------------------------------------------ the pool


def test_default_pool_is_bounded_and_lazily_allocated():
    model = tiny_model(seed=3)
    eng = Engine(model, TOK)
    per_token = 2 * 2 * 2 * 8 * 4  # layers 2, kv heads 2, head_dim 8, fp32 (§A.3.1)
    assert eng.cache.bounded and eng.cache.num_pages == 4 * 2**30 // per_token // 16
    assert "4 GiB" in eng.kv_cache_note and eng.cache.allocated == 16  # memory only as pages are used
    seqs, eng = generate(model, TOK, [p for p, _ in _requests(1, 3)], EngineConfig(), SamplingParams(max_tokens=30))
    assert eng.cache.allocated <= 64 and all(s.stop_reason in ("max_tokens", "stop token") for s in seqs)
    # the GPU budget: utilization x total, minus the profiled peak, minus what others hold
    GiB = 2**30
    assert gpu_kv_budget_bytes(80 * GiB, 60 * GiB, 10 * GiB, 18 * GiB, 0.9) == int(0.9 * 80 * GiB) - 18 * GiB - 10 * GiB
    assert gpu_kv_budget_bytes(80 * GiB, 70 * GiB, 10 * GiB, 18 * GiB, 0.9) == int(0.9 * 80 * GiB) - 18 * GiB


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
            hi = pos[sid] - 1 - (x % 3 if x % 2 else 0)  # some evictions leave survivors after the gap
            cache.evict(sid, lo, hi)
            for o, before in others.items():  # evicting one sequence's block touches only that sequence
                assert all(torch.equal(a, b) for a, b in zip(before, cache.read(o)))
        elif n and cache.pages_to_append(sid, n) <= cache.free_page_count():
            p = torch.arange(pos[sid], pos[sid] + n)[None]
            b = cache.batch([sid])
            b.append(p, None)
            for layer in b.layers:
                layer.store(torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim),
                             torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim))
            pos[sid] += n
        _pool_counts_are_consistent(cache)
    for sid in list(cache.seqs):
        cache.free(sid)
    assert cache.stats()["free_pages"] == num_pages and len(cache.free_pages) == cache.allocated <= num_pages


def test_engine_keeps_no_autograd_history_when_called_with_grad_enabled():
    """A caller outside torch.no_grad (eval.py, experiments) must not grow a graph through the
    KV pool: that once took a 2,400-sample evaluation to 24 GB."""
    model = tiny_model(seed=3).requires_grad_(True)
    eng = Engine(model, TOK, EngineConfig(keep_cache=True))
    seqs = [eng.add(p, SamplingParams(temperature=0, max_tokens=12)) for p, _ in _requests(3, 2)]
    assert torch.is_grad_enabled()
    eng.run()
    assert eng.cache.k.grad_fn is None and eng.cache.v.grad_fn is None and not eng.cache.k.requires_grad
    assert all(len(s.tokens) > 0 for s in seqs)


# ------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_anything_changes():
    model = tiny_model(seed=4)
    prompt, resp = _requests(3, 1)[0]
    with pytest.raises(ValueError, match="restart mode is defined for keep_last_n_blocks=0"):
        EngineConfig(MementoConfig(1), mode="restart")
    with pytest.raises(ValueError, match="unknown mode 'bogus'"):
        EngineConfig(mode="bogus")
    for bad in (dict(page_size=0), dict(kv_cache_tokens=0), dict(max_num_seqs=0), dict(kv_cache_tokens=8, page_size=16),
                dict(max_num_batched_tokens=4, max_num_seqs=8), dict(kv_cache_tokens=64, unbounded_kv_cache=True)):
        with pytest.raises(ValueError):
            EngineConfig(**bad)
    huge = 10**400  # a float cannot hold it: a check that converts first would raise OverflowError
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=2), dict(max_tokens=0), dict(stop=[""]),
                dict(temperature=float("inf")), dict(temperature=float("nan")), dict(temperature=1e39),
                dict(temperature=1e-300), dict(temperature=huge), dict(temperature=True), dict(temperature="hot"),
                dict(top_p=float("nan")), dict(min_p=huge), dict(top_k=1.5), dict(max_tokens=2.0), dict(seed="s"),
                dict(logprobs=-1), dict(stop=["\ud800"]), dict(stop=5), dict(stop_token_ids=[-1]),
                dict(stop_token_ids=[True]), dict(ignore_eos=1)):
        with pytest.raises(ValueError, match=next(iter(bad))) as e:
            SamplingParams(**bad)
        assert "\n" not in str(e.value) and len(str(e.value)) < 200  # one line, a huge value shown by its size
    assert SamplingParams(temperature=0).temperature == 0 and SamplingParams(temperature=100).temperature == 100.0
    assert SamplingParams(temperature=0.01, top_p=1, min_p=0).top_p == 1.0
    eng = Engine(model, TOK, EngineConfig(MementoConfig(1)))
    max_pos = model.config.max_position_embeddings
    n_vocab = TOK.n_vocab  # 265: the embedding has 272 rows, ids 265..271 decode to nothing
    assert model.config.vocab_size > n_vocab
    cases = [(([],), {}, "empty prompt"), ((prompt,), dict(forced=[0] * max_pos), "exceeds max_position_embeddings"),
             ((prompt, SamplingParams(max_tokens=max_pos)), {}, "lower max_tokens"),
             ((prompt,), dict(mode="restart"), "restart mode"),
             ((prompt + [10**6],), {}, "prompt: token id 1000000 is outside the tokenizer's vocabulary"),
             ((prompt + [n_vocab],), {}, "prompt: token id 265 is outside the tokenizer's vocabulary \\(0..264\\)"),
             ((prompt,), dict(forced=[n_vocab]), "forced: token id 265"),
             ((prompt, SamplingParams(stop_token_ids=[n_vocab])), {}, "stop_token_ids: token id 265"),
             ((prompt, SamplingParams(logprobs=n_vocab + 1)), {}, "logprobs=266"),
             ((prompt, {"temperature": 0}), {}, "SamplingParams")]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            eng.add(*args, **kw)
        assert not eng.sequences and not eng.waiting and not eng.running  # untouched
    s = eng.add(prompt, forced=resp)
    eng.run()
    assert s.stop_reason == "end of trace" and s.id == 0


# ------------------------------------------------------------------ one request never fails another


def _victim_raises(eng, victim_prompt, where, at=3):
    """Make the engine raise while handling the one request whose prompt is `victim_prompt`,
    at `where`, once it has `at` tokens: in planning its chunk, in the batched draw (when its
    row is in it), in on_token, in its stop check, in decoding its text, or in on_finish
    (set as eng.on_token / eng.on_finish). Returns the list on_finish appends to."""
    import model_runner as engine_module  # where the engine's sampler is called

    finished, is_victim = [], lambda s: s is not None and s.prompt == victim_prompt  # noqa: E731

    def boom():
        raise RuntimeError("injected: secret detail")

    if where == "plan":
        real_plan = eng.plan
        eng.plan = lambda s, limit: boom() if is_victim(s) and len(s.tokens) >= at else real_plan(s, limit)
    elif where == "sample":
        real_sample = engine_module.sample
        victim = lambda params: next((s for s in eng.running if s.params is params and is_victim(s)), None)  # noqa: E731

        def sample(logits, params, seeds, counters):
            if any(victim(p) is not None and len(victim(p).tokens) >= at for p in params):
                boom()
            return real_sample(logits, params, seeds, counters)
        engine_module.sample = sample
    elif where == "stop check":
        real_stop = eng._stop_reason
        eng._stop_reason = lambda s, t: boom() if is_victim(s) and len(s.tokens) >= at else real_stop(s, t)
    elif where == "decode":
        real_decode = eng.tok.decode

        class Tok:  # the engine's tokenizer, whose decode fails on the victim's response
            def __getattr__(self, name):
                return getattr(TOK, name)

            def decode(self, ids):
                if any(ids is s.tokens and is_victim(s) for s in eng.sequences if s is not None):
                    boom()
                return real_decode(ids)
        eng.tok = Tok()
    eng.on_token = None
    if where == "on_token":
        eng.on_token = lambda i, t, kind: boom() if is_victim(eng.sequences[i]) and len(eng.sequences[i].tokens) >= at \
            else None

    def on_finish(s):
        finished.append(s)
        if where == "on_finish" and is_victim(s):
            boom()
    eng.on_finish = on_finish
    return finished


@pytest.mark.parametrize("where", ["plan", "sample", "on_token", "stop check", "decode", "on_finish"])
def test_a_request_that_raises_ends_alone_and_the_others_equal_their_runs_alone(where, caplog):
    """Four requests in one batch, a pool small enough to preempt; the engine raises while
    handling one of them (at its third token, or at its end): that one ends with stop_reason
    "error: ..." (on_finish: it keeps its own reason), leaves the running set and the pool,
    gets on_finish once, and its traceback is logged once; the three others get the tokens
    they get alone, and every page comes back."""
    import model_runner as engine_module  # where the engine's sampler is called

    model = tiny_model(layers=1, seed=6)
    prompts = [TOK.encode(TOK.chat_prompt(f"sum {i} blocks from {i + 1}")) for i in range(4)]
    params = [SamplingParams(temperature=0.9, max_tokens=30, ignore_eos=True, seed=i, stop=("zz",)) for i in range(4)]
    alone = [generate(model, TOK, [p], EngineConfig(), sp)[0][0] for p, sp in zip(prompts, params)]
    eng = Engine(model, TOK, EngineConfig(page_size=4, kv_cache_tokens=4 * ((2 * len(prompts[0]) + 60) // 4)))
    real_sample = engine_module.sample
    try:
        finished = _victim_raises(eng, prompts[1], where)
        seqs = [eng.add(p, sp) for p, sp in zip(prompts, params)]
        with caplog.at_level("ERROR", logger="memento.engine"):
            while eng.waiting or eng.running:
                eng.step()
                _pool_counts_are_consistent(eng.cache)
    finally:
        engine_module.sample = real_sample
    victim = seqs[1]
    if where == "on_finish":
        assert victim.stop_reason == "max_tokens" and victim.tokens == alone[1].tokens
    else:
        assert victim.stop_reason == "error: RuntimeError: injected: secret detail", victim.stop_reason
        assert victim.tokens == alone[1].tokens[:len(victim.tokens)] and eng.stats["failed"] == 1
    assert victim.done and victim not in eng.running and victim.id not in eng.cache.seqs
    assert finished.count(victim) == 1 and len(finished) == 4
    assert sum(r.exc_info is not None for r in caplog.records) == 1
    for i in (0, 2, 3):
        assert seqs[i].stop_reason == alone[i].stop_reason and seqs[i].tokens == alone[i].tokens, i
    assert eng.cache.held_page_count() == 0 and eng.stats["preemptions"] > 0


_stream_case = st.tuples(st.integers(1, 40), st.integers(1, 90), st.booleans())  # (prompt chars, max_tokens, ignore_eos)


@settings(max_examples=20, deadline=None)
@given(st.lists(_stream_case, min_size=1, max_size=4), st.sampled_from([1, 4, 16]), st.integers(24, 200),
       st.sampled_from(["memento", "full", "restart"]), st.integers(0, 3))
def test_what_on_token_emits_is_the_final_response(reqs, page_size, pool_tokens, mode, seed):
    """Random pools (some smaller than one request's response: it alone outgrows the pool),
    page sizes, lengths and modes: the tokens on_token emitted for each request are exactly
    its final tokens, in order (a streamed token is never dropped afterwards), its text is
    their decoding, every token has its KV entry, and the tokens are a prefix of (finished
    normally: equal to) the request's run with an unlimited pool."""
    model = tiny_model(layers=1, hidden=16, heads=2, kv_heads=1, seed=8)
    pool = max(page_size, pool_tokens // page_size * page_size)
    emitted = {}
    eng = Engine(model, TOK, EngineConfig(mode=mode, page_size=page_size, kv_cache_tokens=pool, max_num_seqs=3),
                 on_token=lambda i, t, kind: emitted.setdefault(i, []).append(t))
    work = [(TOK.encode(TOK.chat_prompt("x" * n)), SamplingParams(temperature=0.8, max_tokens=m, ignore_eos=e,
                                                                  seed=seed + j))
            for j, (n, m, e) in enumerate(reqs)]
    seqs = [eng.add(p, sp) for p, sp in work]
    eng.run()
    for (p, sp), s in zip(work, seqs):
        assert emitted.get(s.id, []) == s.tokens and s.text == TOK.decode(s.tokens)
        if s.stop_reason.startswith("rejected"):
            continue
        assert len(s.curve) == s.length
        ref = generate(model, TOK, [p], EngineConfig(mode=mode, unbounded_kv_cache=True), sp)[0][0]
        assert s.tokens == ref.tokens[:len(s.tokens)] and s.curve == ref.curve[:s.length]
        if not s.stop_reason.startswith("KV pool full"):
            assert (s.stop_reason, s.tokens) == (ref.stop_reason, ref.tokens)
    assert eng.cache.held_page_count() == 0


def test_the_issue_case_a_sequence_alone_outgrows_a_640_token_pool():
    """serve.py's report: --kv-cache-tokens 640, max_tokens 700, ignore_eos, full mode, greedy:
    the sequence outgrows the pool alone; every token on_token emitted is in its response (the
    server streamed 622 tokens and answered 621)."""
    model = tiny_model(layers=1, seed=9)
    prompt = TOK.encode(TOK.chat_prompt("sum 5 blocks from 3"))
    emitted = []
    eng = Engine(model, TOK, EngineConfig(mode="full", kv_cache_tokens=640), on_token=lambda i, t, k: emitted.append(t))
    s = eng.add(prompt, SamplingParams(temperature=0, max_tokens=700, ignore_eos=True))
    eng.run()
    assert s.stop_reason.startswith("KV pool full") and emitted == s.tokens and len(s.tokens) == 640 - len(prompt) + 1
    assert s.curve == list(range(1, s.length + 1)) and eng.cache.held_page_count() == 0


def test_a_request_that_can_never_fit_is_rejected_with_its_figures():
    model = tiny_model(seed=4)
    prompt, resp = _requests(3, 1)[0]
    long = TOK.encode(TOK.chat_prompt("x" * 200))
    seqs, eng = generate(model, TOK, [prompt, long, prompt], EngineConfig(kv_cache_tokens=160, page_size=16),
                         forced=[resp, resp, resp])
    assert seqs[1].stop_reason.startswith("rejected: its replay holds up to") and "the KV pool holds 10 pages" in \
        seqs[1].stop_reason and not seqs[1].tokens and not seqs[1].curve
    assert seqs[0].stop_reason == seqs[2].stop_reason == "end of trace" and eng.stats["rejected"] == 1
    # replay of an empty response ends (it used to hang)
    seqs, _ = generate(model, TOK, [prompt], EngineConfig(), forced=[[]])
    assert seqs[0].stop_reason == "end of trace" and len(seqs[0].curve) == len(prompt)


# ------------------------------------------------------------------ command line and benchmark


def test_cli_many_prompts_and_budget_errors(checkpoint, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("sum 3 blocks from 1\n\n" + json.dumps({"problem": "sum 4 blocks from 2"}) + "\n")
    r = run_generate("--checkpoint", str(checkpoint), "--prompts-file", str(prompts), "--num-samples", "3", "--max-new-tokens", "20",
                     "--json", "--max-num-seqs", "2", "--kv-cache-tokens", "512", "--page-size", "8")
    assert r.returncode == 0, r.stderr
    out = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(out) == 6 and [o["name"] for o in out][:3] == [f"{prompts}:1#{k}" for k in range(3)]
    assert len({tuple(o["token_ids"]) for o in out[:3]}) > 1  # three samples, three seeds
    assert all(o["metrics"]["ttft"] > 0 for o in out) and "KV cache: 512 tokens" in r.stderr
    for flag, value in (("--kv-cache-tokens", "0"), ("--page-size", "-1"), ("--max-num-seqs", "0"), ("--kv-cache-gib", "0")):
        r = run_generate("--checkpoint", str(checkpoint), "--prompt", "x", flag, value)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and flag in r.stderr, (flag, r.stderr)
    r = run_generate("--checkpoint", str(checkpoint), "--prompt", "x", "--kv-cache-tokens", "8", "--page-size", "16")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds no page" in r.stderr
    r = run_generate("--checkpoint", str(checkpoint), "--prompt", "x", "--max-num-batched-tokens", "8")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "max_num_seqs" in r.stderr


def test_serving_benchmark_runs():
    # bench/bench_serve.py end to end on a tiny model and workload (the real run is minutes)
    r = subprocess.run([sys.executable, "bench/bench_serve.py", "--quick"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "all requests finished: True" in r.stdout and "memento / full" in r.stdout
