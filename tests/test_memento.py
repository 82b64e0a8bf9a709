"""Block tracking, the compacting KV cache and generate.py's loop (paper §4, §6.1, §A.3.1).

The central check: prefill + token-by-token decoding through the compacting cache gives the
same logits as ONE full forward with the dense memento mask (no cache at all).
"""
import json
import random

import pytest
import torch
from conftest import memento_text, run_generate, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import EngineConfig
from engine import generate
from blocks import NEVER, BlockTracker, MementoConfig, MementoTokens, build_mask_from
from tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
IDS = MementoTokens.from_tokenizer(TOK)
CONFIGS = [MementoConfig(-1), MementoConfig(0), MementoConfig(1), MementoConfig(2),
           MementoConfig(0, mask_delimiters=True), MementoConfig(1, mask_delimiters=True),
           MementoConfig(0, keep_last_block_for_answer=True)]


NESTED = ("<think>\n<|block_start|>outer a<|block_start|>inner b<|block_end|><|summary_start|>m in"
          "<|summary_end|>outer c<|block_end|><|summary_start|>m out<|summary_end|>\n")


def _sequence(seed, n_blocks=3, end_mid_block=False, special_prompt=False, nested=False):
    rng = random.Random(seed)
    problem = "sum <|block_start|>1 2<|block_end|><|summary_start|>x<|summary_end|> please" if special_prompt else "sum 1 2"
    text = memento_text(rng, n_blocks, end_mid_block)
    if nested:  # malformed but decodable: a completed block inside another
        text = NESTED + text.removeprefix("<think>\n")
    return TOK.encode(TOK.chat_prompt(problem)), TOK.encode(text)


def _full_forward_logits(model, ids, cfg):
    mask_from = build_mask_from(torch.tensor([ids]), IDS, cfg)
    with torch.no_grad():
        return model(torch.tensor([ids]), mask_from=mask_from)[0]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("variant", ["plain", "mid_block", "special_prompt", "chunked_replay", "nested"])
