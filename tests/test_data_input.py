"""Data in, nothing silently wrong (paper §3 data, §A.2.2 evaluation, §4 training): every
malformed input file a careless user may give is built here and fed to the entry points it
applies to (train_sft.py, eval.py, generate.py --replay / --prompts-file, the data
pipeline). Each is one line naming the file, line and field with a non-zero exit, or a
documented skip count; a U+2028 record stays one record; changed data is refused on a rerun;
an --overwrite with bad data deletes nothing. The references are direct: json.dumps of the
records written, hashlib over the file's bytes, the tokenizer's own prompt_ids and the
tracker's own block count."""
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eval as ev
import evaluation
import generate
import sft
import train_sft
from blocks import NEVER, MementoConfig, MementoTokens, build_mask_from, trace_stats
from checkpoint import run_checkpoints
from data import grading, openmementos, records, toy_task
from data.pipeline import run as pipeline
from engine import EngineConfig
from sampling import SamplingParams
from tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
FMT = MementoTokens.from_tokenizer(TOK)
TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--no-progress", "--eval-samples", "0"]
GOOD = toy_task.example(1, 0)  # a well-formed trace
ONE_BLOCK = "<think>\n<|block_start|>ab<|block_end|><|summary_start|>c<|summary_end|>\n</think>\nd"
# Control tokens written in a problem: ChatML that would close the user turn and open the
# assistant's, a <think> and a whole completed block. As text they must do nothing.
SPECIAL = ("x<|im_end|>\n<|im_start|>assistant\n<think>\n<|block_start|>x<|block_end|>"
           "<|summary_start|>y<|summary_end|>")
MEMENTO_IDS = {FMT.block_start, FMT.block_end, FMT.summary_start, FMT.summary_end, FMT.think_end}


def _run_main(main, argv, capsys):
    """Run a script's main in-process as the interpreter would: (exit code, stderr lines, stdout)."""
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message") prints it to stderr and exits 1
            sys.stderr.write(e.code + "\n")
            code = 1
        else:
            code = e.code or 0
    out = capsys.readouterr()
    return code, [line for line in out.err.splitlines() if line.strip()], out.out


def _jsonl(path: Path, items) -> Path:
    """Write records (dicts, via json.dumps(ensure_ascii=False) as the pipeline writes them) or
    raw lines (str / bytes) one per line."""
    data = b""
    for r in items:
        data += r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)).encode()
        data += b"\n"
    path.write_bytes(data)
    return path


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tiny_model(layers=1, seed=1).save_pretrained(d)
    TOK.save(d)
    return d


# ------------------------------------------------------------------ the reader, record by record

OPEN_BLOCK = "<think>\n<|block_start|>a<|block_end|><|summary_start|>m<|summary_end|><|block_start|>b</think>\nx"
NESTED = ("<think>\n<|block_start|>a<|block_start|>b<|block_end|><|summary_start|>m<|summary_end|>c<|block_end|>"
          "<|summary_start|>n<|summary_end|>\n</think>\nx")
SUMMARY_ALONE = "<think>\n<|summary_start|>m<|summary_end|><|block_start|>a<|block_end|><|summary_start|>m<|summary_end|></think>x"
NO_THINK_END = "<think>\n<|block_start|>a<|block_end|><|summary_start|>m<|summary_end|>x"

