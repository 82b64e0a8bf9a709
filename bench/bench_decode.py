"""Decode speed and KV memory with memento compaction vs a full cache (paper §6.1, §A.3).

    python bench/bench_decode.py [--tokens 8192] [--json]

Teacher-forces one long memento-structured sequence (prompt ~200 tokens, blocks ~1,150,
mementos ~194, as in OpenMementos) token by token through engine.generate, once with
compaction and once with --no-compaction, on a small random Qwen3, and prints decode tokens/s
and peak KV for both, as ratios measured in the same run. Then replays the two sample traces
(../shared/data/memento_traces.jsonl, byte-level tokenizer) and prints their KV figures.
Token-by-token here means one forward per token (replay_chunk=1), i.e. real decoding cost.
"""
import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import EngineConfig, generate  # noqa: E402
from blocks import MementoConfig  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def structured_sequence(tok, n_tokens, seed=0, prompt=200, block=1150, memento=194):
    """Prompt ids and a response of about n_tokens: blocks and mementos of random bytes."""
    rng = random.Random(seed)
    text = lambda n: bytes(rng.randrange(97, 123) for _ in range(n)).decode()
    ids = tok.prompt_ids(text(prompt))
    resp = tok.encode("<think>\n")
    while len(resp) < n_tokens:
        resp += tok.encode(f"<|block_start|>{text(block)}<|block_end|>\n<|summary_start|>{text(memento)}<|summary_end|>\n")
    return ids, resp[:n_tokens]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    tok = Tokenizer.byte_level()
    cfg = Qwen3Config(vocab_size=272, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=args.hidden // 8, max_position_embeddings=40960, tie_word_embeddings=True)
    model = Qwen3(cfg).init_weights(seed=0).eval().to(args.device)
    prompt, resp = structured_sequence(tok, args.tokens)
    records = []
    for compaction in (True, False):
        t0 = time.perf_counter()
        seqs, eng = generate(model, tok, [prompt], EngineConfig(MementoConfig(0), mode="memento" if compaction else "full",
                                                                unbounded_kv_cache=True), forced=[resp])
        dt = time.perf_counter() - t0
        curve = seqs[0].curve
        records.append({"mode": "memento" if compaction else "full cache", "tokens": len(resp), "seconds": dt,
                        "decode_tok_per_s": len(resp) / dt, "peak_kv_tokens": max(curve),
                        "peak_kv_bytes": max(curve) * eng.cache.bytes_per_token, "kv_auc": sum(curve),
                        "peak_pool_bytes": eng.cache.peak_pages * eng.cache.page_size * eng.cache.bytes_per_token})
    mem, full = records
    ratios = {"speedup": mem["decode_tok_per_s"] / full["decode_tok_per_s"],
              "peak_kv_ratio": full["peak_kv_bytes"] / mem["peak_kv_bytes"],
              "kv_auc_ratio": full["kv_auc"] / mem["kv_auc"]}
    traces = []
    shared = Path(os.environ.get("MEMENTO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    f = shared / "memento_traces.jsonl"
    if f.exists():
        for i, line in enumerate(f.read_text().splitlines(), 1):
            d = json.loads(line)
            p, r = tok.prompt_ids(d["problem"]), tok.encode(d["response"])
            seqs, _ = generate(model, tok, [p], EngineConfig(MementoConfig(0), replay_chunk=512), forced=[r])
            c, n = seqs[0].curve, len(p) + len(r)
            traces.append({"trace": f"{f.name}:{i}", "domain": d.get("domain"), "tokens": n, "peak_kv_tokens": max(c),
                           "full_peak_kv_tokens": n, "kv_auc": sum(c), "full_kv_auc": n * (n + 1) // 2})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.device}"
    if args.json:
        print(json.dumps({"machine": machine, "model": cfg.to_dict(), "decode": records, "ratios": ratios, "replay": traces}))
        return
    print(f"machine: {machine}; model: {args.layers} layers, hidden {args.hidden}, 8 q / 2 kv heads, fp32")
    print(f"{'mode':<12}{'tokens':>8}{'tok/s':>10}{'peak KV tok':>13}{'peak KV MiB':>13}{'KV AUC':>14}")
    for r in records:
        print(f"{r['mode']:<12}{r['tokens']:>8}{r['decode_tok_per_s']:>10.1f}{r['peak_kv_tokens']:>13}"
              f"{r['peak_kv_bytes'] / 2**20:>13.2f}{r['kv_auc']:>14,}")
    print(f"memento vs full: decode {ratios['speedup']:.2f}x tokens/s, peak KV {ratios['peak_kv_ratio']:.2f}x smaller, "
          f"KV AUC {ratios['kv_auc_ratio']:.2f}x smaller")
    for t in traces:
        print(f"replay {t['trace']} ({t['domain']}): {t['tokens']} tokens, peak KV {t['peak_kv_tokens']} vs {t['full_peak_kv_tokens']} "
              f"({t['full_peak_kv_tokens'] / t['peak_kv_tokens']:.2f}x), KV AUC {t['full_kv_auc'] / t['kv_auc']:.2f}x smaller")


if __name__ == "__main__":
    main()
