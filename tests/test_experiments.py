"""Tests of experiments/ (issue 6): the probing pipeline's causal structure (§6.2.1), its
label-unique split, the text-only bound, the probe itself, and the restart-ablation output."""
import itertools
import json
import random
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_model

sys.path.insert(0, str(REPO / "experiments"))
import digits  # noqa: E402
import probe_kv  # noqa: E402
import restart_ablation  # noqa: E402
from engine import EngineConfig  # noqa: E402
from engine import generate  # noqa: E402
from blocks import MementoConfig, MementoTokens  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

TOK = Tokenizer.byte_level()


def pair_with_same_m2_text(seed=0, design="restate"):
    """Two traces that differ only in T2's digits, with the same T2 digit sum, so every
    memento's text (and every token outside T2) is identical."""
    rng = random.Random(seed)
    prob, _, d = digits.sample(rng, design=design)
    a = [list(x) for x in d]
    b = [list(x) for x in d]
    a[1] = [1, 2, 3, 4, 5]
    b[1] = [9, 0, 6, 0, 0]  # sum 15 as well
    ra, rb = digits.render(prob, a), digits.render(prob, b)
    ids_a, ids_b = TOK.encode(ra), TOK.encode(rb)
    diff = [i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y]
    assert len(ids_a) == len(ids_b) and diff, "construction: same length, some token differs"
    return prob.prompt, ra, rb, (min(diff), max(diff))


@pytest.mark.parametrize("seed", [0, 1])
def test_causal_control_direct_and_restart(seed):
    torch.manual_seed(0)
    model = tiny_model(layers=3, seed=seed)
    prompt, ra, rb, (lo, hi) = pair_with_same_m2_text(seed)
    T = MementoTokens.from_tokenizer(TOK)
    full = TOK.encode(TOK.chat_prompt(prompt)) + TOK.encode(ra)
    pos = probe_kv.memento_positions(full, T)
    n_prompt = len(TOK.encode(TOK.chat_prompt(prompt)))
    # the differing tokens lie strictly between M1 and M2 (inside block T2)
    assert pos[0] < n_prompt + lo and n_prompt + hi < pos[1]
    Fn = probe_kv.memento_kv(model, TOK, [prompt, prompt], [ra, rb], restart=False)
    Fr = probe_kv.memento_kv(model, TOK, [prompt, prompt], [ra, rb], restart=True)
    assert Fn.shape == (2, digits.BLOCKS, 3, 2 * 6 * 2 * 8)  # 6 memento tokens x K,V x 2 KV heads x head_dim 8
    # causal control: M1 came before T2, bitwise unchanged in both modes
    assert np.array_equal(Fn[0, 0], Fn[1, 0]) and np.array_equal(Fr[0, 0], Fr[1, 0])
    # direct: M2 saw T2 -> its deeper-layer K/V change (layer 0 is the token embedding only)
    assert np.array_equal(Fn[0, 1, 0], Fn[1, 1, 0])
    assert not np.array_equal(Fn[0, 1, 1:], Fn[1, 1, 1:])
    # implicit channel in normal mode: M3 never saw T2 but its K/V still change
    assert not np.array_equal(Fn[0, 2, 1:], Fn[1, 2, 1:])
    # restart mode: same text, block gone -> M2 and every later memento bitwise independent of T2
    assert np.array_equal(Fr[0, 1:], Fr[1, 1:])


def test_prefill_features_equal_generate_cache():
    """memento_kv's one-prefill shortcut equals what generate() (token by token, compacting
    cache, and restart=True recomputation) leaves in its cache."""
    model = tiny_model(layers=2, seed=3)
    rng = random.Random(3)
    samples = [digits.sample(rng) for _ in range(2)]
    prompts = [p.prompt for p, _, _ in samples]
    resp = [r for _, r, _ in samples]
    T = MementoTokens.from_tokenizer(TOK)
    for restart in (False, True):
        for features in ("memento", "last-text"):
            F = probe_kv.memento_kv(model, TOK, prompts, resp, restart=restart, features=features)
            p_ids = [TOK.encode(TOK.chat_prompt(p)) for p in prompts]
            f_ids = [TOK.encode(r) for r in resp]
            config = EngineConfig(MementoConfig(0), mode="restart" if restart else "memento", replay_chunk=4096,
                                  max_num_batched_tokens=4096, keep_cache=True)
            seqs, eng = generate(model, TOK, p_ids, config, forced=f_ids)
            for r in range(2):
                held, k, v, _ = eng.cache.read(seqs[r].id)
                for m, pos in enumerate(probe_kv.feature_positions(p_ids[r] + f_ids[r], T, features)):
                    slots = [held.tolist().index(p) for p in pos]
                    for li in range(k.shape[0]):
                        ref = torch.cat([k[li, slots].flatten(), v[li, slots].flatten()])
                        np.testing.assert_allclose(F[r, m, li], ref.numpy(), atol=2e-5, rtol=1e-5)


