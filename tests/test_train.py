"""train_sft.py and data/: the recipe of paper §4 / §A.2.1 on the embedded task and real traces."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port, killed_after

import sft
import training
from data import openmementos, toy_task
from blocks import MementoConfig, MementoTokens
from checkpoint import local_checkpoint, run_checkpoints
from model import Qwen3
from sharding import full_state
from tokenizer import Tokenizer

TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--no-progress", "--eval-samples", "0"]


def _train(tmp_path, stage, *extra, name=None):
    out = tmp_path / (name or f"stage{stage}")
    args = sft.parse_args(["--stage", str(stage), "--out", str(out), *TINY, *extra])
    return sft.train(args), out


def test_loss_decreases_in_both_stages(tmp_path):
    m1, out1 = _train(tmp_path, 1, "--max-steps", "25", "--batch-size", "8", "--lr", "3e-3")
    m2, _ = _train(tmp_path, 2, "--max-steps", "25", "--batch-size", "8", "--lr", "3e-3", "--init-from", str(out1))
    for m in (m1, m2):
        losses = [e["loss"] for e in m["log"]]
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert m2["log"][0]["loss"] < m1["log"][0]["loss"]  # stage 2 starts from stage 1


def _losses(model, tok, text_ids, stage):
    cfg = MementoConfig(-1 if stage == 1 else 0)
    ids = torch.tensor([text_ids])
    with torch.no_grad():
        return model(ids, mask_from=sft.stage_mask(ids, MementoTokens.from_tokenizer(tok), cfg), labels=ids)[0]


def test_stage2_hides_masked_blocks_and_stage1_does_not():
    """Changing a masked block's digits leaves the loss after its memento unchanged in stage 2
    and changes it in stage 1. Exact with ONE layer, where a token's K/V depend on that token
    alone; from two layers on the block reaches later tokens through the memento's K/V,
    computed while the block was visible: the paper's implicit channel (§6.2), asserted too."""
    from conftest import tiny_model

    tok = Tokenizer.byte_level()
    rec = toy_task.example(0, 3)
    a = tok.encode(tok.chat_prompt(rec["problem"]) + rec["response"])
    s1 = a.index(tok.token_id("<|block_start|>"))
    e1 = a.index(tok.token_id("<|block_end|>"))
    z1 = a.index(tok.token_id("<|summary_end|>"))
    b = list(a)
    for j in range(s1 + 3, e1):  # new digits inside block 1, same length
        if chr(b[j]).isdigit():
            b[j] = ord(str((int(chr(b[j])) + 3) % 10))
    assert a != b
    one, two = tiny_model(layers=1), tiny_model(layers=2)
    for model, stage, same in ((one, 2, True), (one, 1, False), (two, 1, False), (two, 2, False)):
        la, lb = _losses(model, tok, a, stage), _losses(model, tok, b, stage)
        after = (la[z1:] - lb[z1:]).abs().max().item()  # queries from <|summary_end|> on
        assert (after == 0.0) if same else (after > 1e-4), (stage, after)
        assert (la[s1:e1] - lb[s1:e1]).abs().max() > 1e-4  # inside the block it matters either way
    # two layers, stage 2: only the memento tokens' K/V carry the change. Removing their
    # dependence (restart mode, generate.py) is what the restart ablation measures.


def test_prompt_tokens_carry_no_loss_and_malformed_traces_are_counted():
    tok = Tokenizer.byte_level()
    good = toy_task.example(1, 0)
    bad = [
        {"problem": "p", "response": "<think>\n<|block_start|>no end</think>x"},
        {"problem": "p", "response": "<think>\n<|block_start|>a<|block_end|></think>x"},
        {"problem": "p", "response": "<think>\n<|summary_end|><|block_start|>a<|block_end|><|summary_start|>m<|summary_end|></think>x"},
        {"problem": "p", "response": "no blocks at all"},
        {"problem": "p"},
        {"response": good["response"]},
    ]
    ex, report = openmementos.tokenize([good] + bad, tok, 4096)
    assert report["kept"] == 1 and report["skipped"] == len(bad)
    assert sorted(i for where in report["reasons"].values() for i in where) == list(range(1, len(bad) + 1))
    n_prompt = len(tok.prompt_ids(good["problem"]))
    e = ex[0]
    assert e.labels[:n_prompt] == [-100] * n_prompt
    assert e.labels[n_prompt:] == e.input_ids[n_prompt:] and e.input_ids[-1] == tok.token_id("<|im_end|>")
    ids, labels = openmementos.collate(ex + ex[:0], pad_id=tok.token_id("<|endoftext|>"))
    from conftest import tiny_model

    with torch.no_grad():
        losses = tiny_model()(ids, labels=labels)
    assert (losses[0, :n_prompt - 1] == 0).all() and (losses[0, n_prompt - 1:] > 0).all()


