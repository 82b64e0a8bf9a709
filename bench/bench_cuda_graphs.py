"""Decode with and without CUDA graphs on one GPU: the same logits bit for bit, and each one's step time (paper §6.1).

    python bench/bench_cuda_graphs.py                 # CUDA only; bench/gpu_check.sh runs it
    python bench/bench_cuda_graphs.py --quick         # fewer tokens and batch sizes

The same seeded requests (a random Qwen3, bf16, sampled at temperature 1, so that any
difference in the logits would show as a different token sooner or later) run through the
engine with and without decode graphs, in two pairs:

    compile off:  cudagraph_mode "FULL_DECODE_ONLY"  vs  --enforce-eager (no graphs, no compile)
    compile on:   cudagraph_mode "FULL_DECODE_ONLY"  vs  cudagraph_mode "NONE"

Within a pair both run the same kernels on the same padded batch-size buckets with the same
number of KV splits (model_runner.py, cuda_graphs.py), so every logit the sampler sees must be
equal bit for bit (torch.equal on each step's [rows, vocab] logits) and so must the tokens. It
prints, per pair and batch size, whether they are, and the median wall time of a decode step
(every running sequence past its prompt). Exits 1 if anything differs, so gpu_check.sh records
a failure. The step times are measurements of this GPU, nothing more.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blocks import MementoConfig  # noqa: E402
from engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def run(model, tok, batch: int, prompt_len: int, new_tokens: int, **config) -> tuple[list, list, list[float]]:
    """One engine run of `batch` seeded requests: (their tokens, every step's sampled logits
    [rows, V] on the host, wall seconds of each step in which every sequence was decoding)."""
    config = EngineConfig(MementoConfig(0), max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * prompt_len),
                          kv_cache_tokens=batch * (prompt_len + new_tokens + 32), **config)
    eng = Engine(model, tok, config)
    logits = []
    real = eng.runner.sample

    def sample(x, draws):  # what the sampler sees, kept (a copy: the graph's output is overwritten)
        logits.append(x.float().cpu())
        return real(x, draws)
    eng.runner.sample = sample
    g = torch.Generator().manual_seed(0)
    seqs = [eng.add(torch.randint(0, 256, (prompt_len,), generator=g).tolist(),
                    SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=new_tokens, ignore_eos=True, seed=i))
            for i in range(batch)]
    times = []
    while eng.busy:
        decoding = all(s.computed >= len(s.prompt) for s in eng.running) and not eng.waiting
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        if decoding:
            times.append(time.perf_counter() - t0)
    return [s.tokens for s in seqs], logits, times


PAIRS = {"compile off": (dict(compile=False), dict(enforce_eager=True)),
         "compile on": (dict(compile=True), dict(compile=True, cudagraph_mode="NONE"))}


def main() -> int:
    """Run both pairs at every batch size; print a table; 0 if every pair matched bit for bit."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,16,64", help="comma-separated")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="batch sizes 1 and 16, 48 new tokens")
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.new_tokens = "1,16", 48
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_graphs.py: needs a CUDA GPU")
    print(f"# python bench/bench_cuda_graphs.py, {date.today()}, {torch.cuda.get_device_name(0)}, "
          f"torch {torch.__version__}, {platform.machine()}")
    tok = Tokenizer.byte_level()
    cfg = Qwen3Config(vocab_size=10_000, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = Qwen3(cfg).init_weights(seed=0).to("cuda", torch.bfloat16).eval()
    ok = True
    print(f"{'pair':>11} {'batch':>5} {'logits equal':>12} {'tokens equal':>12} {'no graphs ms/step':>17} "
          f"{'graphs ms/step':>14} {'speed-up':>8}")
    for pair, (graphs_cfg, plain_cfg) in PAIRS.items():
        for b in (int(x) for x in args.batch_sizes.split(",")):
            tokens_g, logits_g, t_g = run(model, tok, b, args.prompt_len, args.new_tokens, **graphs_cfg)
            tokens_e, logits_e, t_e = run(model, tok, b, args.prompt_len, args.new_tokens, **plain_cfg)
            same_logits = len(logits_g) == len(logits_e) and all(torch.equal(x, y) for x, y in zip(logits_g, logits_e))
            same_tokens = tokens_g == tokens_e
            ok &= same_logits and same_tokens
            e, g = statistics.median(t_e) * 1e3, statistics.median(t_g) * 1e3
            print(f"{pair:>11} {b:>5} {str(same_logits):>12} {str(same_tokens):>12} {e:>17.3f} {g:>14.3f} {e / g:>7.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
