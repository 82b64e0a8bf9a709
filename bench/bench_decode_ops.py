"""Per-decode-step host costs of the engine against batch size, and a bytes-moved model (paper §6.1).

    python bench/bench_decode_ops.py                       # (a), (b) and (c) with the defaults
    python bench/bench_decode_ops.py --parts c             # only the bytes model (no model runs)
    python bench/bench_decode_ops.py --small               # tiny sizes: a smoke check in seconds

(a) Torch operator calls per decode step. B greedy requests (full-cache mode, random byte
    prompts, ignore_eos) are stepped through engine.Engine until every one is past prefill
    and decoding one token per step; a few warm-up steps, then --profile-steps calls of
    Engine.step() under torch.profiler.profile (CPU activity). The count used: events of
    prof.events() whose name starts with "aten::" and that have no "aten::" ancestor (the
    top-level aten ops: one per operator the Python code calls; an op's internal sub-ops,
    e.g. aten::linear -> aten::addmm, are not counted again), divided by the steps. All aten
    events (sub-ops included) are printed beside it. On a GPU each top-level op is at least one
    kernel launch and its Python dispatch, so a count that grows with B is host cost that
    grows with the batch; the ops that grow most are listed. Model: the bench model of
    bench/bench_hf.py (4 layers, hidden 512, 8 / 2 heads of 64, fp32) unless --ops-model.
(b) Host wall time per decode step: the same setup on a 1-layer, hidden-64 model (4 / 2 heads
    of 16), so small that the model's arithmetic is negligible and the time is host overhead
    (Python, dispatch, scheduling, the cache's bookkeeping); median over --time-steps steps
    after --warmup steps, per step and per row, with the part spent inside the model's
    hidden_states + logits calls (which include the cache's append / gather set-up).
(c) A bytes-moved model (arithmetic only, nothing runs) of one decode step of a released
    Qwen3 (default Qwen3-8B, bf16) with B sequences each holding S tokens of K/V:
        weights  every Linear weight read once per step (q, k, v, o, gate, up, down of every
                 layer, lm_head; norms), the embedding only for the B rows looked up;
        KV       held bytes = B x S x kv_cache.kv_bytes_per_token (2 x layers x KV heads x
                 head_dim x 2 bytes);
        gathered each layer gathers every row's held K/V into a padded [B, Hkv, S, D] copy
                 (read the pool 1x + write the copy 1x + attention reads the copy 1x = 3x the
                 held bytes), and the dense reference (memento_attention.attention_reference)
                 upcasts K and V to fp32 (write 2x + read 2x = 4x): 7x the held KV bytes;
        paged    a paged-attention kernel reads the held K/V once from the pool: 1x.
    Not counted in either: the new tokens' K/V writes (B tokens), positions and masks (16 B
    per held token per step, once for all layers), activations; nor, in the gathered path,
    the fp32 [B, Hq, 1, S] scores and probabilities the dense reference writes and reads
    (Hq x 4 B per held token per layer per pass, printed as a share of one KV read; a kernel
    keeps them on chip), so the gathered figure is a lower bound. Rows are equally long (no
    padding). Bytes per step in GB (1e9), the ratio gathered / paged, and the time those bytes
    take at --bandwidth-tbs (H200 HBM3e: 4.8 TB/s): a model of a memory-bound step, not a
    measurement. Points whose weights + KV exceed --hbm-gb are marked: one GPU cannot hold them.

(a) and (b) run on the CPU here; their absolute times are this machine's, not a GPU's.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hf import bench_model, describe  # noqa: E402
from engine import Engine, EngineConfig, Mode  # noqa: E402
from kv_cache import kv_bytes_per_token  # noqa: E402
from model import Qwen3Config  # noqa: E402
from sampling import SamplingParams  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

GB = 1e9


# ----------------------------------------------------------------------------- (a) and (b): the engine


def decoding_engine(model, tok, batch: int, prompt_len: int, steps_after: int, seed: int = 0) -> Engine:
    """An Engine (full-cache mode, unbounded pool, the whole batch prefilled in one step) with
    `batch` greedy ignore_eos requests on random byte prompts, stepped until every request is
    running and past prefill (each has sampled a token, so every next step feeds one token per
    row); each may still decode `steps_after` more tokens without finishing."""
    config = EngineConfig(mode=Mode.FULL, max_num_seqs=batch, max_num_batched_tokens=max(batch * prompt_len, batch),
                          unbounded_kv_cache=True)
    eng = Engine(model, tok, config)
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=steps_after + 2, ignore_eos=True)
    seqs = [eng.add(torch.randint(0, 256, (prompt_len,), generator=g).tolist(), params) for _ in range(batch)]
    while not (len(eng.running) == batch and all(s.tokens for s in seqs)):
        eng.step()
    return eng


def top_level_aten(events) -> list[str]:
    """Names of the profiler events that start with "aten::" and have no "aten::" ancestor."""
    out = []
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        if p is None:
            out.append(e.name)
    return out


def ops_per_step(model, tok, batch: int, prompt_len: int, steps: int = 3, warmup: int = 2) -> dict:
    """Aten ops per decode step at this batch size (see the module docstring, (a)): top-level
    count, all aten events, and a Counter of top-level op names (per step)."""
    eng = decoding_engine(model, tok, batch, prompt_len, warmup + steps)
    for _ in range(warmup):
        eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    events = prof.events()
    top = top_level_aten(events)
    n_all = sum(e.name.startswith("aten::") for e in events)
    return {"top": len(top) / steps, "all": n_all / steps, "names": Counter({k: v / steps for k, v in Counter(top).items()})}


def step_time(model, tok, batch: int, prompt_len: int, steps: int = 20, warmup: int = 5) -> dict:
    """Host wall time of Engine.step() while decoding at this batch size (see (b)): median and
    all per-step seconds, and the median seconds spent inside model.hidden_states + model.logits
    (timed by wrapping those two methods on this model instance)."""
    eng = decoding_engine(model, tok, batch, prompt_len, warmup + steps)
    inside = [0.0]

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                inside[0] += time.perf_counter() - t0
        return wrapper

    for _ in range(warmup):
        eng.step()
    total, model_part = [], []
    model.hidden_states, model.logits = timed(model.hidden_states), timed(model.logits)
    try:
        for _ in range(steps):
            inside[0] = 0.0
            t0 = time.perf_counter()
            eng.step()
            total.append(time.perf_counter() - t0)
            model_part.append(inside[0])
    finally:
        del model.hidden_states, model.logits  # the class's methods again
    return {"median": statistics.median(total), "steps": total, "model_median": statistics.median(model_part)}


# ----------------------------------------------------------------------------- (c): the bytes model


def weight_bytes_read(cfg: Qwen3Config, batch: int, elem: int = 2) -> int:
    """Bytes of weights one decode step reads: every layer's q, k, v, o, gate, up, down weights
    and biases and its three norms (input, post-attention; q and k per head), the final norm,
    lm_head (the embedding again when tied), and `batch` rows of the embedding; `elem` bytes each."""
    h, d, hq, hkv, i = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    attn = h * hq * d + 2 * h * hkv * d + hq * d * h
    if cfg.attention_bias:
        attn += hq * d + 2 * hkv * d + h
    per_layer = attn + 3 * h * i + 2 * h + 2 * d
    params = cfg.num_hidden_layers * per_layer + h + cfg.vocab_size * h + batch * h
    return params * elem


def bytes_per_step(cfg: Qwen3Config, batch: int, held: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The bytes-moved model of one decode step (module docstring, (c)): weights, held KV and
    the gathered (weights + 7 x KV) and paged (weights + 1 x KV) totals, in bytes."""
    elem = torch.tensor([], dtype=dtype).element_size()
    w = weight_bytes_read(cfg, batch, elem)
    kv = batch * held * kv_bytes_per_token(cfg, dtype)
    upcast = 0 if elem == 4 else 2 * 4 // elem  # fp32 copies of K and V, each 4/elem x the held bytes: write + read
    gathered = w + (3 + upcast) * kv  # pool read + padded copy write + copy read, then the upcast
    return {"weights": w, "kv": kv, "gathered": gathered, "paged": w + kv}


