"""The serving workload shared by bench/bench_serve.py and bench/bench_http.py (paper §6.1, Fig. 8).

Requests whose responses are teacher-forced traces with the OpenMementos shape (lengths scaled
down to run on a CPU), a random Qwen3 of a given shape, one in-process Engine run of them,
and the quantile the two scripts report.
"""
from __future__ import annotations

import random
import time

import torch

from blocks import MementoConfig
from engine import Engine, EngineConfig, Mode
from model import Qwen3, Qwen3Config


def workload(tok, n: int, scale: float, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n (prompt ids, response ids) pairs shaped like OpenMementos traces, lengths x scale
    (+-25% jitter; random lowercase letters, one byte-level token each). Paper §6.1."""
    rng = random.Random(seed)
    text = lambda n_: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(max(1, n_)))  # noqa: E731
    jit = lambda x: round(x * scale * rng.uniform(0.75, 1.25))  # noqa: E731
    out = []
    for _ in range(n):
        resp = "<think>\n" + "".join(f"<|block_start|>{text(jit(1150))}<|block_end|>\n<|summary_start|>{text(jit(194))}"
                                     "<|summary_end|>\n" for _ in range(rng.randint(7, 11)))
        out.append((tok.prompt_ids(text(jit(200))), tok.encode(resp + "</think>\n" + text(jit(40)))))
    return out


def build_model(hidden: int, layers: int, heads: int, kv_heads: int) -> Qwen3:
    """A random fp32 Qwen3 of this shape (byte-level vocabulary, tied embeddings). Paper §6.1."""
    cfg = Qwen3Config(vocab_size=272, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                      max_position_embeddings=40960, tie_word_embeddings=True)
    return Qwen3(cfg).init_weights(seed=0).eval()


@torch.no_grad()
def serve(model, tok, reqs, *, mode: Mode, pool_tokens: int | None, page_size: int) -> dict:
    """Run the workload through one Engine (every request may run at once); its figures. Paper §6.1."""
    n = len(reqs)
    config = EngineConfig(MementoConfig(0), mode=mode, max_num_seqs=n, max_num_batched_tokens=max(2048, n),
                          page_size=page_size, kv_cache_tokens=pool_tokens, unbounded_kv_cache=pool_tokens is None)
    eng = Engine(model, tok, config)
    seqs = [eng.add(p, forced=r) for p, r in reqs]
    t0 = time.perf_counter()
    eng.run()
    wall = time.perf_counter() - t0
    st = eng.stats
    return {"mode": mode.value, "tokens": sum(len(s.tokens) for s in seqs), "seconds": wall,
            "tok_per_s": sum(len(s.tokens) for s in seqs) / wall, "steps": st["steps"], "forwards": st["forwards"],
            "mean_batch": st["batch_size_sum"] / max(1, st["steps"]), "preemptions": st["preemptions"],
            "ttft": [s.metrics()["ttft"] for s in seqs], "itl": [x for s in seqs for x in s.itl],
            "peak_pool": eng.cache.peak_pages / eng.cache.num_pages if pool_tokens else None,
            "ok": all(s.stop_reason == "end of trace" for s in seqs)}


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank, lower) of the values that are not None; NaN if none. Paper §6.1."""
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
