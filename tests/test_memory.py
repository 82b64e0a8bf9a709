"""bench/memory.py: the training-memory formula against measured steps and the real model (paper §A.2.1)."""
import subprocess
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import memory  # noqa: E402

from model import Qwen3  # noqa: E402


@pytest.mark.parametrize("name", list(memory.SHAPES))
def test_parameter_counts_match_the_model(name):
    # The formula's count from shapes vs the parameters of a Qwen3 built on the meta device.
    cfg = memory.builtin_config(name)
    with torch.device("meta"):
        model = Qwen3(cfg)
    total, linear = memory.param_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert linear == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_parameter_counts_with_attention_bias():
    from model import Qwen3Config

    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, attention_bias=True)
    with torch.device("meta"):
        model = Qwen3(cfg)
    assert memory.param_counts(cfg)[0] == sum(p.numel() for p in model.parameters())


def test_released_parameter_counts():
    # Published totals: Qwen3-0.6B 0.6B (0.44B without embeddings), Qwen3-8B 8.2B (6.95B).
    n06, _ = memory.param_counts(memory.builtin_config("Qwen3-0.6B"))
    n8, _ = memory.param_counts(memory.builtin_config("Qwen3-8B"))
    assert round(n06 / 1e9, 2) == 0.60 and round((n06 - 151936 * 1024) / 1e9, 2) == 0.44
    assert round(n8 / 1e9, 1) == 8.2 and round((n8 - 2 * 151936 * 4096) / 1e9, 2) == 6.95


TOLERANCE = 0.10  # all seven memory.CHECKS measured within 7.7% at 128 tokens, 3.2% at 256


@pytest.mark.parametrize("case", [memory.CHECKS[0], memory.CHECKS[3], memory.CHECKS[4], memory.CHECKS[5]],
                         ids=lambda c: f"ckpt{c[0]}-{'plain' if c[1] is None else 'chunked'}-{c[2]}-{'tied' if c[3] else 'untied'}")
def test_formula_matches_a_measured_training_step(case):
    """A real micro-step (the Triton kernel under the interpreter, grads present) measured with
    torch's profiler against the formula; the foreach AdamW step's temporaries too."""
    (row,) = memory.check([case], seq_len=128)
    assert abs(row["formula"] / row["measured"] - 1) <= TOLERANCE, row
    assert abs(row["measured_step"] - row["formula_step"]) <= 0.01 * row["formula_step"], row  # + a few norm scalars


def test_chunked_loss_is_what_makes_32k_fit():
    cfg = memory.builtin_config("Qwen3-0.6B")
    chunked = memory.estimate(cfg, seq_len=32768)
    plain = memory.estimate(cfg, seq_len=32768, chunked_loss=False)
    # 32768 x 151936 fp32 logits alone are 18.5 GiB; the plain form holds several such tensors
    assert plain.peak - chunked.peak > 3 * 32768 * 151936 * 4
    assert chunked.peak < 20 * 2**30 < plain.peak
    sharded = memory.estimate(memory.builtin_config("Qwen3-8B"), seq_len=32768, world_size=8)
    assert sharded.weights == memory.estimate(memory.builtin_config("Qwen3-8B"), seq_len=32768).weights // 8


