"""Shared test fixtures: tiny random Qwen3 checkpoints made by HF transformers, and paths."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter; @triton.jit reads this when the
# kernels are defined, so it must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`pytest -n auto`) each worker is one process per core: one torch thread
# each, and the processes tests start inherit one thread too (two torch processes with two
# threads each on two cores run about ten times slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = Path(os.environ.get("MEMENTO_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_hf_config(tied: bool = False, vocab: int = 300, **kw):
    from transformers import Qwen3Config as HFConfig

    args = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                max_position_embeddings=4096, tie_word_embeddings=tied)
    args.update(kw)
    return HFConfig(**args)


def tiny_hf_model(tied: bool = False, seed: int = 0, **kw):
    """A Qwen3ForCausalLM with random weights (norm weights randomized too, so they matter)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    m = Qwen3ForCausalLM(tiny_hf_config(tied, **kw)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return m


def require_shared_data() -> Path:
    """The folder of the real sample traces (memento_traces.jsonl, raw_cot_trace.jsonl, from the
    official Memento release; read there, never copied into the repository). Missing: the test
    is skipped with how to get them, except under CI=true, where it fails."""
    if (SHARED_DATA / "memento_traces.jsonl").is_file() and (SHARED_DATA / "raw_cot_trace.jsonl").is_file():
        return SHARED_DATA
    msg = (f"sample traces not found in {SHARED_DATA}: set MEMENTO_SHARED_DATA to the folder holding the official "
           "Memento release's memento_traces.jsonl and raw_cot_trace.jsonl")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def shared_data():
    return require_shared_data()


def tiny_model(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, vocab=272, seed=0, std=0.15):
    """A random Qwen3 of our own (byte-level vocab), big enough for masks to matter."""
    from model import Qwen3, Qwen3Config

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=10000.0)
    return Qwen3(cfg).init_weights(std=std, seed=seed).eval()


def memento_text(rng, n_blocks=3, end_mid_block=False, block_len=(3, 12), memento_len=(2, 6)):
    """A memento-formatted response (paper §3 format) with random lowercase content."""
    import string

    def words(lo, hi):
        return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(rng.randint(lo, hi)))

    out = "<think>\n"
    for _ in range(n_blocks):
        out += f"<|block_start|>{words(*block_len)}<|block_end|>\n<|summary_start|>{words(*memento_len)}<|summary_end|>\n"
    if end_mid_block:
        return out + "<|block_start|>" + words(*block_len)
    return out + "</think>\n" + words(2, 6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 1-layer random Qwen3 (tiny_model) saved with the byte-level tokenizer: a checkpoint
    directory for the command-line tests."""
    from tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("ckpt")
    tiny_model(layers=1).save_pretrained(d)
    Tokenizer.byte_level().save(d)
    return d


def run_generate(*args):
    """`python generate.py ARGS` from the repository root; the CompletedProcess (text)."""
    import subprocess

    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def killed_after(checkpoint: str, fn, *args):
    """Run fn(*args) as if the process were killed right after training.save_checkpoint wrote
    `checkpoint` (a step directory name): that call raises KeyboardInterrupt once the checkpoint
    is complete, as a kill between two steps would. The real function is restored after."""
    import training

    real = training.save_checkpoint

    def save_then_die(*a, **kw):
        path = real(*a, **kw)
        if path.name == checkpoint:
            raise KeyboardInterrupt
        return path

    training.save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            fn(*args)
    finally:
        training.save_checkpoint = real


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torchrun's --master_port and test
    servers: tests run in parallel under pytest-xdist, so fixed ports could collide)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOY_POLICY_ARGS = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--no-progress",
                   "--eval-samples", "0"]


@pytest.fixture(scope="session")
def toy_policy(tmp_path_factory):
    """A small model trained briefly on the embedded task's format (stage 1, 150 steps of 16),
    so that its samples hold several completed blocks and mementos: a training run directory.
    Trained once per test run: under pytest-xdist the workers share one directory, and the
    first to get the lock trains (the others wait for it), as pytest-xdist's docs suggest."""
    import sft
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    out = root / "toy_policy" / "stage1"
    with FileLock(str(root / "toy_policy.lock")):
        if not (out / "latest").exists():
            sft.train(sft.parse_args(["--stage", "1", "--max-steps", "150", "--batch-size", "16", *TOY_POLICY_ARGS,
                                      "--out", str(out)]))
    return out