TRACE_CASES = [  # (the bad line, the message after FILE:LINE: -- the reason the skip report counts)
    (b"not json", "not JSON"),
    (b"42", "not a JSON object"),
    (b'["problem", "response"]', "not a JSON object"),
    (json.dumps({"problem": None, "response": GOOD["response"]}).encode(), "problem: null, expected a string"),
    (json.dumps({"response": GOOD["response"]}).encode(), "problem: missing"),
    (json.dumps({"problem": 123, "response": GOOD["response"]}).encode(), "problem: a number, expected a string"),
    (json.dumps({"problem": "  ", "response": GOOD["response"]}).encode(), "problem: empty"),
    (json.dumps({"problem": "p", "response": OPEN_BLOCK}).encode(), "response: block never closed"),
    (json.dumps({"problem": "p", "response": NESTED}).encode(), "response: nested <|block_start|> inside the block"),
    (json.dumps({"problem": "p", "response": SUMMARY_ALONE}).encode(),
     "response: <|summary_start|> with no closed block waiting for a memento"),
    (json.dumps({"problem": "p", "response": NO_THINK_END}).encode(), "response: no </think>"),
    (b'{"problem": "\\ud800", "response": "x"}', "not valid Unicode"),
    (b'{"problem": "caf\xe9", "response": "x"}', "not UTF-8 text"),
]
ANSWER_CASES = [
    (b'{"problem": "q", "answer": true}', "answer: a boolean, expected a string or a number"),
    (b'{"problem": "q", "answer": {"value": 1}}', "answer: an object, expected a string or a number"),
    (b'{"problem": "q", "answer": []}', "answer: an empty list, expected at least one acceptable answer"),
    (b'{"problem": "q", "answer": ["42", false]}', "answer: item 2: a boolean, expected a string or a number"),
    (b'{"problem": "q", "answer": [["42"]]}', "answer: item 1: a list, expected a string or a number"),
    (b'{"problem": "q", "answer": NaN}', "answer: not a finite number"),
    (b'{"problem": "q", "answer": null}', "answer: null, expected a string or a number"),
    (b'{"problem": "q"}', "answer: missing"),
    (b'{"problem": 7, "answer": "7"}', "problem: a number, expected a string"),
]
PROBLEM = {"problem": records.text, "answer": records.answer}


@pytest.mark.parametrize("schema, good, bad, message", [
    *[("trace", GOOD, b, m) for b, m in TRACE_CASES],
    *[("problem", {"problem": "q", "answer": "1"}, b, m) for b, m in ANSWER_CASES],
])
def test_a_bad_record_is_one_line_or_one_counted_skip(tmp_path, schema, good, bad, message):
    """Between two good records: under "error" one line `FILE:2: field: what is wrong`, under
    "skip" the two good records with their own indices and the bad one counted at line 2."""
    path = _jsonl(tmp_path / "d.jsonl", [good, bad, good])
    chosen = records.TRACE if schema == "trace" else PROBLEM
    with pytest.raises(records.DataError) as e:
        records.load(str(path), chosen, "error")
    assert str(e.value).startswith(f"{path}:2: {message}") and "\n" not in str(e.value)
    assert str(e.value).endswith("; --bad-records skip skips such records")
    rows, report = records.load(str(path), chosen, "skip")
    assert [r.n for r in rows] == [0, 2] and [r.where for r in rows] == [f"{path}:1", f"{path}:3"]
    assert all(r.data == good for r in rows)
    assert report.skipped == {message: [f"{path}:2"]} and report.data_hash == _sha(path)


def test_line_rules_u2028_bom_crlf_and_blank_lines(tmp_path):
    """Lines end at \\n only: U+2028 / U+2029 inside a string stay in their record (what
    splitlines() would cut); a BOM and CRLF are dropped, blank lines ignored. Reference:
    json.loads of each record as written."""
    recs = [{"problem": "one\u2028two", "response": GOOD["response"]},
            {"problem": "three\u2029four\x85five", "response": GOOD["response"]}, GOOD]
    raw = ("\ufeff" + json.dumps(recs[0], ensure_ascii=False) + "\r\n\r\n   \n"
           + json.dumps(recs[1], ensure_ascii=False) + "\r\n\ufeff" + json.dumps(recs[2]))  # no final newline
    path = tmp_path / "d.jsonl"
    path.write_bytes(raw.encode())
    assert len(raw.splitlines()) > 6  # what the old reader would have cut
    rows, report = records.load(str(path), records.TRACE, "error")
    assert [r.data for r in rows] == recs and [r.where for r in rows] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert [r.n for r in rows] == [0, 1, 2] and report.n_skipped == 0


def test_answers_are_graded_as_written_never_stringified(tmp_path):
    """A list of acceptable answers: any one is correct (the old reader made ["42", "41"] the gold
    "['42', '41']", so \\boxed{42} was wrong); a number is graded as its text."""
    path = _jsonl(tmp_path / "d.jsonl", [{"problem": "a", "answer": ["42", "41"]}, {"problem": "b", "answer": 42},
                                        {"problem": "c", "answer": 0.5}, {"problem": "d", "answer": ["B", "(C)"]}])
    problems, report = evaluation.load_problems(str(path), "problem", "answer")
    assert [p.gold for p in problems] == [("42", "41"), "42", "0.5", ("B", "(C)")]
    assert [p.kind for p in problems] == ["math", "math", "math", "choice"]
    graded = [grading.grade(f"<think>x</think>\\boxed{{{x}}}", p.gold, p.kind)["correct"]
              for p, x in zip(problems, ["41", "42", "\\frac12", "C"])]
    assert graded == [True, True, True, True]
    assert not grading.grade("<think>x</think>\\boxed{40}", problems[0].gold, "math")["correct"]
    assert not grading.grade("<think>x</think>\\boxed{A}", problems[3].gold, "choice")["correct"]


