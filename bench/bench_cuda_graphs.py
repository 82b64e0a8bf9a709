"""Decode with and without CUDA graphs on one GPU: the same tokens, and each one's step time (paper §6.1).

    python bench/bench_cuda_graphs.py                 # CUDA only; bench/gpu_check.sh runs it

The same seeded requests (a random Qwen3, bf16, sampled at temperature 1 so any difference
in the logits shows up as a different token sooner or later) run twice through the engine:
with --enforce-eager and with the decode graphs of cuda_graphs.py. It prints, per batch size,
whether every request got the same tokens, and the median wall time of a decode step (every
running sequence past its prompt) for each. Exits 1 if the tokens differ anywhere, so
gpu_check.sh records a failure. The step times are measurements of this GPU, nothing more.
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


def run(model, tok, batch: int, prompt_len: int, new_tokens: int, eager: bool) -> tuple[list[list[int]], list[float]]:
    """One engine run of `batch` seeded requests; (their tokens, wall seconds of each step in
    which every sequence was decoding)."""
    config = EngineConfig(MementoConfig(0), max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * prompt_len),
                          kv_cache_tokens=batch * (prompt_len + new_tokens + 32), enforce_eager=eager)
    eng = Engine(model, tok, config)
    g = torch.Generator().manual_seed(0)
    # prompt ids within the byte-level tokenizer's (Engine.add refuses ids it cannot decode)
    seqs = [eng.add(torch.randint(0, 256, (prompt_len,), generator=g).tolist(),
                    SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=new_tokens, ignore_eos=True, seed=i))
            for i in range(batch)]
    times = []
    while eng.waiting or eng.running:
        decoding = all(s.computed >= len(s.prompt) for s in eng.running) and not eng.waiting
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        if decoding:
            times.append(time.perf_counter() - t0)
    return [s.tokens for s in seqs], times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,16,64", help="comma-separated")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_graphs.py: needs a CUDA GPU")
    print(f"# python bench/bench_cuda_graphs.py, {date.today()}, {torch.cuda.get_device_name(0)}, "
          f"torch {torch.__version__}, {platform.machine()}")
    tok = Tokenizer.byte_level()
    cfg = Qwen3Config(vocab_size=10_000, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = Qwen3(cfg).init_weights(seed=0).to("cuda", torch.bfloat16).eval()
    ok = True
    print(f"{'batch':>5} {'same tokens':>11} {'eager ms/step':>14} {'graphs ms/step':>15} {'speed-up':>8}")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        eager_tokens, eager_t = run(model, tok, b, args.prompt_len, args.new_tokens, eager=True)
        graph_tokens, graph_t = run(model, tok, b, args.prompt_len, args.new_tokens, eager=False)
        same = eager_tokens == graph_tokens
        ok &= same
        e, g = statistics.median(eager_t) * 1e3, statistics.median(graph_t) * 1e3
        print(f"{b:>5} {str(same):>11} {e:>14.3f} {g:>15.3f} {e / g:>7.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
