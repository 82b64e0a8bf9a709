"""This engine against Hugging Face transformers' `generate`, same weights, static batch (paper §6.1).

    python bench/bench_hf.py [--batch-sizes 1,16,64] [--prompt-len 64] [--new-tokens 64] [--rounds 3]
    python bench/bench_hf.py --small          # tiny sizes: a smoke check in a few seconds

A random fp32 Qwen3 (default: 4 layers, hidden 512, MLP 1536, 8 query / 2 KV heads of 64, tied
embeddings, the byte-level tokenizer's 265 ids) is saved with `Qwen3.save_pretrained` to a
temporary directory and loaded back by `transformers.Qwen3ForCausalLM.from_pretrained`; before
anything is timed the two models' logits on one input must agree within 1e-4 (the max-abs
difference is printed). Then, for each batch size B, B random prompts of the same length
(byte tokens, no special token) are generated with greedy decoding, exactly N new tokens each:

    HF:     model.generate(input_ids, attention_mask, max_new_tokens=N, min_new_tokens=N,
                           do_sample=False)                       (its default cache)
    engine: engine.generate(..., EngineConfig(mode="full", max_num_seqs=B,
                           max_num_batched_tokens=B * prompt_len, unbounded_kv_cache=True),
                           SamplingParams(temperature=0, max_tokens=N, ignore_eos=True))

so both prefill the whole batch in one forward and then decode B rows one token per step, and
the engine compacts nothing (the full-cache baseline of the paper's Table 1). The saved config
has no eos_token_id, so HF's min_new_tokens masks nothing and the two decode the same argmax.

The figures: tokens per second = B x N generated tokens / wall seconds of the whole call
(prefill included), median over --rounds rounds. Rounds are interleaved: each round runs
every batch size, HF and the engine back to back, alternating which goes first from round to
round; one untimed warm-up of both runs first. The ratio engine / HF is taken per round and
printed as median (min-max). "rows equal" counts the rows whose N greedy tokens are the same
in both: on a random model the top two logits can be closer than the float differences
between the two implementations (different matmul shapes, SDPA with a mask vs causal), so a
row may diverge after a near-tie. It is reported, not asserted. Nothing here is a GPU figure.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import EngineConfig, Mode, generate  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402
from sampling import SamplingParams  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

LOGITS_TOL = 1e-4


def bench_model(tok: Tokenizer, hidden: int = 512, layers: int = 4, heads: int = 8, kv_heads: int = 2,
                intermediate: int | None = None, seed: int = 0) -> Qwen3:
    """A random fp32 Qwen3 (init_weights, N(0, 0.02)) of this shape, head_dim = hidden / heads,
    MLP width `intermediate` (default 3 x hidden), tied embeddings, and exactly the tokenizer's
    vocabulary: the engine never samples an id beyond it, HF would, so a padded embedding would
    make greedy tokens differ for a reason that is not numerics."""
    cfg = Qwen3Config(vocab_size=tok.n_vocab, hidden_size=hidden, intermediate_size=intermediate or 3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=40960, tie_word_embeddings=True)
    return Qwen3(cfg).init_weights(seed=seed).eval()


def describe(model: Qwen3) -> str:
    """One line naming the model's shape."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (f"random Qwen3, {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}, "
            f"{c.num_attention_heads} q / {c.num_key_value_heads} kv heads of {c.head_dim}, vocab {c.vocab_size}, "
            f"tied, {n / 1e6:.1f}M parameters, fp32")


def load_hf(model: Qwen3, directory: str | os.PathLike) -> Qwen3ForCausalLM:
    """Save `model` with save_pretrained into `directory` and load it with HF transformers (fp32, eval)."""
    model.save_pretrained(directory)
    transformers.utils.logging.disable_progress_bar()
    return Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@torch.no_grad()
def logits_max_diff(model: Qwen3, hf: Qwen3ForCausalLM, ids: torch.Tensor) -> float:
    """Max |logits| difference between this model and HF's on input ids [B, T] (every position)."""
    return float((model(ids) - hf(input_ids=ids).logits.float()).abs().max())


@torch.no_grad()
def run_hf(hf: Qwen3ForCausalLM, prompts: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """HF generate, greedy, exactly new_tokens per row: (wall seconds, generated ids [B, N])."""
    mask = torch.ones_like(prompts)
    t0 = time.perf_counter()
    out = hf.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False)
    dt = time.perf_counter() - t0
    return dt, out[:, prompts.shape[1]:]