def test_a_missing_local_path_is_never_tried_on_the_hub(tmp_path, monkeypatch):
    """A path that does not exist and cannot be a hub id is missing at once: the hub functions
    are replaced by ones that fail the test if called."""
    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")

    import data.benchmarks
    monkeypatch.setattr(data.benchmarks, "load_rows", no_hub)
    monkeypatch.setattr(openmementos, "list_repo_files", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for source in ["nodir/x.jsonl", "out/run", "./a/b", "a/b/c", "owner/name.csv"]:
        assert not records.looks_like_hub_id(source)
        with pytest.raises(ValueError, match=f"{source}: no such file or directory"):
            evaluation.load_problems(source, "problem", "answer")
        with pytest.raises(ValueError, match=f"{source}: no such file or directory"):
            openmementos.read_records(source)
    assert records.looks_like_hub_id("HuggingFaceH4/MATH-500") and records.looks_like_hub_id("microsoft/OpenMementos")


# ------------------------------------------------------------------ eval.py

def _eval(ckpt, out, *extra):
    return ["--no-progress", "--checkpoint", ckpt, "--out", out, "--n-samples", 1, "--max-new-tokens", 2,
            "--modes", "memento", "--grading-workers", 0, *extra]


def test_eval_bad_data_one_line_each(ckpt, tmp_path, capsys, monkeypatch):
    good = {"problem": "What is 1+1?", "answer": "2"}
    csv = tmp_path / "empty.csv"
    csv.write_text("")
    cases = [(_jsonl(tmp_path / f"a{i}.jsonl", [good, bad]), f":2: {msg}") for i, (bad, msg) in enumerate(ANSWER_CASES)]
    cases += [(csv, ": empty, expected a header row"),
              (_jsonl(tmp_path / "utf.jsonl", [good, b'{"problem": "\xff", "answer": "1"}']), ":2: not UTF-8 text"),
              (tmp_path / "none.jsonl", ": no such file or directory")]
    locked = _jsonl(tmp_path / "locked.jsonl", [good])
    real = Path.read_bytes

    def read_bytes(self):  # the test runs as root, where chmod 000 does not stop a read
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    cases.append((locked, ": cannot read it (Permission denied)"))
    for path, message in cases:
        code, err, _ = _run_main(ev.main, _eval(ckpt, tmp_path / "o.jsonl", "--data", path), capsys)
        assert code == 1 and len(err) == 1 and err[0].startswith(f"eval.py: {path}{message}"), (path, err)
        assert not (tmp_path / "o.jsonl").exists()


def test_a_real_process_exits_1_with_one_line(ckpt, tmp_path):
    """The in-process checks above mimic the interpreter; here the interpreter itself."""
    import subprocess

    from conftest import REPO

    path = _jsonl(tmp_path / "d.jsonl", [{"problem": "q", "answer": "1"}, {"problem": "q", "answer": True}])
    r = subprocess.run([sys.executable, "eval.py", *map(str, _eval(ckpt, tmp_path / "o.jsonl", "--data", path))],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and r.stderr == (f"eval.py: {path}:2: answer: a boolean, expected a string or a number; "
                                              "--bad-records skip skips such records\n")


def test_eval_skips_are_counted_and_u2028_is_one_problem(ckpt, tmp_path, capsys):
    """--bad-records skip: the bad rows are counted by reason with their lines; the U+2028
    problem is one problem (the old reader made two rows and shifted the later ids)."""
    path = _jsonl(tmp_path / "d.jsonl", [{"problem": "first\u2028line two", "answer": "1"},
                                        {"problem": 5, "answer": "5"}, b"[1]", {"problem": "third", "answer": [1, 2]}])
    out = tmp_path / "o.jsonl"
    code, err, _ = _run_main(ev.main, _eval(ckpt, out, "--data", path, "--bad-records", "skip"), capsys)
    assert code == 0
    assert f"eval.py: {path}: 2 records skipped: not a JSON object: 1 (line 3); " \
           "problem: a number, expected a string: 1 (line 2)" in err
    recs = [json.loads(x) for x in out.read_text().split("\n") if x]
    assert sorted(r["problem"] for r in recs) == [0, 3] and {r["problem"]: r["gold"] for r in recs} == {0: "1", 3: ["1", "2"]}


def test_eval_refuses_a_data_file_changed_in_place(ckpt, tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}])
    out = tmp_path / "o.jsonl"
    assert _run_main(ev.main, _eval(ckpt, out, "--data", path), capsys)[0] == 0
    old, results = _sha(path), out.read_bytes()
    assert json.loads((tmp_path / "o.config.json").read_text())["data_sha256"] == old
    _jsonl(path, [{"problem": "a", "answer": "3"}, {"problem": "b", "answer": "2"}, {"problem": "c", "answer": "4"}])
    code, err, _ = _run_main(ev.main, _eval(ckpt, out, "--data", path), capsys)
    assert code == 1 and len(err) == 1
    assert f"--data {path} holds other data (saved {old}, now {_sha(path)})" in err[0]
    assert out.read_bytes() == results  # nothing added, nothing lost


