"""Data parallelism under torchrun (paper Table 1, §6.1): eval.py and generate.py on 2 gloo
processes against 1 process (the same records, outputs and summary), resume across world
sizes after a kill, the share rule, and the toy evaluation of an --fsdp training run."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port, memento_text
from hypothesis import given, settings
from hypothesis import strategies as st

import eval as ev
import generate
import sft
import sharding
from checkpoint import local_checkpoint
from model import Qwen3
from tokenizer import Tokenizer
from training import evaluate_toy

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 3 problems x 3 modes x 2 samples = 18 samples of at most 120 tokens
EVAL = ["--data", "toy", "--toy-problems", 3, "--n-samples", 2, "--modes", "memento,full,restart", "--seed", 3,
        "--max-new-tokens", 120, "--no-progress"]


def torchrun(*args, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), *map(str, args)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def key(r):
    return r["problem"], r["mode"], r["sample"]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def comparable(recs):
    """Records in key order without their timings (the only field that differs between runs)."""
    return sorted(({k: v for k, v in r.items() if k != "metrics"} for r in recs), key=key)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A 1-layer model trained briefly on the toy format (stage 1, about 10 s): its samples hold
    blocks and mementos, so the three modes' KV figures differ."""
    out = tmp_path_factory.mktemp("dp") / "stage1"
    sft.train(sft.parse_args(["--stage", "1", "--max-steps", "300", "--batch-size", "16", "--layers", "1", "--hidden",
                              "32", "--heads", "2", "--kv-heads", "1", "--no-progress", "--eval-samples", "0",
                              "--out", str(out)]))
    return local_checkpoint(out)


@pytest.fixture(scope="module")
def one(stage1, tmp_path_factory):
    """The reference: eval.py in one process."""
    out = tmp_path_factory.mktemp("one") / "one.jsonl"
    ev.main([*map(str, EVAL), "--checkpoint", str(stage1), "--out", str(out)])
    recs = lines(out)
    by = {key(r): r for r in recs}
    assert len(by) == 18 and any(r["blocks"] > 0 for r in recs)  # mementos were written, so the modes differ:
    assert any(by[p, "full", k]["peak_kv_tokens"] > by[p, "memento", k]["peak_kv_tokens"] for p, _, k in by)
    return out


def test_eval_on_two_processes_writes_the_records_and_summary_of_one(stage1, one, tmp_path):
    out = tmp_path / "two.jsonl"
    torchrun("eval.py", *EVAL, "--checkpoint", stage1, "--out", out)
    assert comparable(lines(out)) == comparable(lines(one))
    assert not ev.part_files(out)  # merged into --out and deleted
    two = json.loads((tmp_path / "two.summary.json").read_text())
    ref = json.loads(one.with_name("one.summary.json").read_text())
    assert two["summary"] == ref["summary"]
    assert two["generated"]["samples_per_process"] == [9, 9] and two["generated"]["data_parallel_size"] == 2


def test_a_one_process_run_killed_midway_is_finished_by_two(stage1, one, tmp_path):
    """--out holding 11 of the 18 records and a line cut by the kill: two processes generate the
    7 left (4 and 3), keep the earlier lines as they were, and end with one process's records."""
    out = tmp_path / "r.jsonl"
    kept = one.read_text().splitlines()[:11]
    out.write_text("".join(x + "\n" for x in kept) + one.read_text().splitlines()[11][:50])
    shutil.copy(one.with_name("one.config.json"), tmp_path / "r.config.json")
    torchrun("eval.py", *EVAL, "--checkpoint", stage1, "--out", out)
    assert out.read_text().splitlines()[:11] == kept
    recs = lines(out)
    assert len(recs) == len({key(r) for r in recs}) == 18 and comparable(recs) == comparable(lines(one))
    generated = json.loads((tmp_path / "r.summary.json").read_text())["generated"]
    assert generated["samples"] == 7 and generated["samples_per_process"] == [4, 3]


