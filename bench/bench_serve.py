"""Serving throughput with memento compaction vs a full cache: the paper's Fig. 8 at CPU scale (§6.1).

    python bench/bench_serve.py [--requests 32] [--scale 0.03125] [--pools 2,4,8,unbounded] [--rounds 3] [--quick]

A workload of R requests whose responses are teacher-forced traces with the OpenMementos shape
(a 200-token prompt, ~9 blocks of ~1,150 tokens each followed by a ~194-token memento, then a
short answer; every length multiplied by --scale so that it runs on a 2-core CPU), served by
engine.Engine, one token per sequence per step, with every request allowed to run at once:
only the KV pool limits how many do. Memento compaction frees each block's pages when its
memento ends, so more sequences fit the same pool and every step serves more of them; the
full-cache baseline evicts nothing and its prefills are not split at memento events.

For each model shape (--shapes) and each pool size (--pools: multiples of the longest
request, from KV-bound to unbounded) the two modes run in --rounds rounds that alternate
which mode goes first; per point the median memento/full throughput ratio with its spread
(every request finishes in both modes with the same tokens, so the ratio of batch completion
times is the same measurement), the mean running batch of each mode, and the ratio a
constant-cost-per-forward model predicts (full forwards / memento forwards: what the ratio
would be if a forward cost the same whatever its batch and cache; a model, not a bound),
time to first token and inter-token latency (median and p90 over all requests and tokens).
Beside it: the decode step time against batch size per shape (how close this CPU is to a
GPU's nearly free batching) and fragmentation against page size. Writes
bench/results/serve_cpu.txt.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import Mode, kv_replay  # noqa: E402
from serving_cases import build_model, quantile, serve, workload  # noqa: E402
from kv_cache import PagedKVCache  # noqa: E402
from blocks import MementoConfig, MementoTokens  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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
    fmt = MementoTokens.from_tokenizer(tok)
    peaks = [max(kv_replay(p + r, fmt, MementoConfig(0), Mode.MEMENTO)[1]) for p, r in reqs]
    out = []
    for ps in page_sizes:
        alloc = sum(-(-n // ps) * ps for n in peaks)
        out.append({"page_size": ps, "fragmentation": 1 - sum(peaks) / alloc})
    return out


def point(model, tok, reqs, pool_tokens, page_size, rounds: int) -> dict:
    """Both modes at one pool size, in rounds that alternate which mode runs first."""
    runs = {Mode.MEMENTO: [], Mode.FULL: []}
    for r in range(rounds):
        for mode in ((Mode.MEMENTO, Mode.FULL) if r % 2 == 0 else (Mode.FULL, Mode.MEMENTO)):
            runs[mode].append(serve(model, tok, reqs, mode=mode, pool_tokens=pool_tokens, page_size=page_size))
    m, f = runs[Mode.MEMENTO], runs[Mode.FULL]
    ratios = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(m, f)]
    return {"pool": pool_tokens, "memento": m, "full": f, "ratio": statistics.median(ratios), "ratio_lo": min(ratios),
            "ratio_hi": max(ratios), "batch_ratio": m[0]["mean_batch"] / f[0]["mean_batch"],
            "model_ratio": f[0]["forwards"] / m[0]["forwards"],
            "same_tokens": all(a["tokens"] == b["tokens"] for a, b in zip(m, f)),
            "ok": all(x["ok"] for x in m + f)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--scale", type=float, default=1 / 32, help="OpenMementos lengths are multiplied by this")
    ap.add_argument("--pools", default="2,4,8,unbounded",
                    help="KV pool sizes as multiples of the longest request ('unbounded' = no limit)")
    ap.add_argument("--shapes", default="1024x2,512x4", help="model shapes, hidden x layers (64-wide heads, 4 q per kv head)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per point, alternating which mode runs first")
    ap.add_argument("--quick", action="store_true", help="a tiny run to check the script (CI): nothing is written")
    ap.add_argument("--out", default=str(RESULTS / "serve_cpu.txt"))
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.scale, args.rounds, args.pools, args.shapes = 6, 1 / 64, 2, "4", "64x1,32x2"
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = Tokenizer.byte_level()
    reqs = workload(tok, args.requests, args.scale)
    longest = max(len(p) + len(r) for p, r in reqs)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    t_start = time.perf_counter()
    say(f"# python bench/bench_serve.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    say(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    say(f"workload: {args.requests} requests, OpenMementos shape x {args.scale:g}: prompt ~{round(200 * args.scale)}, "
        f"blocks ~{round(1150 * args.scale)}, mementos ~{round(194 * args.scale)} tokens, 7-11 blocks; "
        f"{sum(len(r) for _, r in reqs):,} response tokens; longest request {longest} tokens; all requests may run at "
        f"once, one response token per sequence per step, page size {args.page_size}")
    say("the constant-cost model: full forwards / memento forwards, the ratio if every forward cost the same "
        "(a model of a GPU's nearly free batching, not a bound)")
    say()
    summary, all_ok = [], True
    for shape in args.shapes.split(","):
        hidden, layers = map(int, shape.split("x"))
        heads = max(1, hidden // 64)
        model = build_model(hidden, layers, heads, max(1, heads // 4))
        n_params = sum(p.numel() for p in model.parameters())
        say(f"== model: random Qwen3, {layers} layers, hidden {hidden}, {heads} q / {max(1, heads // 4)} kv heads, "
            f"{n_params / 1e6:.1f}M parameters, fp32")
        times = step_times(model, batches=(1, 4) if args.quick else (1, 4, 8, 16, 32))
        say("decode step time vs batch size (cache of 256 tokens per sequence): " +
            ", ".join(f"B={b}: {t:.1f} ms" for b, t in times.items()))
        say(f"{'pool':>16} {'mode':8} {'tok/s (rounds)':>26} {'mean batch':>10} {'forwards':>8} {'preempt':>7} "
            f"{'peak pool':>9} {'TTFT p50/p90 s':>15} {'ITL p50/p90 ms':>15}")
        for x in args.pools.split(","):
            pool = None if x == "unbounded" else (int(float(x) * longest) // args.page_size * args.page_size)
            pt = point(model, tok, reqs, pool, args.page_size, args.rounds)
            all_ok &= pt["ok"]
            label = "unbounded" if pool is None else f"{pool:,} ({float(x):g}x)"
            for mode in ("memento", "full"):
                rs = pt[mode]
                pp = "-" if rs[0]["peak_pool"] is None else f"{rs[0]['peak_pool']:.0%}"
                tps = ", ".join(f"{r['tok_per_s']:.0f}" for r in rs)
                say(f"{label:>16} {mode:8} {tps:>26} {rs[0]['mean_batch']:>10.1f} "
                    f"{rs[0]['forwards']:>8} {rs[0]['preemptions']:>7} {pp:>9} "
                    f"{quantile([t for r in rs for t in r['ttft']], .5):>7.2f}/{quantile([t for r in rs for t in r['ttft']], .9):<7.2f} "
                    f"{1e3 * quantile([t for r in rs for t in r['itl']], .5):>7.1f}/{1e3 * quantile([t for r in rs for t in r['itl']], .9):<7.1f}")
            say(f"{'':>16} memento/full throughput {pt['ratio']:.2f}x (rounds {pt['ratio_lo']:.2f}-{pt['ratio_hi']:.2f}"
                f"{', = batch completion ratio: same tokens' if pt['same_tokens'] else ''}), mean batch "
                f"{pt['batch_ratio']:.2f}x, constant-cost model {pt['model_ratio']:.2f}x")
            summary.append((shape, label, pt))
        say()
    say("summary, memento / full (paper, Qwen3-8B on one B200: 1.75x throughput, 1.58x batch completion):")
    say(f"{'shape':>8} {'pool':>16} {'throughput':>22} {'mean batch':>10} {'constant-cost model':>19}")
    for shape, label, pt in summary:
        say(f"{shape:>8} {label:>16} {pt['ratio']:>6.2f}x ({pt['ratio_lo']:.2f}-{pt['ratio_hi']:.2f}) "
            f"{pt['batch_ratio']:>9.2f}x {pt['model_ratio']:>18.2f}x")
    say("fragmentation (allocated but unused slots at every request's peak, memento): " +
        ", ".join(f"page {f['page_size']}: {f['fragmentation']:.1%}" for f in fragmentation(tok, reqs)))
    say(f"wall {time.perf_counter() - t_start:.0f} s; all requests finished: {all_ok}")
    if args.quick:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