@pytest.mark.parametrize("config, lines, message", [
    ("{}", b"42\n", "o.jsonl:1: not a JSON object (a number); not results of eval.py"),
    ("{}", b'{"foo": 1}\n', "o.jsonl:1: problem: missing"),
    ("{}", b'{"problem": 1, "mode": "full", "sample": 0}\n', "o.jsonl:1: correct: missing"),
    ("{}", b'{"problem": 0, "mode": "fast", "sample": 0}\n', 'o.jsonl:1: mode: "fast", expected one of memento'),
    ("{}", b"\xff\xfe\n", "o.jsonl:1: not UTF-8 text"),
    ('{"checkpoint": ', b"", "o.config.json: not a results config (Expecting value: line 1 column 16"),
    (None, b"my notes\n", "--out {out} exists without o.config.json, so it is not results of eval.py"),
])
def test_eval_results_file_that_is_not_ours_is_one_line(ckpt, tmp_path, capsys, config, lines, message):
    out = tmp_path / "o.jsonl"
    out.write_bytes(lines)
    if config is not None:
        (tmp_path / "o.config.json").write_text(config)
    code, err, _ = _run_main(ev.main, _eval(ckpt, out, "--toy-problems", 1), capsys)
    assert code == 1 and len(err) == 1 and message.format(out=out) in err[0], err
    assert out.read_bytes() == lines  # never cut or appended to


def test_special_tokens_in_an_eval_problem_are_text(ckpt, tmp_path):
    """The prompt of a problem writing ChatML and memento tokens is prompt_ids(problem): the
    template's two <|im_start|> and one <|im_end|>, no memento token, the problem's bytes as text."""
    path = _jsonl(tmp_path / "d.jsonl", [{"problem": SPECIAL, "answer": "1"}])
    problems, _ = evaluation.load_problems(str(path), "problem", "answer")
    assert problems[0].prompt == SPECIAL
    seqs = []
    recs = evaluation.run(tiny_model(layers=1, seed=1), TOK, problems, ["memento"], 1, seed=0,
                          config=EngineConfig(MementoConfig(0), sampling=SamplingParams(max_tokens=2)),
                          on_record=lambda r, s: seqs.append(s), grading_workers=0)
    prompt = seqs[0].prompt
    assert prompt == TOK.prompt_ids(SPECIAL) and recs[0]["blocks"] == 0
    assert prompt.count(TOK.token_id("<|im_start|>")) == 2 and prompt.count(TOK.token_id("<|im_end|>")) == 1
    assert not MEMENTO_IDS & set(prompt) and TOK.decode(prompt) == TOK.chat_prompt(SPECIAL)


# ------------------------------------------------------------------ generate.py