def test_a_two_process_run_killed_midway_is_finished_by_one(stage1, one, tmp_path):
    """Process 1 dies outright after its second record (tests/dp_kill_worker.py) and torchrun
    ends process 0: --out holds process 0's records so far, OUT.rank1.part process 1's two.
    One process then merges the part, generates the rest, and ends with one process's records."""
    out = tmp_path / "k.jsonl"
    r = torchrun("tests/dp_kill_worker.py", *EVAL, "--checkpoint", stage1, "--out", out, ok=False)
    assert r.returncode != 0
    part = ev.part_path(out, 1)
    assert ev.part_files(out) == [part] and len(part.read_text().splitlines()) == 2
    before = len(ev.read_done(out))
    assert before <= 9  # process 0 holds at most its 9
    res = ev.main([*map(str, EVAL), "--checkpoint", str(stage1), "--out", str(out)])
    assert not part.exists() and res["generated"]["samples"] == 18 - before - 2
    recs = lines(out)
    assert len(recs) == len({key(r) for r in recs}) == 18 and comparable(recs) == comparable(lines(one))
    assert res["summary"] == json.loads(one.with_name("one.summary.json").read_text())["summary"]


def test_nothing_left_and_a_refused_rerun_on_two_processes(stage1, one, tmp_path):
    """Nothing left to do: both processes have empty shares, still meet, and the file stays as it
    was. Other settings: process 0 refuses before any work, every process exits, and the reason
    is one line, printed once, with no traceback of ours (torchrun adds its own failure report)."""
    out = tmp_path / "n.jsonl"
    shutil.copy(one, out)
    shutil.copy(one.with_name("one.config.json"), tmp_path / "n.config.json")
    before = out.read_text()
    torchrun("eval.py", *EVAL, "--checkpoint", stage1, "--out", out)
    assert out.read_text() == before
    assert json.loads((tmp_path / "n.summary.json").read_text())["generated"]["samples_per_process"] == [0, 0]
    r = torchrun("eval.py", *EVAL, "--checkpoint", stage1, "--out", out, "--temperature", 1.0, ok=False)
    line = ("eval.py: results in this --out were made with other settings: --temperature (saved 0.6, now 1.0); rerun "
            "with the saved values, or pass --overwrite or another --out")
    assert r.returncode != 0 and r.stderr.count(line) == 1
    assert "eval.py\", line" not in r.stderr and "sharding.py\", line" not in r.stderr
    assert out.read_text() == before and not ev.part_files(out)


def _generate_one(args, capsys) -> str:
    capsys.readouterr()
    generate.main(list(map(str, args)))
    return capsys.readouterr().out


def _without_timings(stdout: str) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "metrics"} for x in stdout.splitlines()]


def test_generate_replay_on_two_processes_gives_one_process_curves(stage1, tmp_path, capsys):
    """Five traces of 2 to 10 blocks, dealt by length: the JSON lines (KV curves and figures, in
    the file's order) are one process's."""
    import random

    rng = random.Random(0)
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"problem": f"sum {3 + i % 4} blocks from {i}",
                                          "response": memento_text(rng, n_blocks=2 + 2 * i)}) + "\n" for i in range(5)))
    args = ["--checkpoint", stage1, "--replay", traces, "--json"]
    ref = _without_timings(_generate_one(args, capsys))
    r = torchrun("generate.py", *args)
    two = _without_timings(r.stdout)
    assert two == ref and [r["name"] for r in two] == [f"{traces}:{i}" for i in range(1, 6)]
    assert "5 requests on 2 engines (data parallel): 3 + 2" in r.stderr  # each generated its share only
    assert all(r["peak_kv_tokens"] < r["full_cache_peak_kv_tokens"] for r in two)  # the curves hold compactions


