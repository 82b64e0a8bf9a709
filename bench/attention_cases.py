"""Inputs and timers shared by the attention benchmarks and the GPU check (paper §4).

OpenMementos-shaped masks: a ~200-token prompt, then blocks of ~1,150 tokens each followed by
a ~194-token memento, keep_last_n_blocks=0 (the content of block b is masked from the
position of the <|summary_end|> that ends its memento); the dense boolean mask SDPA needs;
the number of visible (query, key) pairs; CUDA-event timing and peak memory.
"""
from __future__ import annotations

import random
import statistics

import torch

from blocks import NEVER


def openmementos_mask_from(T, prompt=200, block=1150, memento=194, jitter=0.25, seed=0):
    """mask_from [T] int32 for one OpenMementos-shaped trace, keep_last_n_blocks=0.

    Layout: prompt, <think>, then per block <|block_start|> content <|block_end|>
    <|summary_start|> memento <|summary_end|>. Content and memento lengths are drawn
    uniformly within +-jitter of the given means (seeded). The content of every completed
    block is masked from its <|summary_end|> position on (delimiters stay visible); a block
    whose memento does not end before T is never masked.
    Paper §4.
    """
    rng = random.Random(seed)
    mf = torch.full((T,), NEVER, dtype=torch.int32)
    pos = prompt + 1
    while True:
        c = max(1, round(block * (1 + rng.uniform(-jitter, jitter))))
        m = max(1, round(memento * (1 + rng.uniform(-jitter, jitter))))
        s = pos
        e = s + 1 + c
        z = e + 1 + m + 1
        if z >= T:
            return mf
        mf[s + 1:e] = z
        pos = z + 1


def visible_pairs(mask_from: torch.Tensor) -> int:
    """Number of visible (query, key) pairs of a [B, T] mask_from (exact, O(T)). Paper §4."""
    T = mask_from.shape[-1]
    j = torch.arange(T, device=mask_from.device)
    return int((mask_from.long().clamp(max=T) - j).clamp(min=0).sum())


def dense_mask(mask_from: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: True where query i may see key j (for SDPA). Paper §4."""
    T = mask_from.shape[-1]
    i = torch.arange(T, device=mask_from.device)
    return ((i[None, :] <= i[:, None])[None] & (i[None, :, None] < mask_from[:, None, :]))[:, None]


def time_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() over reps CUDA-event-timed runs after warmup runs. Paper §4."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bytes(fn, base: int) -> int:
    """Bytes allocated at the peak of fn() above `base` (the caching allocator's counter). Paper §4."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