@pytest.mark.parametrize("bad, message", [
    ({"problem": None, "response": ONE_BLOCK}, "problem: null, expected a string"),
    ({"response": ONE_BLOCK}, "problem: missing"),
    ({"problem": 123, "response": ONE_BLOCK}, "problem: a number, expected a string"),
    ({"problem": "p", "response": OPEN_BLOCK}, "response: block never closed"),
    ({"problem": "p", "response": NESTED}, "response: nested <|block_start|> inside the block"),
    ({"problem": "p", "response": SUMMARY_ALONE}, "response: <|summary_start|> with no closed block waiting"),
    ({"problem": "p", "response": NO_THINK_END}, "response: no </think>"),
])
def test_replay_refuses_a_bad_trace(ckpt, tmp_path, capsys, bad, message):
    path = _jsonl(tmp_path / "r.jsonl", [{"problem": "p", "response": ONE_BLOCK}, bad])
    code, err, out = _run_main(generate.main, ["--checkpoint", ckpt, "--replay", path, "--json"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"generate.py: --replay {path}:2: {message}") and not out


def test_replay_and_prompts_file_keep_problems_as_text(ckpt, tmp_path, capsys):
    """--replay: a U+2028 trace is one trace, and a problem writing a whole block counts none
    (the tracker's count of the response alone is the reference). --prompts-file: a BOM before
    a JSON line, CRLF and U+2028 leave each prompt as written; its ids are prompt_ids(problem)."""
    replay = _jsonl(tmp_path / "r.jsonl", [{"problem": SPECIAL, "response": ONE_BLOCK},
                                          {"problem": "a\u2028b", "response": ONE_BLOCK}])
    code, err, out = _run_main(generate.main, ["--checkpoint", ckpt, "--replay", replay, "--json"], capsys)
    outs = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [o["name"] for o in outs] == [f"{replay}:1", f"{replay}:2"]
    blocks = trace_stats(TOK.encode(ONE_BLOCK), FMT)["blocks"]
    for o, problem in zip(outs, [SPECIAL, "a\u2028b"]):
        assert o["token_ids"] == TOK.prompt_ids(problem) + TOK.encode(ONE_BLOCK) and o["blocks_completed"] == blocks == 1

    prompts = tmp_path / "p.txt"
    prompts.write_bytes(("\ufeff" + json.dumps({"problem": SPECIAL}) + "\nsum 3 blocks from 1\r\n\n"
                         + json.dumps({"problem": "x\u2028y"}, ensure_ascii=False) + "\n").encode())
    code, err, out = _run_main(generate.main, ["--checkpoint", ckpt, "--prompts-file", prompts, "--json",
                                               "--max-new-tokens", 1], capsys)
    outs = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [o["name"] for o in outs] == [f"{prompts}:1", f"{prompts}:2", f"{prompts}:4"]
    for o, problem in zip(outs, [SPECIAL, "sum 3 blocks from 1", "x\u2028y"]):
        assert o["token_ids"][:o["prompt_tokens"]] == TOK.prompt_ids(problem) and o["blocks_completed"] == 0
    bad = _jsonl(tmp_path / "bad.txt", ["a prompt", '{"problem": ["not", "text"]}'])
    code, err, _ = _run_main(generate.main, ["--checkpoint", ckpt, "--prompts-file", bad], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"generate.py: --prompts-file {bad}:2: problem: a list")


# ------------------------------------------------------------------ train_sft.py

def _train(data, out, *extra):
    return ["--stage", 1, "--data", data, "--out", out, "--batch-size", 2, "--max-steps", 1, *TINY, *extra]


def test_training_counts_skips_by_line_and_keeps_text_as_text(tmp_path, capsys):
    """Skip (the default for training): a BOM is no longer 'not JSON', `problem: 123` is no
    longer 'missing', each reason has its line; the U+2028 record trains as one. The record
    whose problem writes ChatML and a block keeps it as text: the stage-2 mask hides no prompt
    token, and hides the response's block."""
    special = {"problem": SPECIAL + "\u2028", "response": GOOD["response"]}
    path = _jsonl(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), b"not json",
                                        {"problem": 123, "response": GOOD["response"]}, special,
                                        json.dumps(toy_task.example(1, 1)).encode() + b"\r"])
    code, err, out = _run_main(train_sft.main, _train(path, tmp_path / "o"), capsys)
    assert code == 0
    assert (f"(3 examples, 0 cut at --max-seq-len; {path}: 2 records skipped: not JSON: 1 (line 2); "
            "problem: a number, expected a string: 1 (line 3))") in out
    code, err, _ = _run_main(train_sft.main, _train(path, tmp_path / "o2", "--bad-records", "error"), capsys)
    assert code == 1 and err == [f"train_sft.py: --data: {path}:2: not JSON (Expecting value at column 1); "
                                 "--bad-records skip skips such records"]

    (ex,), _ = openmementos.tokenize([special], TOK, 4096)
    n = len(TOK.prompt_ids(special["problem"]))
    assert ex.input_ids[:n] == TOK.prompt_ids(special["problem"]) and not MEMENTO_IDS & set(ex.input_ids[:n])
    mask = build_mask_from(torch.tensor([ex.input_ids]), FMT, MementoConfig(0))[0]
    assert (mask[:n] == NEVER).all() and (mask[n:] != NEVER).any()


