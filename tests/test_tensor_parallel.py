"""Tensor parallelism (sharding.tensor_parallel, paper §6.1 serving) against one process.

Two gloo processes split a tiny random Qwen3 (4 KV heads: 2 each) with torch.distributed's
ColwiseParallel / RowwiseParallel and run, through the engine, teacher-forced memento traces
(compaction), restart mode (recomputation), greedy sampling and a pool too small for all the
requests (preemption). Every logit must equal the single process's within 1e-4 (fp32; the
all-reduce sums the heads in another order), and the tokens, KV curves and preemptions must be
the same; each process's pool holds half the KV heads, half the bytes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tp_workload
from conftest import REPO, free_port


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tp") / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "tests/tp_worker.py", str(prefix)], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ranks = [json.loads((prefix.parent / f"out.rank{i}.json").read_text()) for i in range(2)]
    with torch.no_grad():
        one = tp_workload.run(tp_workload.model())
    return one, ranks


def test_two_processes_equal_one(results):
    one, ranks = results
    assert one["engine_preemptions"] > 0 and any(one["preemptions"])  # the pool really preempted
    for r in ranks:
        assert r["tokens"] == one["tokens"] and r["curves"] == one["curves"] and r["stop"] == one["stop"]
        assert r["preemptions"] == one["preemptions"]
        for a, b in zip(r["logits"], one["logits"]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)
    assert [r["tp_rank"] for r in ranks] == [0, 1] and {(r["dp_rank"], r["dp_size"]) for r in ranks} == {(0, 1)}


def test_each_process_holds_half_the_kv_heads(results):
    one, ranks = results
    for r in ranks:
        assert r["kv_heads"] == one["kv_heads"] // 2 == 2
        assert r["pool_bytes"] * 2 == one["pool_bytes"]


def test_serve_with_two_processes_answers_as_one(tmp_path):
    """serve.py --tensor-parallel-size 2 under torchrun (gloo): the first process serves HTTP
    and broadcasts the engine calls, the second replays them; a greedy completion through a
    block the engine evicts, JSON and streamed, equals the single-process engine's."""
    import signal
    import time

    import httpx

    from engine import Engine, EngineConfig
    from model import Qwen3

    ckpt = tmp_path / "ckpt"
    tp_workload.model().save_pretrained(ckpt)
    tp_workload.TOK.save(ckpt)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "serve.py", "--checkpoint", str(ckpt), "--port", str(port),
                             "--tensor-parallel-size", "2", "--device", "cpu", "--kv-cache-tokens", "512",
                             "--uvicorn-log-level", "warning"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    prompt = "<|im_start|>user\nadd<|im_end|>\n<|im_start|>assistant\n<think>\n<|block_start|>three and four" \
             "<|block_end|>\n<|summary_start|>7<|summary_end|>\n"
    body = {"model": "ckpt", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, open(tmp_path / "serve.log").read()[-3000:]
            time.sleep(0.2)
        got = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert "choices" in got, got
        streamed = ""
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    streamed += json.loads(line[6:])["choices"][0]["text"] if json.loads(line[6:])["choices"] else ""
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
    model = Qwen3.from_pretrained(ckpt).eval()
    eng = Engine(model, tp_workload.TOK, EngineConfig(kv_cache_tokens=512))
    from sampling import SamplingParams
    s = eng.add(tp_workload.TOK.encode(prompt), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    eng.run()
    assert got["choices"][0]["text"] == s.text == streamed
    assert got["usage"]["memento"]["blocks_evicted"] == 1


def test_bad_tensor_parallel_settings_get_one_line(monkeypatch, checkpoint):
    """A size that does not divide the KV heads, a world size not a multiple of it, no torchrun,
    no backend: one line each (ValueError, or the script's exit message)."""
    import sharding

    with pytest.raises(ValueError, match="--tensor-parallel-size 3 must divide the model's 4 KV heads"):
        sharding.tensor_parallel(tp_workload.model(), sharding.TensorParallel(size=3))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="the world size 2 is not a multiple of the tensor-parallel size 3"):
        sharding.data_parallel_rank_size(3)
    monkeypatch.setattr(sharding.dist, "is_gloo_available", lambda: False)
    with pytest.raises(ValueError, match="needs the gloo backend, which this torch build lacks"):
        sharding.setup_data_parallel("cpu", 2)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="--tensor-parallel-size 2 needs torchrun"):
        sharding.setup_data_parallel("cpu", 2)
    r = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(checkpoint), "--data", "toy", "--toy-problems",
                        "1", "--n-samples", "1", "--tensor-parallel-size", "2", "--device", "cpu"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "eval.py: --tensor-parallel-size 2 needs torchrun: torchrun --nproc_per_node 2 ..."], r.stderr


def test_eval_with_two_tensor_parallel_processes_writes_the_records_of_one(toy_policy, tmp_path):
    """eval.py --tensor-parallel-size 2 on 2 processes (one engine: only the first process
    writes) gives the single process's records (greedy, the trained toy policy with 2 KV heads)."""
    import eval as ev
    from checkpoint import local_checkpoint

    ckpt = local_checkpoint(toy_policy)
    common = ["--data", "toy", "--toy-problems", "3", "--n-samples", "1", "--modes", "memento,full", "--temperature",
              "0", "--max-new-tokens", "100", "--no-progress", "--checkpoint", str(ckpt)]
    ev.main([*common, "--out", str(tmp_path / "one.jsonl")])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "eval.py", *common, "--tensor-parallel-size", "2", "--out",
                        str(tmp_path / "tp.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    def records(name):
        recs = [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
        return sorted(({k: v for k, v in x.items() if k != "metrics"} for x in recs),
                      key=lambda x: (x["problem"], x["mode"], x["sample"]))

    assert records("tp.jsonl") == records("one.jsonl") and len(records("one.jsonl")) == 6
    assert not ev.part_files(tmp_path / "tp.jsonl")
