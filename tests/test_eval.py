"""eval.py: pass@1 and KV figures through the engine, against direct computations and replays."""
import json
import math
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import eval as ev  # noqa: E402
import evaluation  # noqa: E402
from conftest import tiny_model  # noqa: E402
from data import toy_task  # noqa: E402
from engine import EngineConfig  # noqa: E402
from engine import generate  # noqa: E402
from blocks import MementoConfig, MementoTokens, trace_stats  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

TOK = Tokenizer.byte_level()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tiny_model(layers=1, seed=1).save_pretrained(d)
    TOK.save(d)
    return d


def run_cli(args, capsys=None):
    return ev.main(["--no-progress", *map(str, args)])


def test_trace_stats_counts_by_hand():
    T = MementoTokens.from_tokenizer(TOK)
    ids = TOK.encode("<think>\n<|block_start|>abcd<|block_end|>\n<|summary_start|>xy<|summary_end|>"
                     "<|block_start|>ef<|block_end|><|summary_start|>wxyz<|summary_end|></think>\n7")
    assert trace_stats(ids, T) == {"blocks": 2, "mean_block_tokens": 3.0, "mean_memento_tokens": 3.0}


def test_summary_pass_at_1_se_and_majority():
    recs = []
    verdicts = {0: [(True, "1"), (False, "2"), (True, "1"), (False, "3")],   # pass@1 .5, maj "1" right
                1: [(False, "9"), (False, "9"), (True, "4"), (False, None)],  # .25, maj "9" wrong
                2: [(True, "5")] * 4}                                        # 1.0, right
    for p, vs in verdicts.items():
        for k, (c, x) in enumerate(vs):
            recs.append({"problem": p, "mode": "memento", "sample": k, "correct": c, "extracted": x, "tokens": 10 + k,
                         "blocks": 2, "mean_block_tokens": 5.0, "mean_memento_tokens": 2.0,
                         "peak_kv_tokens": 100 + p, "kv_auc": 1000})
    s = evaluation.summarize(recs, ["memento"])["memento"]
    per_problem = [0.5, 0.25, 1.0]
    mean = sum(per_problem) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in per_problem) / 2) / math.sqrt(3)
    assert s["pass@1"] == pytest.approx(mean) and s["pass@1_se"] == pytest.approx(se)
    assert s["maj@k"] == pytest.approx(2 / 3) and s["k"] == 4 and s["problems"] == 3 and s["samples"] == 12
    assert s["peak_kv_tokens"] == pytest.approx(101) and s["tokens"] == pytest.approx(11.5)


def test_kv_figures_equal_replay_and_formula(ckpt):
    """Each sample's peak KV and AUC equal a teacher-forced replay of its tokens (generate.py
    --replay path: chunked forced decoding); GB figures are §A.3.1 computed by hand."""
    model, tok = tiny_model(layers=1, seed=1), TOK
    problems = evaluation.toy_problems(4, seed=3)
    seqs = {}
    recs = evaluation.run(model, tok, problems, ["memento", "full", "restart"], 2, seed=5,
                  config=EngineConfig(MementoConfig(0), max_num_seqs=5), shapes={"Qwen3-8B": 2 * 36 * 8 * 128 * 2},
                  on_record=lambda r, s: seqs.__setitem__((r["problem"], r["mode"], r["sample"]), s))
    assert len(recs) == 4 * 3 * 2 and len(seqs) == len(recs)
    for r in recs:
        s = seqs[r["problem"], r["mode"], r["sample"]]
        assert r["tokens"] == len(s.tokens) <= evaluation.toy_max_new_tokens(tok)
        replay, _ = generate(model, tok, [s.prompt], EngineConfig(MementoConfig(0), mode=r["mode"], replay_chunk=7),
                             forced=[s.tokens])
        curve = replay[0].curve
        assert (r["peak_kv_tokens"], r["kv_auc"]) == (max(curve), sum(curve))
        assert r["peak_kv_gb@Qwen3-8B"] == pytest.approx(max(curve) * 147456 / 1e9)
        assert r["kv_auc_gb_ktok@Qwen3-8B"] == pytest.approx(sum(curve) * 147456 / 1e12)
        per_token = 2 * 1 * 2 * 8 * 4  # layers 1, kv heads 2, head_dim 8, fp32
        assert r["peak_kv_gb@model"] == pytest.approx(max(curve) * per_token / 1e9)
    full = [r for r in recs if r["mode"] == "full"]
    assert all(r["peak_kv_tokens"] == len(seqs[r["problem"], "full", r["sample"]].prompt) + r["tokens"] for r in full)