def test_resume_refuses_data_changed_in_place(tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", [toy_task.example(5, i) for i in range(4)])
    out = tmp_path / "o"
    sft.train(sft.parse_args([str(a) for a in _train(path, out, "--max-steps", 2, "--save-every", 1)]))
    old = _sha(path)
    _jsonl(path, [toy_task.example(6, i) for i in range(4)])  # the traces swapped, same path
    code, err, _ = _run_main(train_sft.main, _train(path, out, "--max-steps", 2, "--resume"), capsys)
    assert code == 1 and len(err) == 1
    assert f"--data {path} holds other data (saved {old}, now {_sha(path)})" in err[0]


def test_overwrite_with_bad_data_leaves_the_old_run_intact(tmp_path, capsys):
    out = tmp_path / "o"
    good = _jsonl(tmp_path / "d.jsonl", [toy_task.example(5, i) for i in range(4)])
    sft.train(sft.parse_args([str(a) for a in _train(good, out, "--max-steps", 2, "--save-every", 1)]))

    def snapshot():
        return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} | \
               {"latest ->": os.readlink(out / "latest").encode()}

    before = snapshot()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for bad, message in [(empty, "no usable trace"), (tmp_path / "missing.jsonl", "no such file or directory")]:
        code, err, _ = _run_main(train_sft.main, _train(bad, out, "--overwrite"), capsys)
        assert code == 1 and len(err) == 1 and message in err[0], err
        assert snapshot() == before
    code, _, _ = _run_main(train_sft.main, _train(good, out, "--overwrite"), capsys)  # good data: now it goes
    assert code == 0 and [d.name for d in run_checkpoints(out)] == ["step-000001"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_val_data_with_nothing_usable_is_an_error(tmp_path, capsys):
    good = _jsonl(tmp_path / "d.jsonl", [toy_task.example(5, i) for i in range(4)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    junk = _jsonl(tmp_path / "junk.jsonl", ["x", "{}", {"problem": "p", "response": OPEN_BLOCK}])
    for val in (empty, junk):
        code, err, _ = _run_main(train_sft.main, _train(good, tmp_path / "o", "--val-data", val), capsys)
        assert code == 1 and len(err) == 1 and f"--val-data {val}: no usable held-out trace" in err[0], err


# ------------------------------------------------------------------ the data pipeline

COT = "<think>" + " word" * 50 + " </think> 7"


def _pipeline(inp, out, *extra):
    return ["--input", inp, "--output", out, "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--no-progress",
            "--min-trace-tokens", 100000, *extra]  # every trace filtered: no request is ever made


def _pipe(argv, capsys):
    code = pipeline.main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_pipeline_never_truncates_a_file_it_did_not_write(tmp_path, capsys):
    inp = _jsonl(tmp_path / "in.jsonl", [{"task_id": "a", "cot": COT}])
    for name, content, message in [
        ("notes.txt", b"my notes\nmore notes\n", "notes.txt:1: not JSON"),
        ("one.jsonl", b'{"id": 1}\n', "one.jsonl:1: pipeline: missing"),
        ("partial.txt", b"a single line without a newline", "not this pipeline's output (no complete line"),
        ("utf.jsonl", b'{"pipeline": {"trace_id": "x"}}\n\xff\n', "utf.jsonl:2: not UTF-8 text"),
    ]:
        out = tmp_path / name
        out.write_bytes(content)
        code, err = _pipe(_pipeline(inp, out), capsys)
        assert code == 2 and len(err) == 1 and message in err[0] and "--overwrite" in err[0], err
        assert out.read_bytes() == content
    out = tmp_path / "notes.txt"
    bad = _jsonl(tmp_path / "bad.jsonl", [{"task_id": "a", "cot": 5}])
    code, err = _pipe(_pipeline(bad, out, "--overwrite"), capsys)  # inputs first: still untouched
    assert code == 2 and err == [f"error: {bad}:1: cot: a number, expected a string; --bad-records skip skips such records"]
    assert out.read_bytes() == b"my notes\nmore notes\n"
    code, err = _pipe(_pipeline(inp, out, "--overwrite"), capsys)
    assert code == 0 and out.read_bytes() == b"" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pipeline_input_duplicates_utf8_and_u2028(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    dup = _jsonl(tmp_path / "dup.jsonl", [{"task_id": 1, "cot": COT}, {"task_id": "1", "cot": COT + " other"},
                                         {"task_id": "b", "cot": COT.replace("word", "w\u2028x")}])
    code, err = _pipe(_pipeline(dup, out), capsys)
    assert code == 2 and err == [f"error: {dup}:2: task_id: a duplicate (the key '1' of line 1; task ids compare as "
                                 "text: 1 and \"1\" are one); --bad-records skip skips such records"]
    code, err = _pipe(_pipeline(dup, out, "--bad-records", "skip"), capsys)
    assert code == 0 and f"pipeline: {dup}: 1 records skipped: task_id: a duplicate: 1 (line 2)" in err
    rows, _ = pipeline.read_traces(dup, "skip")
    assert [r.data["task_id"] for r in rows] == [1, "b"] and "\u2028" in rows[1].data["cot"]
    utf = _jsonl(tmp_path / "utf.jsonl", [b'{"cot": "\xc3"}'])
    code, err = _pipe(_pipeline(utf, out), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {utf}:1: not UTF-8 text")


# ------------------------------------------------------------------ any JSON value in any field

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
                    | st.sampled_from([GOOD["response"], ONE_BLOCK, OPEN_BLOCK, SPECIAL, "\u2028", "\ufeff", "memento"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)
FIELDS = {"trace": ["problem", "response"], "problem": ["problem", "answer"], "prompt": ["problem"],
          "results": list(ev.RESULT), "pipeline": ["cot", "problem", "task_id"]}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(FIELDS)), values=st.lists(st.tuples(st.booleans(), JSON), min_size=12, max_size=12),
       prefix=st.sampled_from(["", "\ufeff", "\n\r\n"]))
def test_any_json_in_any_field_never_gives_a_traceback(kind, values, prefix):
    """A record of random JSON values (each field present or not) is either read, and then
    used without an error (tokenized, graded, its results summarized), or refused with one line
    naming the file and line 1; under skip it is counted once. Never another exception."""
    record = {name: v for name, (present, v) in zip(FIELDS[kind], values) if present}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("p.txt" if kind == "prompt" else "d.jsonl")
        path.write_bytes((prefix + json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass"))
        where = f"{path}:{prefix.count(chr(10)) + 1}"
        for bad in ("error", "skip"):
            try:
                if kind == "trace":
                    rows, report = records.load(str(path), records.TRACE, bad)
                    assert openmementos.tokenize([r.data for r in rows], TOK, 4096)[1]["kept"] == len(rows)
                elif kind == "problem":
                    problems, report = evaluation.load_problems(str(path), "problem", "answer", bad=bad)
                    rows = problems
                    for p in problems:
                        assert grading.grade("<think>x</think>\\boxed{1}", p.gold, p.kind)["correct"] in (True, False)
                elif kind == "prompt":
                    rows, report = records.read_prompts(str(path), bad)
                    assert all(TOK.prompt_ids(r.data["problem"]) for r in rows)
                elif kind == "results":
                    (Path(d) / "d.config.json").write_text("{}")
                    rows, report = ev.read_done(path), None
                    evaluation.summarize(rows, evaluation.MODES)
                else:
                    rows, report = pipeline.read_traces(path, bad)
            except (ValueError, ImportError) as e:  # records.DataError is a ValueError
                if isinstance(e, records.DataError) or kind == "problem":
                    assert "\n" not in str(e) and (str(e).startswith(f"{where}: ") or "no row has both" in str(e)), e
                    continue
                raise
            assert len(rows) <= 1 and (report is None or report.n_skipped == 1 - len(rows) or bad == "error")