def test_cli(tmp_path):
    r = subprocess.run([sys.executable, "bench/memory.py", "--model", "Qwen3-8B", "--max-seq-len", "8192"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "8,190,735,360 parameters" in r.stdout and "peak" in r.stdout
    r = subprocess.run([sys.executable, "bench/memory.py", "--model", str(tmp_path / "nothing")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "not a built-in shape" in r.stderr


def test_rl_estimate_terms_are_the_direct_arithmetic():
    """rl_estimate's terms for Qwen3-8B on 8 GPUs written out: fp32 weights + AdamW sharded 8
    ways, the bf16 reference sharded, the unsharded bf16 generation copy, the pool's tokens at
    kv_cache.kv_bytes_per_token in bf16, and the training phase = resident + the SFT formula's
    micro-step on top of the weights and AdamW."""
    from kv_cache import kv_bytes_per_token

    cfg = memory.builtin_config("Qwen3-8B")
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen3(cfg).parameters())
    e = memory.rl_estimate(cfg, world_size=8, seq_len=32768, micro_batch_size=1, kv_cache_gib=30)
    assert e.policy == 4 * n // 8 + 8 * n // 8 and e.reference == 2 * n // 8 and e.generation_copy == 2 * n
    assert e.kv_pool == 30 * 2**30 and e.kv_tokens == 30 * 2**30 // kv_bytes_per_token(cfg, torch.bfloat16)
    sft_step = memory.estimate(cfg, seq_len=32768, world_size=8)
    assert e.training == e.policy + e.reference + e.generation_copy + sft_step.peak - sft_step.weights - sft_step.adamw
    assert e.rollouts_per_rank == 240 and e.peak == max(e.rollouts, e.training)
    ddp = memory.rl_estimate(cfg, world_size=8, fsdp=False, kv_cache_gib=30)
    assert ddp.generation_copy == 0 and ddp.reference == 2 * n and ddp.peak > 80 * 10**9  # why the docs use --fsdp


def test_the_documented_multi_gpu_rl_command_fits_80_gb(monkeypatch):
    """docs/rl.md's torchrun command, parsed by train_rl's own parser, on 8 x 80 GB: its RL step
    (rollouts with the engine's default pool, then training) fits per rl_estimate; without
    --micro-batch-size (64 rollouts per forward) it would not."""
    import shlex

    import train_rl

    text = (REPO / "docs" / "rl.md").read_text()
    cmd = next(block for block in text.replace("\\\n", " ").splitlines() if block.lstrip().startswith("torchrun"))
    words = shlex.split(cmd.split("#")[0])
    nproc = int(words[words.index("--nproc_per_node") + 1]) * int(dict(zip(words, words[1:])).get("--nnodes", 1))
    monkeypatch.setenv("WORLD_SIZE", str(nproc))
    args = train_rl.parse_args(words[words.index("train_rl.py") + 1:])
    assert nproc == 8 and args.fsdp
    kw = dict(world_size=nproc, fsdp=args.fsdp, seq_len=args.max_new_tokens + 1024, prompts_per_step=args.prompts_per_step,
              group_size=args.group_size, kv_cache_gib=args.kv_cache_gib, gpu_memory_utilization=args.gpu_memory_utilization)
    cfg = memory.builtin_config("Qwen3-8B")
    e = memory.rl_estimate(cfg, micro_batch_size=args.micro_batch_size, **kw)
    assert e.peak <= 80 * 10**9 and e.full_traces_at_once >= 4, e
    assert memory.rl_estimate(cfg, micro_batch_size=64, **kw).peak > 80 * 10**9


def test_the_documented_32b_tensor_parallel_command_fits_80_gb():
    """docs/evaluation.md's Qwen3-32B command (torchrun 8 processes, --tensor-parallel-size 2),
    parsed by eval.py's own parser: per serve_estimate each of its GPUs of 80 GB holds its
    weights, a step and a pool of several full-cache 32K-token samples; on one GPU per model
    the pool would not hold one."""
    import shlex
    from unittest import mock

    import eval as eval_cli

    text = (REPO / "docs" / "evaluation.md").read_text()
    cmd = next(line for line in text.replace("\\\n", " ").splitlines() if "--tensor-parallel-size" in line
               and line.lstrip().startswith("torchrun"))
    words = shlex.split(cmd)
    nproc = int(words[words.index("--nproc_per_node") + 1])
    seen = {}
    with mock.patch.object(eval_cli, "evaluate", lambda ap, args, *a, **kw: seen.update(args=args)), \
            mock.patch.object(eval_cli, "setup_data_parallel", lambda *a, **kw: eval_cli.DataParallel()):
        eval_cli.main(words[words.index("eval.py") + 1:])
    args = seen["args"]
    assert nproc == 8 and args.tensor_parallel_size == 2 and nproc % args.tensor_parallel_size == 0
    cfg = memory.builtin_config("Qwen3-32B")
    kw = dict(seq_len=args.max_new_tokens + 1024, gpu_memory_utilization=args.gpu_memory_utilization,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    e = memory.serve_estimate(cfg, tensor_parallel_size=args.tensor_parallel_size, **kw)
    assert e.peak <= 80 * 10**9 and e.full_traces_at_once >= 4, e
    assert memory.serve_estimate(cfg, tensor_parallel_size=1, **kw).full_traces_at_once == 0
    # the estimate's weights are the direct arithmetic: half of every layer's projections each
    one = memory.serve_estimate(cfg, tensor_parallel_size=1, kv_cache_gib=1)
    two = memory.serve_estimate(cfg, tensor_parallel_size=2, kv_cache_gib=1)
    whole = 2 * (cfg.vocab_size * cfg.hidden_size * 2 + cfg.num_hidden_layers * (2 * cfg.hidden_size + 2 * cfg.head_dim)
                 + cfg.hidden_size)
    assert abs((one.weights - whole) - 2 * (two.weights - whole)) <= 4 and two.kv_tokens == 2 * one.kv_tokens