def test_toy_cap_holds_the_longest_trace():
    longest = toy_task.Problem(toy_task.MAX_BLOCKS, 9)
    text, _ = toy_task.solve(longest, random.Random(1))
    assert len(TOK.encode(text)) + 1 <= evaluation.toy_max_new_tokens(TOK) <= len(TOK.encode(text)) + 16


def test_eval_toy_equals_restart_ablation(ckpt, tmp_path):
    """Two paths, one answer: restart_ablation.py and eval.py --data toy, same prompts and seeds."""
    import restart_ablation

    res = restart_ablation.main(["--stage1", str(ckpt), "--stage2", str(ckpt), "--n", "6", "--seed", "4",
                                 "--out", str(tmp_path / "r.json"), "--plot", ""])
    out = tmp_path / "e.jsonl"
    run_cli(["--checkpoint", ckpt, "--data", "toy", "--toy-problems", 6, "--n-samples", 1, "--seed", 4,
             "--modes", "memento,restart,full", "--out", out, "--max-new-tokens", 320])
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    for row in res["rows"]:
        mine = sorted((r for r in recs if r["mode"] == row["mode"]), key=lambda r: r["problem"])
        assert [r["correct"] for r in mine] == row["verdicts"]
        assert sum(r["tokens"] for r in mine) / 6 == pytest.approx(row["mean_tokens"])
        assert sum(row["failure_reasons"].values()) == 6


def test_resume_continues_without_duplicates(ckpt, tmp_path):
    common = ["--checkpoint", ckpt, "--data", "toy", "--n-samples", 2, "--modes", "memento,full", "--seed", 1]
    whole = tmp_path / "whole.jsonl"
    run_cli([*common, "--toy-problems", 5, "--out", whole])
    part = tmp_path / "part.jsonl"
    run_cli([*common, "--toy-problems", 2, "--out", part])                 # stopped after 2 problems
    with part.open("a") as f:
        f.write('{"problem": 3, "mode": "memento", "sam')                  # a line cut by a kill
    first = part.read_text().splitlines()[:-1]
    res = run_cli([*common, "--toy-problems", 5, "--out", part])
    lines = part.read_text().splitlines()
    assert lines[:len(first)] == first                                    # earlier results kept as they were
    key = lambda r: (r["problem"], r["mode"], r["sample"])  # noqa: E731
    got = sorted(map(json.loads, lines), key=key)
    want = sorted(map(json.loads, whole.read_text().splitlines()), key=key)
    assert [key(r) for r in got] == [key(r) for r in want] and len(set(map(key, got))) == 5 * 2 * 2
    drop = ("response", "metrics")  # timings differ between runs
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == \
        [{k: v for k, v in r.items() if k not in drop} for r in want]
    assert res["generated"]["samples"] == 3 * 2 * 2
    again = run_cli([*common, "--toy-problems", 5, "--out", part])      # nothing left to do
    assert again["generated"]["samples"] == 0 and part.read_text().splitlines() == lines
    summary = json.loads(part.with_name("part.summary.json").read_text())
    assert summary["summary"]["memento"]["samples"] == 10