def test_cache_decoding_equals_full_forward(cfg, variant):
    model = tiny_model()
    prompt, resp = _sequence(7, n_blocks=4, end_mid_block=variant == "mid_block", special_prompt=variant == "special_prompt",
                             nested=variant == "nested")
    ref = _full_forward_logits(model, prompt + resp, cfg)
    chunk = 7 if variant == "chunked_replay" else 1  # 1 = true token-by-token decoding
    seqs, cache = generate(model, TOK, [prompt], EngineConfig(cfg, keep_logits=True, replay_chunk=chunk), forced=[resp])
    got = torch.stack(seqs[0].logits)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    # the mask matters for this model: plain causal logits differ where blocks are hidden
    if cfg.keep_last_n_blocks >= 0 and variant != "mid_block":
        with torch.no_grad():
            causal = model(torch.tensor([prompt + resp]))[0]
        assert (causal - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_chunked_prefill_of_a_continued_response_equals_full_forward(cfg):
    """A prompt that already holds completed blocks (a response being continued) prefilled in
    chunks: each chunk attends the cache under the stored mask_from and masked keys leave the
    cache between chunks. Logits of every position equal one full forward with the mask, and
    the KV curve equals the independent §A.3.1 count, for any chunk size."""
    model = tiny_model(seed=4)
    prompt, resp = _sequence(9, n_blocks=5)
    cut = [i for i, t in enumerate(resp) if t == IDS.summary_end][2] + 3  # three blocks done
    rows = [(prompt + resp[:cut], resp[cut:]), (prompt + resp[:cut - 9], resp[cut - 9:])]  # two prompt lengths
    for chunk in (1, 5, 16, 2048):
        config = EngineConfig(cfg, keep_logits=True, max_num_batched_tokens=chunk, max_num_seqs=min(2, chunk), keep_cache=True)
        seqs, eng = generate(model, TOK, [p for p, _ in rows], config, forced=[r for _, r in rows])
        for (p, r), s in zip(rows, seqs):
            ref = _full_forward_logits(model, p + r, cfg)
            assert (torch.stack(s.logits) - ref).abs().max().item() <= 1e-4, chunk
            assert eng.cache.length(s.id) == s.curve[-1]  # what the cache holds is what was counted
            if cfg == MementoConfig(0):
                assert s.curve == _independent_curve(p + r, cfg)
    if cfg.keep_last_n_blocks >= 0:  # the prefill itself evicted
        assert max(seqs[0].curve[:len(rows[0][0])]) < len(rows[0][0])


def test_batched_rows_of_different_lengths_match_single_rows():
    model = tiny_model(seed=2)
    cfg = MementoConfig(0)
    pairs = [_sequence(s, n_blocks=n) for s, n in [(1, 2), (2, 5), (3, 1)]]
    seqs, _ = generate(model, TOK, [p for p, _ in pairs], EngineConfig(cfg, keep_logits=True, replay_chunk=4),
                       forced=[r for _, r in pairs])
    for (p, r), s in zip(pairs, seqs):
        ref = _full_forward_logits(model, p + r, cfg)
        assert (torch.stack(s.logits) - ref).abs().max().item() <= 1e-4
        assert len(s.curve) == len(p) + len(r)


def _independent_curve(ids, cfg, restart=False):
    """§6 simulation written separately from the cache: walk the delimiters in order and
    count, after each token i, the tokens j <= i not yet hidden (keep_last_n_blocks=0)."""
    assert cfg.keep_last_n_blocks == 0 and not cfg.keep_last_block_for_answer
    start = next(i for i in range(len(ids)) if ids[i - len(IDS.assistant_header) + 1:i + 1] == list(IDS.assistant_header)) + 1
    hidden_from = [NEVER] * len(ids)
    s = e = None
    for i in range(start, len(ids)):
        t = ids[i]
        if t == IDS.block_start:
            s = i
        elif t == IDS.block_end:
            e = i
        elif t == IDS.summary_end and s is not None and e is not None:
            lo, hi = (s, e) if (cfg.mask_delimiters or restart) else (s + 1, e - 1)
            for j in range(lo, hi + 1):
                hidden_from[j] = i
            s = e = None
    return [sum(1 for j in range(i + 1) if hidden_from[j] > i) for i in range(len(ids))]


@pytest.mark.parametrize("mask_delimiters", [False, True])
def test_cache_really_shrinks_and_counts(mask_delimiters):
    model = tiny_model(layers=1)
    cfg = MementoConfig(0, mask_delimiters=mask_delimiters)
    prompt, resp = _sequence(11, n_blocks=12)
    ids = prompt + resp
    seqs, eng = generate(model, TOK, [prompt], EngineConfig(cfg, keep_cache=True, page_size=5), forced=[resp])
    curve = seqs[0].curve
    assert curve == _independent_curve(ids, cfg)
    pos, k, v, mf = eng.cache.read(seqs[0].id)  # stored K/V equals the bookkeeping
    assert len(pos) == curve[-1] and bool((mf >= 0).all()) and k.shape[1] == len(pos)
    assert pos.tolist() == [j for j in range(len(ids)) if _visible_at_end(ids, cfg, j)]
    st = eng.cache.stats()  # the pages of evicted blocks went back to the pool
    assert st["held_pages"] == -(-len(pos) // 5) and st["free_pages"] == st["pages"] - st["held_pages"]
    assert max(curve) < len(ids)


def _visible_at_end(ids, cfg, j):
    mf = build_mask_from(torch.tensor([ids]), IDS, cfg)[0]
    return int(mf[j]) > len(ids) - 1


def test_restart_mode_kv_equals_forward_without_completed_blocks():
    model = tiny_model(seed=5)
    cfg = MementoConfig(0)
    prompt, resp = _sequence(3, n_blocks=3)
    ids = prompt + resp
    z_positions = [i for i, t in enumerate(ids) if t == IDS.summary_end and i >= len(prompt)]
    for z in z_positions:  # stop right after each memento completes
        seqs, eng = generate(model, TOK, [prompt], EngineConfig(cfg, mode="restart", keep_cache=True),
                             forced=[ids[len(prompt):z + 1]])
        # reference: one plain forward over the sequence with every completed block removed
        mf = build_mask_from(torch.tensor([ids[:z + 1]]), IDS, MementoConfig(0, mask_delimiters=True))[0]
        keep = [j for j in range(z + 1) if int(mf[j]) == NEVER]
        _, ref_k, ref_v = _prefill_kv(model, [ids[j] for j in keep], keep)
        pos, k, v, _ = eng.cache.read(seqs[0].id)
        assert pos.tolist() == keep
        assert (k - ref_k).abs().max().item() <= 1e-4 and (v - ref_v).abs().max().item() <= 1e-4
    # and restart really changes the memento K/V compared with normal compaction
    kv = {}
    for restart in (False, True):
        seqs, eng = generate(model, TOK, [prompt], EngineConfig(cfg, mode="restart" if restart else "memento",
                                                                keep_cache=True), forced=[resp])
        pos, k, _, _ = eng.cache.read(seqs[0].id)
        kv[restart] = {p: k[-1, i] for i, p in enumerate(pos.tolist())}
    common = set(kv[False]) & set(kv[True])
    assert max((kv[False][p] - kv[True][p]).abs().max().item() for p in common) > 1e-3


def test_restart_of_a_block_completed_inside_the_prompt():
    """A prompt that already holds a completed block (a continued response): restart mode
    recomputes its memento during the prefill exactly as during decoding (§6.2.1)."""
    model = tiny_model(seed=6)
    cfg = MementoConfig(0)
    prompt, resp = _sequence(4, n_blocks=3)
    cut = [i for i, t in enumerate(resp) if t == IDS.summary_end][0] + 2  # block 1 complete in the prompt
    ids = prompt + resp
    for chunk in (3, 2048):
        seqs, eng = generate(model, TOK, [prompt + resp[:cut]], EngineConfig(cfg, mode="restart", keep_cache=True,
                                                                             max_num_batched_tokens=chunk, max_num_seqs=1),
                             forced=[resp[cut:]])
        mf = build_mask_from(torch.tensor([ids]), IDS, MementoConfig(0, mask_delimiters=True))[0]
        keep = [j for j in range(len(ids)) if int(mf[j]) == NEVER]
        _, ref_k, ref_v = _prefill_kv(model, [ids[j] for j in keep], keep)
        pos, k, v, _ = eng.cache.read(seqs[0].id)
        assert pos.tolist() == keep
        assert (k - ref_k).abs().max().item() <= 1e-4 and (v - ref_v).abs().max().item() <= 1e-4
        # the same as decoding the whole response
        whole, eng2 = generate(model, TOK, [prompt], EngineConfig(cfg, mode="restart", keep_cache=True), forced=[resp])
        assert whole[0].curve == seqs[0].curve


def _prefill_kv(model, ids, positions):
    """(positions, k, v) [L, n, Hkv, D] of one plain forward of ids at `positions` into a fresh cache."""
    from kv_cache import PagedKVCache

    cache = PagedKVCache(model.config, torch.float32, "cpu")
    cache.add(0)
    with torch.no_grad():
        model.hidden_states(torch.tensor([ids]), torch.tensor([positions]), None, cache.batch([0]))
    pos, k, v, _ = cache.read(0)
    return pos, k, v


# ------------------------------------------------------------------ tracker: two forms, one rule

ALPHABET = [IDS.block_start, IDS.block_end, IDS.summary_start, IDS.summary_end, IDS.think_end, 97, 98, 10]


def _incremental_mask_from(ids, cfg):
    tr = BlockTracker(IDS, cfg)
    mf = [NEVER] * len(ids)
    for p, t in enumerate(ids):
        for b in tr.step(t):
            lo, hi = b.span(cfg.mask_delimiters)
            for j in range(lo, hi + 1):
                mf[j] = min(mf[j], p)  # as in a cache: once evicted, a key never comes back
    return mf, tr


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=60), st.sampled_from(CONFIGS), st.booleans(), st.booleans())
def test_incremental_and_vectorized_trackers_agree(body, cfg, with_header, weighted):
    if weighted:  # well-formed-ish streams are rare in uniform draws; bias toward structure
        body = [t for t in body for _ in range(1 + (t in ALPHABET[:4]))]
    prefix = list(IDS.assistant_header) if with_header else []
    ids = [98] + prefix + body
    inc, tr = _incremental_mask_from(ids, cfg)
    vec, (vtr,) = build_mask_from(torch.tensor([ids]), IDS, cfg, return_trackers=True)
    assert vec[0].tolist() == inc
    assert vtr.problems() == tr.problems()
    # never hide a token unless a block around it was closed and its memento completed
    for j, m in enumerate(inc):
        if m == NEVER:
            continue
        assert j > len(prefix) and with_header
        ends = [e for e in range(j, m) if ids[e] == IDS.block_end]
        assert ends, "hidden token with no <|block_end|> after it"
        assert any(ids[z] == IDS.summary_end and any(ids[x] == IDS.summary_start for x in range(ends[0] + 1, z))
                   for z in range(ends[0] + 1, m + 1)), "hidden token whose block has no completed memento"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=60), st.sampled_from(CONFIGS))