def scores_share(cfg: Qwen3Config, dtype: torch.dtype = torch.bfloat16) -> float:
    """One pass over the fp32 [B, Hq, 1, S] scores, as a share of one read of the held K/V."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return cfg.num_attention_heads * 4 / (2 * cfg.num_key_value_heads * cfg.head_dim * elem)


# ----------------------------------------------------------------------------- the command line


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b,c", help="which parts to run: a (ops), b (host time), c (bytes model)")
    ap.add_argument("--ops-batches", default="1,16,64", help="(a) batch sizes")
    ap.add_argument("--ops-model", default="512x4", help="(a) model, hidden x layers (64-wide heads, 4 q per kv head)")
    ap.add_argument("--profile-steps", type=int, default=3, help="(a) decode steps profiled per batch size")
    ap.add_argument("--time-batches", default="1,64,256", help="(b) batch sizes")
    ap.add_argument("--time-steps", type=int, default=20, help="(b) timed decode steps per batch size")
    ap.add_argument("--warmup", type=int, default=5, help="decode steps before profiling / timing")
    ap.add_argument("--prompt-len", type=int, default=32, help="(a), (b) prompt tokens per request")
    ap.add_argument("--model", default="Qwen3-8B", help="(c) a released Qwen3 shape (model.QWEN3_SHAPES)")
    ap.add_argument("--bytes-batches", default="64,128,256", help="(c) batch sizes")
    ap.add_argument("--held", default="4096,16384", help="(c) KV tokens held per sequence")
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8, help="(c) memory bandwidth, TB/s (H200 HBM3e: 4.8)")
    ap.add_argument("--hbm-gb", type=float, default=141.0, help="(c) device memory, GB (H200: 141)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--small", action="store_true", help="tiny sizes, a smoke check in seconds")
    args = ap.parse_args(argv)
    if args.small:
        args.ops_batches, args.ops_model, args.profile_steps = "1,4", "64x1", 2
        args.time_batches, args.time_steps, args.warmup, args.prompt_len = "1,8", 5, 2, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    print(f"# python bench/bench_decode_ops.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tok = Tokenizer.byte_level()

    if "a" in parts:
        hidden, layers = map(int, args.ops_model.split("x"))
        heads = max(1, hidden // 64)
        model = bench_model(tok, hidden, layers, heads, max(1, heads // 4))
        print(f"\n(a) torch operator calls per decode step; model: {describe(model)}")
        print(f"    B greedy requests, full cache, {args.prompt_len}-token prompts, all past prefill, one token per row "
              f"per step; {args.warmup} warm-up steps, then {args.profile_steps} Engine.step() calls under "
              "torch.profiler (CPU activity)")
        print('    counted: events of prof.events() named "aten::*" with no "aten::" ancestor (top-level aten ops, '
              "one per operator called); beside it every aten event, sub-ops included")
        res = {}
        for B in _ints(args.ops_batches):
            res[B] = ops_per_step(model, tok, B, args.prompt_len, args.profile_steps, args.warmup)
        base = min(res)
        print(f"    {'B':>5} {'top-level aten ops/step':>24} {'per row':>9} {'all aten events/step':>21}")
        for B, r in res.items():
            print(f"    {B:>5} {r['top']:>24.0f} {r['top'] / B:>9.1f} {r['all']:>21.0f}")
        big = max(res)
        if big != base:
            slope = (res[big]["top"] - res[base]["top"]) / (big - base)
            print(f"    growth: {slope:.1f} top-level ops per extra row (B={base} -> {big})")
            grow = res[big]["names"] - res[base]["names"]
            if grow:
                print(f"    top-level ops that grow most, per step at B = {', '.join(map(str, res))}:")
                for name, _ in grow.most_common(8):
                    print(f"      {name:<32} " + ", ".join(f"{res[B]['names'].get(name, 0):.0f}" for B in res))
        del model

    if "b" in parts:
        model = bench_model(tok, hidden=64, layers=1, heads=4, kv_heads=2)
        print(f"\n(b) host wall time per decode step; model: {describe(model)}")
        print(f"    same setup as (a); median of {args.time_steps} Engine.step() calls after {args.warmup} warm-up steps; "
              "'in model': inside model.hidden_states + model.logits (includes the cache's append and gather set-up); "
              "the rest: scheduling, block tracker, sampling, bookkeeping")
        print(f"    {'B':>5} {'ms/step':>9} {'(min-max)':>15} {'us/row':>8} {'in model ms':>12} {'rest ms':>8}")
        for B in _ints(args.time_batches):
            r = step_time(model, tok, B, args.prompt_len, args.time_steps, args.warmup)
            med = r["median"]
            print(f"    {B:>5} {1e3 * med:>9.2f} {1e3 * min(r['steps']):>7.2f}-{1e3 * max(r['steps']):<7.2f} "
                  f"{1e6 * med / B:>8.1f} {1e3 * r['model_median']:>12.2f} {1e3 * (med - r['model_median']):>8.2f}")
        del model

    if "c" in parts:
        cfg = Qwen3Config.released(args.model)
        dtype = torch.bfloat16
        per_tok = kv_bytes_per_token(cfg, dtype)
        bw = args.bandwidth_tbs * 1e12
        print(f"\n(c) bytes moved per decode step: a MODEL (arithmetic, nothing runs), {args.model} in bf16, "
              f"KV {per_tok:,} B per token (kv_cache.kv_bytes_per_token), weights read once per step "
              f"({weight_bytes_read(cfg, 0) / GB:.2f} GB, lm_head included)")
        print("    gathered = weights + 7 x held KV (pool read 1x + padded [B, Hkv, S, D] copy written 1x + read 1x, "
              "then fp32 upcast of K and V: write 2x + read 2x); paged = weights + 1 x held KV (read once from the pool)")
        print(f"    not counted: the dense reference's fp32 scores / probabilities ({scores_share(cfg, dtype):.1%} of one "
              "KV read per pass, several passes), positions and masks, new tokens' writes, activations; equal lengths, "
              "no padding")
        print(f"    time = bytes / {args.bandwidth_tbs:g} TB/s (H200 HBM3e), a memory-bound model, not a measurement; "
              f"* = weights + KV exceed {args.hbm_gb:g} GB (does not fit one such GPU)")
        print(f"    {'B':>5} {'held/seq':>9} {'KV GB':>8} {'gathered GB':>12} {'paged GB':>9} {'ratio':>6} "
              f"{'gathered ms':>12} {'paged ms':>9}")
        for S in _ints(args.held):
            for B in _ints(args.bytes_batches):
                m = bytes_per_step(cfg, B, S, dtype)
                fits = "" if m["weights"] + m["kv"] <= args.hbm_gb * GB else " *"
                print(f"    {B:>5} {S:>9,} {m['kv'] / GB:>8.1f} {m['gathered'] / GB:>12.1f} {m['paged'] / GB:>9.1f} "
                      f"{m['gathered'] / m['paged']:>5.2f}x {1e3 * m['gathered'] / bw:>12.1f} "
                      f"{1e3 * m['paged'] / bw:>9.1f}{fits}")


if __name__ == "__main__":
    main()
