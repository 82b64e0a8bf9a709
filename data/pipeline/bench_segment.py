"""Runtime of the exact segmentation on a random 400-sentence trace (§9.4).

    python -m data.pipeline.bench_segment [--n 400] [--seed 0] [--repeat 3]

Sentences of 20-60 tokens (uniform), boundary scores on the 0.5 grid (two averaged
passes), min_tokens=200, lam=0.5: the realistic worst case for the DP, since short
sentences and min_tokens=200 allow up to ~80 blocks.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import time

from .segment import objective, segment, segment_one_candidate


def main(argv=None) -> None:
    """Print the best-of-`repeat` wall time of `segment` (and the heuristic, for scale)."""
    p = argparse.ArgumentParser(prog="python -m data.pipeline.bench_segment")
    p.add_argument("--n", type=int, default=400, help="sentences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--heuristic", action="store_true", help="also time segment_one_candidate")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    lengths = [rng.randint(20, 60) for _ in range(a.n)]
    scores = [rng.randint(0, 6) / 2 for _ in range(a.n - 1)]
    best = float("inf")
    for _ in range(a.repeat):
        t = time.perf_counter()
        blocks = segment(scores, lengths, 200, 0.5, 1)
        best = min(best, time.perf_counter() - t)
    print(f"segment: n={a.n} sentences, {sum(lengths)} tokens, {len(blocks)} blocks, "
          f"J={objective(blocks, scores, lengths, 0.5):.4f}, best of {a.repeat}: {best:.3f} s "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)")
    if a.heuristic:
        t = time.perf_counter()
        h = segment_one_candidate(scores, lengths, 200, 0.5, 1)
        print(f"segment_one_candidate: {time.perf_counter() - t:.3f} s, "
              f"J={objective(h, scores, lengths, 0.5):.4f}")


if __name__ == "__main__":
    main()