def test_peek_is_what_step_would_return(body, cfg):
    """BlockTracker.peek(t), at every point of a random stream and for every token, returns
    the blocks a copy of the tracker returns from step(t), and changes nothing."""
    import copy

    body = [t for t in body for _ in range(1 + (t in ALPHABET[:4]))]
    tr = BlockTracker(IDS, cfg)
    for t in [98, *IDS.assistant_header, *body]:
        before = copy.deepcopy(tr)
        for x in (IDS.block_start, IDS.summary_end, IDS.block_end, 97):
            want = [(b.start, b.end) for b in copy.deepcopy(tr).step(x)]
            assert [(b.start, b.end) for b in tr.peek(x)] == want
        assert tr == before
        tr.step(t)


def test_special_tokens_in_prompt_are_ordinary():
    prompt, resp = _sequence(1, special_prompt=True)
    mf = build_mask_from(torch.tensor([prompt + resp]), IDS, MementoConfig(0))[0]
    assert (mf[:len(prompt)] == NEVER).all() and (mf[len(prompt):] != NEVER).any()
    mf_all = build_mask_from(torch.tensor([prompt + resp]), IDS, MementoConfig(0, require_assistant_section=False))[0]
    assert (mf_all[:len(prompt)] != NEVER).any()


def test_malformed_streams_reported():
    ids = list(IDS.assistant_header) + [IDS.summary_end, IDS.block_start, 97, IDS.block_end, 98]
    _, tr = _incremental_mask_from(ids, MementoConfig(0))
    assert any("outside a memento" in p for p in tr.problems())
    assert any("never summarized" in p for p in tr.problems())