def test_feature_positions_are_the_memento():
    prob, resp, _ = digits.sample(random.Random(5))
    ids = TOK.encode(TOK.chat_prompt(prob.prompt)) + TOK.encode(resp)
    T = MementoTokens.from_tokenizer(TOK)
    pos = probe_kv.feature_positions(ids, T, "memento")
    assert len(pos) == digits.BLOCKS
    for i, p in enumerate(pos[:9], 1):  # M1..M9: exactly <|summary_start|>b{i}={sum}<|summary_end|>
        assert ids[p[0]] == T.summary_start and ids[p[-1]] == T.summary_end
        assert TOK.decode(ids[p[1]:p[-1]]).startswith(f"b{i}=")
    assert [q[0] for q in probe_kv.feature_positions(ids, T, "last-text")] == [p[-2] for p in pos]


@pytest.mark.parametrize("seed", range(4))
def test_label_unique_split(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(400, 2))  # only 9 combinations: many repeats
    tr, va, te = probe_kv.label_unique_split(labels, seed=seed)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(400))
    keys = [{tuple(labels[i]) for i in s} for s in (tr, va, te)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert len(tr) and len(va) and len(te)


def test_text_only_bound():
    assert digits.text_only_digit_accuracy() == pytest.approx(0.1)
    assert digits.text_only_digit_accuracy(per_block=1) == pytest.approx(1.0)  # the sum IS the digit


def test_digits_checker():
    prob, resp, d = digits.sample(random.Random(7))
    assert digits.check_trace(prob, resp)["correct"]
    assert digits.parse_prompt(prob.prompt) == prob
    s = sum(map(sum, d[:1]), prob.start) % 10
    bad = resp.replace(f"b1={s}", f"b1={(s + 1) % 10}", 1)
    assert not digits.check_trace(prob, bad)["correct"]


def test_probe_learns_informative_and_not_random_features():
    rng = np.random.default_rng(0)
    Y = rng.integers(0, 10, size=(1500, 5))
    onehot = np.eye(10)[Y].reshape(1500, -1) + 0.1 * rng.standard_normal((1500, 50))
    split = probe_kv.label_unique_split(Y)
    assert probe_kv.train_probe(onehot, Y, split, epochs=30)["test_acc"] > 0.9
    noise = rng.standard_normal((1500, 50))
    assert probe_kv.train_probe(noise, Y, split, epochs=30)["test_acc"] < 0.16


def test_restart_ablation_json(tmp_path):
    model = tiny_model(layers=1, seed=1)
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    TOK.save(d)
    out = tmp_path / "r.json"
    res = restart_ablation.main(["--stage1", str(d), "--stage2", str(d), "--n", "4", "--max-num-seqs", "3",
                                 "--max-new-tokens", "24", "--out", str(out), "--plot", str(tmp_path / "r.png")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert (tmp_path / "r.png").stat().st_size > 0
    assert [(r["model"], r["mode"]) for r in res["rows"]] == [
        ("stage2", "memento"), ("stage2", "restart"), ("stage1", "memento"), ("stage1", "restart"), ("stage1", "full")]
    for r in res["rows"]:
        for k in ("n", "correct", "accuracy", "ci95_low", "ci95_high", "failure_reasons", "mean_tokens", "verdicts", "seconds"):
            assert k in r
        assert r["n"] == 4 and sum(r["failure_reasons"].values()) == 4
        assert 0 <= r["ci95_low"] <= r["accuracy"] <= r["ci95_high"] <= 1
    assert set(res["paired"]) == {"stage1", "stage2"} and "cpu_model" in res["machine"] and res["wall_seconds"] > 0
    assert res["train_seconds"] is None and res["config"]["train_seed"] is None


def test_restart_ablation_plot_at_n_of_n(tmp_path):
    # All correct: the Wilson upper end equals the estimate up to rounding (it crashed once).
    from common import wilson

    rows = []
    for mode, c in (("memento", 500), ("restart", 0), ("full", 500)):
        lo, hi = wilson(c, 500)
        rows.append({"model": "stage2", "mode": mode, "n": 500, "accuracy": c / 500, "ci95_low": lo, "ci95_high": hi})
    restart_ablation.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_restart_ablation_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        restart_ablation.main(["--stage2", str(tmp_path / "nope"), "--stage1", str(tmp_path / "nope")])
    assert "python train_sft.py --stage 1" in str(e.value) and "\n" not in str(e.value)


def test_wilson_interval():
    from common import wilson

    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


def test_cumulative_design_traces_and_checker():
    rng = random.Random(11)
    for _ in range(20):
        prob, resp, d = digits.sample(rng, design="cumulative")
        assert digits.check_trace(prob, resp)["correct"] and digits.parse_prompt(prob.prompt) == prob
        total = sum(map(sum, d))
        assert resp.endswith(f"</think>\n{total:03d}") and f"b10={total:03d}" in resp
        assert "from" not in resp  # no block restates the previous memento
    m2 = f"b2={sum(map(sum, d[:2])):03d}"
    wrong = [resp.replace(m2, "b2=999"), resp[:-3] + "000", resp.replace(f"{d[0][0]}:{d[0][0]:02d}", f"{d[0][0]}:99", 1),
             resp.replace("<|block_end|>", "", 1)]
    for w in wrong:
        assert w != resp and not digits.check_trace(prob, w)["correct"]


def test_cumulative_text_only_bound_by_counting():
    """Per-digit Bayes accuracy given T2's exact digit sum, counted a second way: the number of
    passcodes with digit i = x and sum t is the number of 4-digit tails summing to t - x."""
    tails = [0] * 37
    for combo in itertools.product(range(10), repeat=4):
        tails[sum(combo)] += 1
    best = sum(max(tails[t - x] if 0 <= t - x <= 36 else 0 for x in range(10)) for t in range(46))
    want = best / 10 ** 5  # the same for each of the 5 digit positions
    assert digits.text_only_digit_accuracy(design="cumulative") == pytest.approx(want)
    assert 0.15 < want < 0.17


@pytest.mark.parametrize("seed", [0, 1])
def test_cumulative_restart_features_independent_of_t2(seed):
    """Restart mode makes M2 and every later memento's K/V bitwise independent of T2's digits
    given the same memento texts, in the cumulative design too; normal mode does not."""
    torch.manual_seed(0)
    model = tiny_model(layers=3, seed=seed)
    prompt, ra, rb, _ = pair_with_same_m2_text(seed, design="cumulative")
    Fn = probe_kv.memento_kv(model, TOK, [prompt, prompt], [ra, rb], restart=False)
    Fr = probe_kv.memento_kv(model, TOK, [prompt, prompt], [ra, rb], restart=True)
    assert np.array_equal(Fn[0, 0], Fn[1, 0]) and not np.array_equal(Fn[0, 1, 1:], Fn[1, 1, 1:])
    assert np.array_equal(Fr[0, 1:], Fr[1, 1:])


def test_attention_mass_equals_transformers_attention_probabilities(tmp_path):
    """The M3 -> M2 attention mass, computed from the q, k our layers produce, equals the one
    read from transformers' own attention probabilities (eager attention, plain causal mask:
    keep_last_n_blocks -1, where both models see the same keys)."""
    from conftest import tiny_hf_model
    from model import Qwen3

    hf = tiny_hf_model(seed=3, attn_implementation="eager")
    hf.save_pretrained(tmp_path)
    ours = Qwen3.from_pretrained(tmp_path).eval()
    prob, resp, _ = digits.sample(random.Random(4))
    got = probe_kv.attention_mass(ours, TOK, [prob.prompt], [resp], cfg=probe_kv.MementoConfig(-1))
    ids = TOK.encode(TOK.chat_prompt(prob.prompt)) + TOK.encode(resp)
    tr = probe_kv.BlockTracker(MementoTokens.from_tokenizer(TOK), probe_kv.MementoConfig(0))
    for t in ids:
        tr.step(t)
    m2, m3 = tr.completed[1], tr.completed[2]
    with torch.no_grad():
        att = hf(torch.tensor([ids]), output_attentions=True).attentions  # L x [1, H, T, T]
    want = [float(a[0][:, m3.end + 1:m3.summary_end + 1, m2.end + 1:m2.summary_end + 1].sum(-1).mean()) for a in att]
    assert got == pytest.approx(want, abs=1e-5) and min(want) > 0


def test_train_toy_reuse_skips_finished_stages(tmp_path):
    """--reuse keeps a stage whose final checkpoint came from the same arguments, retrains a
    changed stage and everything after it, and rewrites the data when its settings change."""
    def args(**kw):
        a = probe_kv.parse_args(["--design", "cumulative", "--work-dir", str(tmp_path), "--train-examples", "8",
                                 "--train-batch", "2", "--stage1-steps", "2", "--stage2-steps", "2",
                                 "--snapshot-every", "1", "--reuse", "--threads", "1"])
        for k, v in kw.items():
            setattr(a, k, v)
        return a

    def mtimes():
        return {s: (tmp_path / s / "step-000002" / "model.safetensors").stat().st_mtime_ns for s in ("stage1", "stage2")}

    first = probe_kv.train_toy(args(), tmp_path)
    assert first["stage1"]["steps"] == 2 and first["stage2"]["steps"] == 2
    t1 = mtimes()
    probe_kv.train_toy(args(), tmp_path)
    assert mtimes() == t1, "nothing changed: nothing retrained"
    probe_kv.train_toy(args(stage2_lr=5e-4), tmp_path)
    t2 = mtimes()
    assert t2["stage1"] == t1["stage1"] and t2["stage2"] != t1["stage2"], "only stage 2 changed"
    data = (tmp_path / "data.jsonl").read_text()
    probe_kv.train_toy(args(train_examples=9), tmp_path)
    t3 = mtimes()
    assert len((tmp_path / "data.jsonl").read_text().splitlines()) == 9 != len(data.splitlines())
    assert t3["stage1"] != t2["stage1"] and t3["stage2"] != t2["stage2"], "new data: both stages retrained"
    probe_kv.train_toy(args(reuse=False, train_examples=9), tmp_path)
    assert mtimes()["stage1"] != t3["stage1"], "without --reuse everything is retrained"
