"""Serving throughput with memento compaction vs a full cache: the paper's Fig. 8 at CPU scale (§6.1).

    python bench/bench_serve.py [--requests 32] [--scale 0.03125] [--rounds 3] [--quick]

A workload of R requests whose responses are teacher-forced traces with the OpenMementos shape
(a 200-token prompt, ~9 blocks of ~1,150 tokens each followed by a ~194-token memento, then a
short answer; every length multiplied by --scale so that it runs on a 2-core CPU), served by
engine.Engine through a fixed KV pool that makes the full cache KV-bound. Memento compaction
frees each block's pages when its memento ends, so more sequences fit the same pool and every
decode step (one token per running sequence) serves more of them. For each --max-num-seqs
point and both modes it reports aggregate tokens/s, batch completion time, mean running batch
size, preemptions and peak pool use; the modes run interleaved (memento, full, memento, ...)
for --rounds rounds at the KV-bound point and the median ratio is reported with its spread,
because a shared machine is noisy. Beside it: the ratio of model forwards (a schedule-only
count, what the ratio would be if every forward cost the same), the decode step time against
batch size (how close this CPU is to a GPU's nearly free batching), the same sweep with an
unlimited pool (no KV pressure: the gain should vanish), and fragmentation against page size.
Writes bench/results/serve_cpu.txt and, with matplotlib, serve_cpu.png.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import Engine  # noqa: E402
from kv_cache import PagedKVCache  # noqa: E402
from memento_attention import MementoConfig  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def workload(tok, n: int, scale: float, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n (prompt ids, response ids) pairs shaped like OpenMementos traces, lengths x scale
    (+-25% jitter; random lowercase letters, one byte-level token each)."""
    rng = random.Random(seed)
    text = lambda n_: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(max(1, n_)))  # noqa: E731
    jit = lambda x: round(x * scale * rng.uniform(0.75, 1.25))  # noqa: E731
    out = []
    for _ in range(n):
        resp = "<think>\n" + "".join(f"<|block_start|>{text(jit(1150))}<|block_end|>\n<|summary_start|>{text(jit(194))}"
                                     "<|summary_end|>\n" for _ in range(rng.randint(7, 11)))
        out.append((tok.encode(tok.chat_prompt(text(jit(200)))), tok.encode(resp + "</think>\n" + text(jit(40)))))
    return out


def build_model(hidden: int, layers: int, heads: int, kv_heads: int) -> Qwen3:
    cfg = Qwen3Config(vocab_size=272, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                      max_position_embeddings=40960, tie_word_embeddings=True)
    return Qwen3(cfg).init_weights(seed=0).eval()


@torch.no_grad()
def serve(model, tok, reqs, *, compaction: bool, max_num_seqs: int, kv_cache_tokens: int | None, page_size: int) -> dict:
    """Run the workload through one Engine; returns its figures."""
    eng = Engine(model, tok, MementoConfig(0), compaction=compaction, max_num_seqs=max_num_seqs,
                 kv_cache_tokens=kv_cache_tokens, page_size=page_size)
    seqs = [eng.add(p, forced=r, max_new_tokens=len(r)) for p, r in reqs]
    t0 = time.perf_counter()
    eng.run()
    wall = time.perf_counter() - t0
    tokens = sum(len(s.tokens) for s in seqs)
    st = eng.stats
    return {"mode": "memento" if compaction else "full", "max_num_seqs": max_num_seqs, "pool_tokens": kv_cache_tokens,
            "tokens": tokens, "seconds": wall, "tok_per_s": tokens / wall, "steps": st["steps"],
            "forwards": st["forwards"], "mean_batch": st["batch_size_sum"] / max(1, st["steps"]),
            "preemptions": st["preemptions"], "peak_pool": eng.cache.peak_pages / eng.cache.num_pages if kv_cache_tokens else None,
            "ok": all(s.stop_reason == "end of trace" for s in seqs)}