def test_nested_blocks_are_masked_but_reported():
    # Inner block fully summarized inside the outer one, then the outer one summarized: every
    # block completes, so only the nesting itself makes the stream malformed.
    S, E, SS, SE = IDS.block_start, IDS.block_end, IDS.summary_start, IDS.summary_end
    resp = [S, 97, S, 98, E, SS, 99, SE, 100, E, SS, 101, SE]
    ids = list(IDS.assistant_header) + resp
    mf, (tr,) = build_mask_from(torch.tensor([ids]), IDS, MementoConfig(0), return_trackers=True)
    h = len(IDS.assistant_header)
    assert len(tr.completed) == 2
    assert any("nested <|block_start|>" in p for p in tr.problems())
    assert int(mf[0, h + 3]) == h + 7      # inner content hidden from its own <|summary_end|>
    assert int(mf[0, h + 1]) == h + 12     # outer content hidden from the outer memento's end
    from data.openmementos import validate
    assert any("nested" in p for p in validate(resp, IDS))
    flat = [S, 97, E, SS, 99, SE, S, 98, E, SS, 101, SE]
    assert validate(flat, IDS) == ["no </think>"]


# ------------------------------------------------------------------ the real sample traces

def test_replay_sample_traces(shared_data):
    model = tiny_model(layers=1, hidden=16, heads=2, kv_heads=1)
    cfg = MementoConfig(0)
    lines = [json.loads(l) for l in (shared_data / "memento_traces.jsonl").read_text().splitlines() if l.strip()]
    prompts = [TOK.encode(TOK.chat_prompt(d["problem"])) for d in lines]
    forced = [TOK.encode(d["response"]) for d in lines]
    seqs, _ = generate(model, TOK, prompts, EngineConfig(cfg, replay_chunk=512), forced=forced)
    for p, f, s in zip(prompts, forced, seqs):
        assert s.curve == _independent_curve(p + f, cfg)
        assert max(s.curve) < 0.6 * len(p + f)


# ------------------------------------------------------------------ the command line

def test_cli_prompt_json_and_replay_errors(checkpoint, tmp_path):
    r = run_generate("--checkpoint", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "40", "--json", "--seed", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("tokens", "peak_kv_tokens", "final_kv_tokens", "kv_auc", "blocks_completed", "peak_kv_bytes",
                "kv_curve", "token_ids", "special_token_ids", "text"):
        assert key in out
    assert len(out["kv_curve"]) == len(out["token_ids"]) and out["special_token_ids"]["<|summary_end|>"] == IDS.summary_end
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"problem": "p", "response": "<think>\n<|block_start|>ab<|block_end|><|summary_start|>c<|summary_end|></think>d"})
    bad.write_text("not json\n" + json.dumps({"problem": "no response"}) + "\n" + good + "\n")
    r = run_generate("--checkpoint", str(checkpoint), "--replay", str(bad), "--json")  # a bad record: an error
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"generate.py: --replay {bad}:1: not JSON (Expecting value at column 1); --bad-records skip skips such records"]
    r = run_generate("--checkpoint", str(checkpoint), "--replay", str(bad), "--json", "--bad-records", "skip")
    assert r.returncode == 0, r.stderr
    assert f"{bad}: 2 records skipped: not JSON: 1 (line 1); response: missing: 1 (line 2)" in r.stderr
    recs = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(recs) == 1 and recs[0]["name"].endswith(":3") and recs[0]["blocks_completed"] == 1


def test_cli_bad_input(checkpoint):
    r = run_generate("--checkpoint", "/no/such/dir", "--prompt", "x")
    assert r.returncode != 0 and "cannot load --checkpoint: '/no/such/dir': no such directory" in r.stderr
    r = run_generate("--checkpoint", str(checkpoint), "--prompt", "x" * 41000)
    assert r.returncode != 0 and "max_position_embeddings" in r.stderr and "Traceback" not in r.stderr
