"""train_sft.py --fsdp: FSDP2 on the CPU (gloo, 2 processes) against one process, paper §A.2.1."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port
from safetensors.torch import load_file

import sft
from checkpoint import LATEST, local_checkpoint, run_checkpoints
from data import toy_task
from model import Qwen3

TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--no-progress", "--eval-samples", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HOLDS = re.compile(r"rank (\d): holds ([\d,]+) bytes of parameters and ([\d,]+) bytes of optimizer state")


def single(*args):
    r = subprocess.run([sys.executable, "train_sft.py", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def torchrun(*args, port):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                        "train_sft.py", *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def holds(stdout: str) -> dict[int, tuple[int, int]]:
    return {int(m[0]): (int(m[1].replace(",", "")), int(m[2].replace(",", ""))) for m in HOLDS.findall(stdout)}


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return load_file(local_checkpoint(run) / "model.safetensors")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("s1") / "stage1"
    single("--stage", "1", "--max-steps", "2", "--batch-size", "4", *TINY, "--out", out)
    return out


@pytest.fixture(scope="module")
def runs(stage1, tmp_path_factory):
    """5 (then 6) steps of stage 2: one process with batch 4, and two FSDP processes with
    batch 2 each (the same global batch), gradient checkpointing on in the sharded run."""
    d = tmp_path_factory.mktemp("s2")
    common = ["--stage", "2", "--init-from", stage1, *TINY, "--save-every", "3", "--keep-checkpoints", "3"]
    one = single(*common, "--max-steps", "6", "--batch-size", "4", "--out", d / "one")
    two = torchrun(*common, "--max-steps", "6", "--batch-size", "2", "--fsdp", "--gradient-checkpointing",
                   "--out", d / "two", port=free_port())
    return d, one, two


def test_fsdp_matches_one_process(runs):
    d, _, two = runs
    a, b = losses(d / "one"), losses(d / "two")
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    wa, wb = weights(d / "one"), weights(d / "two")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    assert "global batch 4" in two.stdout and "sharded with FSDP2" in two.stdout


def test_sharding_is_real(runs):
    """Each rank holds about half of the parameter and AdamW bytes of the single process."""
    _, one, two = runs
    (p1, s1), = holds(one.stdout).values()
    per_rank = holds(two.stdout)
    assert set(per_rank) == {0, 1}
    for p, s in per_rank.values():
        assert 0.4 < p / p1 < 0.6 and 0.4 < s / s1 < 0.6, (p, s, p1, s1)
    assert sum(p for p, _ in per_rank.values()) >= p1  # shards cover everything (FSDP pads dim 0)


def test_sharded_checkpoint_loads_in_transformers(runs):
    transformers = pytest.importorskip("transformers")
    d, _, _ = runs
    ckpt = d / "two" / LATEST
    ids = torch.randint(0, 272, (2, 40), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = Qwen3.from_pretrained(local_checkpoint(d / "one"), dtype=torch.float32, device="cpu").eval()
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_fsdp_resume_after_3_of_6_steps_is_exact(runs, stage1):
    d, _, _ = runs
    half = d / "half"
    half.mkdir()
    step3 = [c for c in run_checkpoints(d / "two") if c.name.endswith("000003")][0]
    shutil.copytree(step3, half / step3.name)
    (half / LATEST).symlink_to(step3.name)
    lines = (d / "two" / "metrics.jsonl").read_text().splitlines()[:3]
    (half / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    common = ["--stage", "2", "--init-from", stage1, *TINY, "--save-every", "3", "--keep-checkpoints", "3",
              "--max-steps", "6", "--batch-size", "2", "--fsdp", "--gradient-checkpointing", "--out", half]
    torchrun(*common, "--resume", port=free_port())
    wa, wb = weights(d / "two"), weights(half)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) == 0.0
    assert losses(half) == losses(d / "two")
    # the same run in one process changes the data split: refused with one line
    alone = [a for a in map(str, common) if a != "--fsdp"]
    r = subprocess.run([sys.executable, "train_sft.py", *alone, "--resume"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "--world-size (saved 2, now 1)" in r.stderr and "Traceback" not in r.stderr


def test_fsdp_validation_loss_with_uneven_shares_equals_one_process(stage1, tmp_path):
    """5 held-out examples on 2 sharded processes (3 and 2: the short one pads with a weight-0
    forward, as every process must join each gather) give one process's validation loss."""
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(toy_task.example(0, i)) + "\n" for i in range(23)))
    common = ["--stage", "2", "--init-from", stage1, "--data", data, "--val-frac", "0.2", "--val-every", "1",
              "--max-steps", "2", "--max-seq-len", "512", "--no-progress"]
    one = single(*common, "--batch-size", "4", "--out", tmp_path / "one")
    two = torchrun(*common, "--batch-size", "2", "--fsdp", "--out", tmp_path / "two", port=free_port())
    assert "validation: 5 examples" in one.stdout and "validation: 5 examples" in two.stdout
    va = [json.loads(x)["val_loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    vb = [json.loads(x)["val_loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(va) == len(vb) == 2 and max(abs(x - y) for x, y in zip(va, vb)) <= 1e-5


@pytest.mark.parametrize("args, message", [
    (["--fsdp"], "--fsdp shards over processes: launch with torchrun"),
    (["--cpu-offload"], "--cpu-offload offloads FSDP shards: add --fsdp"),
])
def test_fsdp_bad_input_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        sft.parse_args(["--stage", "1", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