def test_generate_prompts_file_on_two_processes_prints_one_process_output(stage1, tmp_path, capsys):
    """3 prompts x 2 samples (request i with seed request_seed(seed, i) wherever it runs): the
    printed traces and KV summaries, in order, are one process's."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sum 3 blocks from 1\nsum 5 blocks from 2\nsum 4 blocks from 7\n")
    args = ["--checkpoint", stage1, "--prompts-file", prompts, "--num-samples", 2, "--max-new-tokens", 150]
    ref = _generate_one(args, capsys)
    assert ref.count("--- KV summary") == 6 and "blocks completed" in ref
    two = torchrun("generate.py", *args)
    assert two.stdout == ref and "6 requests on 2 engines (data parallel): 3 + 3" in two.stderr


def test_toy_evaluation_of_an_fsdp_run_decodes_shares_through_the_copy(stage1, tmp_path):
    """training.evaluate_toy as sft.train calls it under --fsdp on 2 processes: each decodes its
    problems only (0, 2, 4 and 1, 3, 5), through the unsharded copy refreshed from the shards,
    and both return one unsharded process's accuracy, reasons and per-problem tokens."""
    out = tmp_path / "toy.json"
    torchrun("tests/dp_toy_eval_worker.py", stage1, 6, 11, out)
    a, b = json.loads(out.read_text())
    assert a["decoded"] == [0, 2, 4] and b["decoded"] == [1, 3, 5]
    model = Qwen3.from_pretrained(stage1).eval()
    ref = evaluate_toy(model, Tokenizer.from_dir(stage1), 6, 11)
    assert a["ev"] == b["ev"] == json.loads(json.dumps(ref))
    assert sum(p["tokens"] for p in ref["per_problem"]) > 6 * 20  # traces, not empty answers


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 40), size=st.integers(1, 4), data=st.data())
def test_shares_partition_the_keys(n, size, data):
    """For world sizes 1 to 4 the ranks' shares partition the keys, each in the keys' order:
    dealt in turn, the counts differ by at most one; dealt by cost, the loads differ by at most
    the largest cost."""
    keys = [("k", i) for i in range(n)]
    cost = data.draw(st.one_of(st.none(), st.lists(st.integers(1, 1000), min_size=n, max_size=n)))
    shares = [sharding.share(keys, r, size, cost) for r in range(size)]
    assert sorted(k for s in shares for k in s) == keys
    assert all(s == sorted(s) for s in shares)
    if cost is None:
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    elif n:
        load = [sum(cost[i] for _, i in s) for s in shares]
        assert max(load) - min(load) <= max(cost)
    assert shares == [sharding.share(keys, r, size, cost) for r in range(size)]  # the same in every process


def test_share_and_rank_size_refuse_bad_input(monkeypatch):
    with pytest.raises(ValueError, match=r"rank 2 of 2"):
        sharding.share([1, 2], 2, 2)
    with pytest.raises(ValueError, match="1 costs for 2 keys"):
        sharding.share([1, 2], 0, 2, [5])
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert sharding.data_parallel_rank_size() == (3, 4) and sharding.data_parallel_rank_size(2) == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match="the world size 6 is not a multiple of the tensor-parallel size 4"):
        sharding.data_parallel_rank_size(4)


def test_more_processes_than_gpus_is_one_line(monkeypatch, capsys):
    """torchrun --nproc_per_node 2 on a node with one GPU: every process stops with one line
    before joining the group (so none waits for the others)."""
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ev, "engine_config", lambda ap, args, mode: None)  # --device cuda passes its check
    with pytest.raises(SystemExit) as e:
        ev.main(["--device", "cuda"])
    assert str(e.value) == ("eval.py: 2 processes on this node but 1 GPU(s): one GPU per process, so "
                            "--nproc_per_node 1 at most")
    assert not torch.distributed.is_initialized()


def test_one_process_needs_no_process_group(monkeypatch):
    """Without torchrun: one process, no group, no store; exchange returns the value itself."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dp = sharding.setup_data_parallel("cpu")
    assert (dp.rank, dp.size, dp.store, dp.lead) == (0, 1, None, True) and not torch.distributed.is_initialized()
    assert sharding.exchange(dp, "x", {"a": 1}) == [{"a": 1}]