@torch.no_grad()
def step_times(model, batches=(1, 4, 8, 16, 32), cache_tokens: int = 256, reps: int = 7) -> dict[int, float]:
    """Median ms of one decode step (1 token per sequence, lm_head included) against batch size."""
    out = {}
    for B in batches:
        cache = PagedKVCache(model.config, torch.float32, "cpu")
        for i in range(B):
            cache.add(i)
        S = cache_tokens
        model.hidden_states(torch.zeros(B, S, dtype=torch.long), torch.arange(S).expand(B, S), None, cache.batch(list(range(B))))
        ts = []
        for it in range(reps):
            t0 = time.perf_counter()
            h = model.hidden_states(torch.zeros(B, 1, dtype=torch.long), torch.full((B, 1), S + it), None,
                                    cache.batch(list(range(B))))
            model.logits(h[:, -1])
            ts.append(time.perf_counter() - t0)
        out[B] = 1e3 * statistics.median(ts)
    return out


def fragmentation(tok, reqs, page_sizes=(1, 4, 16, 64)) -> list[dict]:
    """Slots allocated but unused, as a share of allocated slots, when every request holds its
    whole memento-compacted prompt + response at its peak (pages are filled from the front)."""
    from memento_attention import BlockTracker, MementoTokens

    T = MementoTokens.from_tokenizer(tok)
    peaks = []
    for p, r in reqs:
        tr, held, peak = BlockTracker(T, MementoConfig(0)), 0, 0
        for t in p + r:
            for b in tr.step(t):
                lo, hi = b.span(False)
                held -= hi - lo + 1
            held += 1
            peak = max(peak, held)
        peaks.append(peak)
    out = []
    for ps in page_sizes:
        alloc = sum(-(-n // ps) * ps for n in peaks)
        out.append({"page_size": ps, "fragmentation": 1 - sum(peaks) / alloc})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--scale", type=float, default=1 / 32, help="OpenMementos lengths are multiplied by this")
    ap.add_argument("--pool-tokens", type=int, default=None,
                    help="KV pool; default: room for 4 full-cache sequences at their longest")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--sweep", default="4,16,all", help="--max-num-seqs points ('all' = --requests)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved memento/full rounds at the KV-bound point")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="a tiny run to check the script (CI): nothing is written")
    ap.add_argument("--out", default=str(RESULTS / "serve_cpu.txt"))
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.scale, args.rounds, args.sweep = 6, 1 / 64, 1, "2,all"
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 1, 4, 2
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = Tokenizer.byte_level()
    model = build_model(args.hidden, args.layers, args.heads, args.kv_heads)
    reqs = workload(tok, args.requests, args.scale)
    longest = max(len(p) + len(r) for p, r in reqs)
    pool = args.pool_tokens or 4 * longest // args.page_size * args.page_size + args.page_size
    sweep = [args.requests if x == "all" else int(x) for x in args.sweep.split(",")]
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    t_start = time.perf_counter()
    say(f"# python bench/bench_serve.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    say(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: random Qwen3, {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv heads, "
        f"{n_params / 1e6:.1f}M parameters, fp32")
    say(f"workload: {args.requests} requests, OpenMementos shape x {args.scale:g}: prompt ~{round(200 * args.scale)}, "
        f"blocks ~{round(1150 * args.scale)}, mementos ~{round(194 * args.scale)} tokens, 7-11 blocks; "
        f"{sum(len(r) for _, r in reqs):,} response tokens; longest request {longest} tokens")
    say(f"KV pool: {pool:,} tokens ({pool // args.page_size} pages of {args.page_size}), "
        f"{pool / longest:.1f}x the longest request")
    say()
    times = step_times(model)
    say("decode step time vs batch size (cache of 256 tokens per sequence): " +
        ", ".join(f"B={b}: {t:.1f} ms" for b, t in times.items()))
    say()

    def table(rows, title):
        say(title)
        say(f"{'mode':8} {'max seqs':>8} {'tok/s':>8} {'complete s':>10} {'mean batch':>10} {'forwards':>8} "
            f"{'preempt':>7} {'peak pool':>9}")
        for r in rows:
            pp = "-" if r["peak_pool"] is None else f"{r['peak_pool']:.0%}"
            say(f"{r['mode']:8} {r['max_num_seqs']:>8} {r['tok_per_s']:>8.1f} {r['seconds']:>10.1f} {r['mean_batch']:>10.1f} "
                f"{r['forwards']:>8} {r['preemptions']:>7} {pp:>9}")
        say()

    # The KV-bound point: every request may run; only the pool limits how many do.
    rounds = []
    for _ in range(args.rounds):
        pair = {}
        for compaction in (True, False):
            pair[compaction] = serve(model, tok, reqs, compaction=compaction, max_num_seqs=args.requests,
                                     kv_cache_tokens=pool, page_size=args.page_size)
        rounds.append(pair)
    table([r[c] for r in rounds for c in (True, False)], f"KV-bound point (max-num-seqs {args.requests}), "
                                                         f"{args.rounds} interleaved rounds:")
    tp = [r[True]["tok_per_s"] / r[False]["tok_per_s"] for r in rounds]
    done = [r[False]["seconds"] / r[True]["seconds"] for r in rounds]
    ideal = rounds[0][False]["forwards"] / rounds[0][True]["forwards"]
    say(f"memento / full: throughput {statistics.median(tp):.2f}x (rounds {min(tp):.2f}-{max(tp):.2f}), batch completion "
        f"{statistics.median(done):.2f}x faster ({min(done):.2f}-{max(done):.2f}); schedule-only upper bound (forwards, "
        f"constant cost each) {ideal:.2f}x; paper (Qwen3-8B, one B200): 1.75x throughput, 1.58x completion")
    say()
    rows = []
    for m in sweep:
        if m == args.requests:
            rows += [rounds[0][True], rounds[0][False]]
            continue
        for compaction in (True, False):
            rows.append(serve(model, tok, reqs, compaction=compaction, max_num_seqs=m, kv_cache_tokens=pool,
                              page_size=args.page_size))
    table(rows, f"--max-num-seqs sweep, KV pool {pool:,} tokens:")
    free = []
    for m in sweep:
        for compaction in (True, False):
            free.append(serve(model, tok, reqs, compaction=compaction, max_num_seqs=m, kv_cache_tokens=None,
                              page_size=args.page_size))
    table(free, "the same sweep with an unlimited pool (no KV pressure):")
    say("fragmentation (allocated but unused slots at every request's peak, memento): " +
        ", ".join(f"page {f['page_size']}: {f['fragmentation']:.1%}" for f in fragmentation(tok, reqs)))
    say(f"wall {time.perf_counter() - t_start:.0f} s; all requests finished: "
        f"{all(r['ok'] for r in [*rows, *free, *[x for p in rounds for x in p.values()]])}")
    if args.quick:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    _plot(rows, free, Path(args.out).with_suffix(".png"))


def _plot(rows, free, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for rs, style, label in ((rows, "-", "KV pool"), (free, ":", "unlimited")):
        for mode, color in (("memento", "tab:blue"), ("full", "tab:orange")):
            pts = [r for r in rs if r["mode"] == mode]
            xs = [r["max_num_seqs"] for r in pts]
            axes[0].plot(xs, [r["tok_per_s"] for r in pts], style, color=color, marker="o", label=f"{mode}, {label}")
            axes[1].plot(xs, [r["seconds"] for r in pts], style, color=color, marker="o", label=f"{mode}, {label}")
    axes[0].set_ylabel("tokens/s")
    axes[1].set_ylabel("batch completion (s)")
    for ax in axes:
        ax.set_xlabel("--max-num-seqs")
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