def test_checkpoint_round_trip_atomic_and_resume(tmp_path, monkeypatch):
    common = ["--max-steps", "6", "--batch-size", "4", "--save-every", "3"]
    _, straight = _train(tmp_path, 1, *common, name="straight")
    assert [d.name for d in run_checkpoints(straight)] == ["step-000003", "step-000006"]
    assert (straight / "latest").resolve() == (straight / "step-000006").resolve()
    # round trip: the saved checkpoint reproduces the logits of the saved weights
    m = Qwen3.from_pretrained(straight)
    ids = torch.tensor([Tokenizer.from_dir(local_checkpoint(straight)).encode("<|im_start|>user\nsum 3 blocks from 1")])
    before = m(ids)
    m.save_pretrained(tmp_path / "copy")
    assert torch.equal(Qwen3.from_pretrained(tmp_path / "copy")(ids), before)
    # an interrupted run (killed right after its step-3 checkpoint), then --resume: bitwise equal
    killed_after("step-000003", lambda: _train(tmp_path, 1, *common, name="resumed"))
    assert json.loads((tmp_path / "resumed" / "step-000003" / "training_state.json").read_text())["step"] == 3
    _train(tmp_path, 1, *common, "--resume", name="resumed")
    a, b = Qwen3.from_pretrained(straight).state_dict(), Qwen3.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log_b] == [1, 2, 3, 4, 5, 6] and [e["loss"] for e in log_a] == [e["loss"] for e in log_b]
    # a save interrupted midway leaves the run as it was, and no temp dir behind
    snapshot = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "resumed").rglob("*"))

    def boom(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(Tokenizer, "save", boom)
    model = Qwen3.from_pretrained(tmp_path / "resumed")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(OSError):
        training.save_checkpoint(str(tmp_path / "resumed"), model, Tokenizer.byte_level(), *full_state(model, opt), 99,
                                  sft.parse_args(["--stage", "1"]), [])
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "resumed").rglob("*")) == snapshot


def test_torchrun_two_processes_match_one(tmp_path):
    common = ["--stage", "1", "--max-steps", "4", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train_sft.py", *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                          "train_sft.py", *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    log1 = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    log2 = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(log1) == len(log2) == 4
    for x, y in zip(log1, log2):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)


def test_both_stages_on_real_traces(tmp_path, shared_data):
    data = str(shared_data / "memento_traces.jsonl")
    common = ["--data", data, "--max-steps", "2", "--max-seq-len", "3000", "--batch-size", "2"]
    m1, out1 = _train(tmp_path, 1, *common)
    m2, _ = _train(tmp_path, 2, *common, "--init-from", str(out1))
    assert m1["steps"] == m2["steps"] == 2 and all(e["loss"] > 0 for e in m1["log"] + m2["log"])


def test_checker_accepts_solutions_and_rejects_mistakes():
    import random

    rng = random.Random(0)
    for _ in range(50):
        prob = toy_task.sample_problem(rng)
        text, digits = toy_task.solve(prob, rng)
        assert toy_task.parse_prompt(prob.prompt) == prob
        assert toy_task.check_trace(prob, text + "<|im_end|>")["correct"]
        total = (prob.start + sum(map(sum, digits))) % 10
        assert text.endswith(f"\n{total}")
        assert not toy_task.check_trace(prob, text[:-1] + str((total + 1) % 10))["correct"]
        assert not toy_task.check_trace(toy_task.Problem(prob.blocks + 1, prob.start), text)["correct"]
        i = text.index("=") + 1  # corrupt memento 1's sum
        assert not toy_task.check_trace(prob, text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])["correct"]