def run_engine(model: Qwen3, tok: Tokenizer, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    """engine.generate in full-cache mode, the whole batch prefilled in one step, greedy,
    ignore_eos, exactly new_tokens per row: (wall seconds, generated ids per row)."""
    B, P = prompts.shape
    config = EngineConfig(mode=Mode.FULL, max_num_seqs=B, max_num_batched_tokens=max(B * P, B),
                          unbounded_kv_cache=True)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    rows = prompts.tolist()
    t0 = time.perf_counter()
    seqs, _ = generate(model, tok, rows, config, params)
    dt = time.perf_counter() - t0
    return dt, [s.tokens for s in seqs]


def rows_equal(hf_ids: torch.Tensor, engine_ids: list[list[int]]) -> int:
    """Rows whose generated tokens are identical in both."""
    return sum(a == b for a, b in zip(hf_ids.tolist(), engine_ids))


def bench(model: Qwen3, hf: Qwen3ForCausalLM, tok: Tokenizer, batch_sizes: list[int], prompt_len: int,
          new_tokens: int, rounds: int, seed: int = 0) -> dict[int, dict]:
    """Interleaved rounds over all batch sizes (HF and engine alternate going first by round);
    per batch size the per-round tok/s of each, engine/HF ratios and rows equal."""
    g = torch.Generator().manual_seed(seed)
    prompts = {B: torch.randint(0, 256, (B, prompt_len), generator=g) for B in batch_sizes}
    res = {B: {"hf": [], "engine": [], "ratio": [], "equal": []} for B in batch_sizes}
    warm = prompts[batch_sizes[0]]
    run_hf(hf, warm, min(4, new_tokens))
    run_engine(model, tok, warm, min(4, new_tokens))
    for r in range(rounds):
        for B in batch_sizes:
            order = ("hf", "engine") if r % 2 == 0 else ("engine", "hf")
            got = {}
            for who in order:
                if who == "hf":
                    got["hf"] = run_hf(hf, prompts[B], new_tokens)
                else:
                    got["engine"] = run_engine(model, tok, prompts[B], new_tokens)
            n = B * new_tokens
            if got["hf"][1].shape != (B, new_tokens) or any(len(t) != new_tokens for t in got["engine"][1]):
                raise SystemExit(f"B={B}: a row did not get exactly {new_tokens} new tokens; tok/s would be wrong")
            hf_tps, eng_tps = n / got["hf"][0], n / got["engine"][0]
            res[B]["hf"].append(hf_tps)
            res[B]["engine"].append(eng_tps)
            res[B]["ratio"].append(eng_tps / hf_tps)
            res[B]["equal"].append(rows_equal(got["hf"][1], got["engine"][1]))
            print(f"  round {r + 1} B={B:<4} first {order[0]:<6} HF {hf_tps:9.1f} tok/s   engine {eng_tps:9.1f} tok/s"
                  f"   rows equal {res[B]['equal'][-1]}/{B}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; HF and engine alternate going first")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 3 x hidden)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="tiny sizes, a smoke check in a few seconds")
    args = ap.parse_args(argv)
    if args.small:
        args.batch_sizes, args.prompt_len, args.new_tokens, args.rounds = "1,4", 8, 8, 2
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 2, 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"# python bench/bench_hf.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    tok = Tokenizer.byte_level()
    model = bench_model(tok, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.seed)
    print(f"model: {describe(model)}")
    with tempfile.TemporaryDirectory() as d:
        hf = load_hf(model, d)
    probe = torch.randint(0, 256, (2, args.prompt_len), generator=torch.Generator().manual_seed(args.seed + 1))
    diff = logits_max_diff(model, hf, probe)
    print(f"logits, this model vs HF Qwen3ForCausalLM on [2, {args.prompt_len}] random ids: max |diff| {diff:.2e} "
          f"(tolerance {LOGITS_TOL:g})")
    if not diff <= LOGITS_TOL:
        raise SystemExit(f"logits differ by {diff:.2e} > {LOGITS_TOL:g}: the two models are not the same; nothing timed")
    print(f"workload: static batch of B random {args.prompt_len}-token prompts, {args.new_tokens} new tokens each, "
          "greedy, every row exactly that many tokens; engine: full cache, whole batch prefilled in one step, "
          "unbounded KV pool; HF: generate with its default cache")
    print(f"tok/s = B x {args.new_tokens} generated tokens / wall seconds of the call (prefill included); "
          f"{args.rounds} interleaved rounds after one warm-up")
    t0 = time.perf_counter()
    res = bench(model, hf, tok, batch_sizes, args.prompt_len, args.new_tokens, args.rounds, args.seed)
    print()
    print(f"{'B':>4} {'HF tok/s':>10} {'engine tok/s':>13} {'engine/HF median (min-max)':>28} {'rows equal (per round)':>24}")
    for B in batch_sizes:
        x = res[B]
        eq = x["equal"]
        eq_s = f"{eq[0]}/{B}" if len(set(eq)) == 1 else ", ".join(f"{e}/{B}" for e in eq)
        print(f"{B:>4} {statistics.median(x['hf']):>10.1f} {statistics.median(x['engine']):>13.1f} "
              f"{statistics.median(x['ratio']):>14.2f}x ({min(x['ratio']):.2f}-{max(x['ratio']):.2f}) {eq_s:>24}")
    print(f"wall {time.perf_counter() - t0:.0f} s (timed part)")


if __name__ == "__main__":
    main()