def test_resume_refuses_other_settings(ckpt, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    run_cli(["--checkpoint", ckpt, "--toy-problems", 1, "--n-samples", 1, "--out", out])
    with pytest.raises(SystemExit) as e:
        run_cli(["--checkpoint", ckpt, "--toy-problems", 1, "--n-samples", 1, "--out", out, "--temperature", 1.0])
    assert "--temperature (saved 0.6, now 1.0)" in str(e.value) and "--overwrite" in str(e.value)
    run_cli(["--checkpoint", ckpt, "--toy-problems", 1, "--n-samples", 1, "--out", out, "--temperature", 1.0,
             "--overwrite"])
    assert len(out.read_text().splitlines()) == 2


def test_math_data_rows_graded_and_bad_rows_reported(ckpt, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"problem": "What is 1+1?", "answer": "2"}, {"problem": "no answer here"},
        {"problem": "Pick one", "answer": "C"}, {"problem": "", "answer": "3"}]) + "\n")
    common = ["--checkpoint", ckpt, "--data", data, "--n-samples", 1, "--max-new-tokens", 8,
              "--out", tmp_path / "o.jsonl", "--modes", "memento"]
    with pytest.raises(SystemExit) as e:  # by default a bad row stops the run, naming it
        run_cli(common)
    assert str(e.value.code).startswith(f"eval.py: {data}:2: answer: missing;") and not (tmp_path / "o.jsonl").exists()
    res = run_cli([*common, "--bad-records", "skip"])
    err = capsys.readouterr().err
    assert "2 records skipped: answer: missing: 1 (line 2); problem: empty: 1 (line 4)" in err
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert sorted(r["problem"] for r in recs) == [0, 2] and res["summary"]["memento"]["problems"] == 2
    assert all(r["correct"] is False and r["tokens"] <= 8 for r in recs)  # a random model, no </think>


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/x.jsonl"], "no such file"),
    (["--n-samples", "0"], "--n-samples"),
    (["--modes", "memento,fast"], "unknown mode(s) fast"),
    (["--kv-shapes", "Qwen3-9B"], "unknown shape(s) Qwen3-9B"),
    (["--modes", "restart", "--keep-last-n-blocks", "1"], "restart mode is defined for"),
])
def test_bad_input_one_line(ckpt, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run_cli(["--checkpoint", ckpt, "--out", tmp_path / "o.jsonl", *args])
    text = str(e.value.code) + capsys.readouterr().err
    assert message in text and "Traceback" not in text and len(text.strip().splitlines()) == 1


def test_missing_columns_named(ckpt, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
    with pytest.raises(SystemExit) as e:
        run_cli(["--checkpoint", ckpt, "--data", data, "--out", tmp_path / "o.jsonl"])
    assert "columns found: question, solution" in str(e.value) and "--problem-key" in str(e.value)


def test_hub_id_offline_one_line(ckpt, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # the libraries read HF_HUB_OFFLINE when imported: set their constants too (without them
    # an offline machine spends ~25 s in the hub's retries before the same error)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        run_cli(["--checkpoint", ckpt, "--data", "someone/no-such-dataset-xyz", "--out", tmp_path / "o.jsonl"])
    assert "could not load it" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_majority_votes_on_equivalent_answers_in_sample_order():
    """maj@k counts "0.5" and "\\frac12" as one answer, and a tie is decided by sample order,
    not by the order the samples finished in (records arrive as they finish)."""
    def rec(k, x, c):
        return {"problem": 0, "mode": "memento", "sample": k, "correct": c, "extracted": x, "gold": "1/2", "kind": "math",
                "tokens": 1, "blocks": 0, "mean_block_tokens": 0.0, "mean_memento_tokens": 0.0,
                "peak_kv_tokens": 1, "kv_auc": 1}
    finished = [rec(3, "3", False), rec(2, "3", False), rec(1, "\\frac12", True), rec(0, "0.5", True)]
    assert evaluation.summarize(finished, ["memento"])["memento"]["maj@k"] == 1.0
    swapped = [rec(0, "3", False), rec(1, "3", False), rec(2, "\\frac12", True), rec(3, "0.5", True)]
    assert evaluation.summarize(swapped[::-1], ["memento"])["memento"]["maj@k"] == 0.0


def test_results_name_their_weights_and_refuse_a_retrained_checkpoint(tmp_path):
    """The results' config holds a hash of the checkpoint's config and weights; the same
    directory retrained (other weights) is refused, the same weights copied elsewhere accepted."""
    d = tmp_path / "ckpt"
    tiny_model(layers=1, seed=1).save_pretrained(d)
    TOK.save(d)
    out = tmp_path / "r.jsonl"
    common = ["--toy-problems", 1, "--n-samples", 1, "--out", out]
    run_cli(["--checkpoint", d, *common])
    saved = json.loads((tmp_path / "r.config.json").read_text())
    assert len(saved["checkpoint_sha256"]) == 64
    tiny_model(layers=1, seed=2).save_pretrained(d)  # retrained into the same directory
    with pytest.raises(SystemExit) as e:
        run_cli(["--checkpoint", d, *common, "--n-samples", 2])
    assert "--checkpoint-sha256 (saved" in str(e.value)


def test_samples_cut_by_the_kv_pool_are_not_graded_and_are_retried(ckpt, tmp_path):
    """A pool too small for the prompts: every sample ends by the pool, is recorded as such (no
    verdict) and counted apart; a rerun with a larger pool (allowed: not a result-defining flag)
    retries exactly those and the summary counts the new samples only."""
    out = tmp_path / "c.jsonl"
    common = ["--checkpoint", ckpt, "--data", "toy", "--toy-problems", 3, "--n-samples", 1, "--modes", "memento",
              "--out", out, "--page-size", 4]
    first = run_cli([*common, "--kv-cache-tokens", 8])
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 3 and all(r["kv_pool_cut"] and r["correct"] is None for r in recs)
    assert "memento" not in first["summary"]  # nothing graded
    second = run_cli([*common, "--kv-cache-tokens", 100_000])
    assert second["generated"]["samples"] == 3
    s = second["summary"]["memento"]
    assert s["samples"] == 3 and s["kv_pool_cut"] == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 6 and not any(r["kv_pool_cut"] for r in lines[3:])
    assert run_cli([*common, "--kv-cache-tokens", 100_000])["generated"]["samples"] == 0


def test_a_dataset_with_splits_needs_one_named(ckpt, tmp_path):
    """A local dataset with train and test files: refused without --split (one line naming the
    splits), and --split test reads the test file only (no merge of train into test)."""
    d = tmp_path / "bench"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"problem": f"train {i}", "answer": str(i)}) + "\n" for i in range(5)))
    (d / "test.jsonl").write_text("".join(json.dumps({"problem": f"test {i}", "answer": str(i)}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match="splits test, train; name one with --split"):
        evaluation.load_problems(str(d), "problem", "answer")
    problems, report = evaluation.load_problems(str(d), "problem", "answer", split="test")
    assert [p.prompt for p in problems] == ["test 0", "test 1", "test 2"] and report.n_skipped == 0
    with pytest.raises(SystemExit) as e:
        run_cli(["--checkpoint", ckpt, "--data", d, "--out", tmp_path / "o.jsonl"])
    assert "name one with --split" in str(e.value)


def test_gpqa_csv_is_lettered_in_a_seeded_order_and_graded(tmp_path):
    """GPQA's CSV (the correct and three incorrect answers): each row becomes four lettered
    options in an order that depends only on (seed, row), and the gold is the correct letter;
    a response naming that letter is graded right, another letter wrong."""
    import csv

    from data import grading

    path = tmp_path / "gpqa.csv"
    rows = [{"Question": f"Which is right {i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": f"w1_{i}",
             "Incorrect Answer 2": f"w2_{i}", "Incorrect Answer 3": f"w3_{i}", "Subdomain": "x"} for i in range(8)]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    problems, _ = evaluation.load_problems(str(path), "problem", "answer", seed=3)
    again, _ = evaluation.load_problems(str(path), "problem", "answer", seed=3)
    other, _ = evaluation.load_problems(str(path), "problem", "answer", seed=4)
    assert [p.prompt for p in problems] == [p.prompt for p in again] != [p.prompt for p in other]
    letters = set()
    for i, p in enumerate(problems):
        assert p.kind == "choice" and p.gold in "ABCD"
        assert f"{p.gold}) right{i}\n" in p.prompt or p.prompt.count(f"{p.gold}) right{i}") == 1
        for wrong in ("w1_", "w2_", "w3_"):
            assert f"{wrong}{i}" in p.prompt
        letters.add(p.gold)
        other_letter = next(x for x in "ABCD" if x != p.gold)
        assert grading.grade_choice(f"<think>x</think>The answer is \\boxed{{{p.gold}}}", p.gold)
        assert not grading.grade_choice(f"<think>x</think>The answer is \\boxed{{{other_letter}}}", p.gold)
    assert len(letters) > 1  # the correct answer is not always in one place


def test_grading_in_worker_processes_equals_grading_inline():
    """Math answers graded by a worker process (the default: decoding never waits on
    math-verify) give the same records as grading in the decoding thread."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from data import grading
    from engine import Sequence
    from sampling import SamplingParams

    probs = [evaluation.Problem(i, f"q{i}", gold, "math") for i, gold in enumerate(["\\frac12", "3", "10, 100"])]
    answers = ["<think>x</think>\\boxed{0.5}", "<think>x</think>Final Answer: $4$", "<think>x</think>\\boxed{100, 10}"]
    seqs = [Sequence(i, [1], SamplingParams(), "memento", tokens=TOK.encode(a), stop_reason="stop token", done=True)
            for i, a in enumerate(answers)]
    fmt = MementoTokens.from_tokenizer(TOK)
    inline = [evaluation.record(p, "memento", 0, 0, s, TOK, fmt, {}) for p, s in zip(probs, seqs)]
    assert [r["correct"] for r in inline] == [True, False, True]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        verdicts = [pool.submit(grading.grade, TOK.decode(s.tokens), p.gold, p.kind, p.prompt).result()
                    for p, s in zip(probs, seqs)]
    worker = [evaluation.record(p, "memento", 0, 0, s, TOK, fmt, {}, v) for p, s, v in zip(probs, seqs, verdicts)]
    assert [{k: v for k, v in r.items() if k != "metrics"} for r in worker] == \
        [{k: v for k, v in r.items() if k != "metrics"} for r in inline]
