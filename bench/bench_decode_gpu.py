"""The decode path on one GPU: tokens per second, step time, kernels per step and HBM bandwidth (paper §6.1).

    python bench/bench_decode_gpu.py            # CUDA: the Qwen3-0.6B and -8B shapes, ~5 minutes
    python bench/bench_decode_gpu.py --quick    # tiny shapes, a few seconds; runs on the CPU (CI)

For each model shape (random bf16 weights of Qwen3-0.6B and Qwen3-8B: the throughput of
decoding depends on the shapes, not the values; byte-level vocabulary) and batch size B
(1 / 16 / 64 / 256), B random prompts of --prompt-len tokens each decode --new-tokens greedy
tokens (ignore_eos, full-cache mode: a static batch, nothing evicted) three ways:

    graphs   the engine as it serves: compiled layers, decode steps replayed as CUDA graphs
    eager    the engine with --enforce-eager (no torch.compile, no graphs)
    HF       transformers' generate on the same weights (sdpa), same prompts, same length

and reports per way: tok/s (B x N / wall seconds, prefill included), the median ms of a decode
step (every sequence past its prompt), kernels per decode step (CUDA kernels in the profiler
over a few steps; on the CPU the operators), and for the engine the achieved bandwidth of a
decode step: (bytes of weights read once + bytes of K/V the step reads) / step time, and that
as a share of the device's measured copy bandwidth (a device-to-device copy of a large
tensor: read + written bytes / time). The tokens of graphs and eager are compared (greedy on
random weights: a near-tie may flip after bf16 rounding, so the count of equal rows is
printed, not asserted; bench_cuda_graphs.py checks bitwise equality).

Then the paper's Fig. 8 on this device: the same teacher-forced OpenMementos-shaped requests
(bench/serving_cases.py) through a fixed KV pool in memento and full mode, tok/s and ratio.

Results print as tables and go to --out as JSON. Every figure is a measurement of the device
it ran on, with the date; nothing here is asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import Engine, EngineConfig, Mode  # noqa: E402
from kv_cache import kv_bytes_per_token  # noqa: E402
from model import QWEN3_SHAPES, Qwen3, Qwen3Config, to_hf  # noqa: E402
from sampling import SamplingParams  # noqa: E402
from serving_cases import serve, workload  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def model_of(shape: str, tok, device, dtype) -> Qwen3:
    """A random Qwen3 of a released shape (or "tiny"), the tokenizer's vocabulary, on device."""
    if shape == "tiny":
        kw = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
        head_dim = 16
    else:
        kw, head_dim = dict(QWEN3_SHAPES[shape]), 128
    cfg = Qwen3Config(vocab_size=tok.n_vocab, head_dim=head_dim, max_position_embeddings=40960, **kw)
    with torch.device(device):
        model = Qwen3(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():  # random values, quickly (init_weights draws on the CPU)
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * 0.02)
    return model.to(dtype).eval()


def copy_bandwidth(device, gib: float) -> float:
    """Bytes per second of a large device-to-device copy (bytes read + bytes written)."""
    n = int(gib * 2**30) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    b.copy_(a)
    sync()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        ts.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / min(ts)


def engine_run(model, tok, prompts, new_tokens, device, **config) -> dict:
    """The engine on a static batch: tok/s, median decode-step ms, the step's kernels, rows."""
    B, P = len(prompts), len(prompts[0])
    cfg = EngineConfig(mode=Mode.FULL, max_num_seqs=B, max_num_batched_tokens=max(2048, B * P),
                       kv_cache_tokens=B * (P + new_tokens + 32), **config)
    eng = Engine(model, tok, cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seqs = [eng.add(p, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)) for p in prompts]
    steps, kernels = [], None
    sync()
    t0 = time.perf_counter()
    n = 0
    while eng.busy:
        decoding = not eng.waiting and all(s.computed >= len(s.prompt) for s in eng.running)
        if decoding and kernels is None and n >= 2:
            t1 = time.perf_counter()
            kernels = count_kernels(eng, device, 3)
            profiled = time.perf_counter() - t1  # the profiled steps are not timed
            t0 += profiled
            continue
        t1 = time.perf_counter()
        eng.step()
        sync()
        if decoding:
            steps.append(time.perf_counter() - t1)
        n += 1
    wall = time.perf_counter() - t0
    return {"tok_per_s": B * new_tokens / wall, "step_ms": 1e3 * statistics.median(steps) if steps else None,
            "kernels_per_step": kernels, "tokens": [s.tokens for s in seqs],
            "compile_s": eng.runner.compile_seconds}


def count_kernels(eng, device, steps: int) -> float:
    """Kernels per decode step over `steps` steps under torch.profiler: CUDA kernel events on a
    GPU, operators on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            if not (eng.running or eng.inflight is not None):
                break
            eng.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        n = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        n = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    return n / steps


def hf_run(model, prompts, new_tokens, device) -> dict:
    """transformers' generate on the same weights (built in memory, sdpa), greedy, exactly
    new_tokens per row: tok/s."""
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM

    c = model.config
    hf_cfg = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                      rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                      tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa")
    with torch.device(device):
        hf = Qwen3ForCausalLM(hf_cfg).to(next(model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(to_hf(model.state_dict(), c), strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise SystemExit(f"bench_decode_gpu.py: HF weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.eval()
    ids = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        hf.generate(input_ids=ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=2,
                    min_new_tokens=2, do_sample=False)  # warm-up
        sync()
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False)
        sync()
    del hf
    return {"tok_per_s": len(prompts) * new_tokens / (time.perf_counter() - t0)}


def main(argv=None) -> int:
    """Run every shape x batch size x way, then Fig. 8; print tables, write --out."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="Qwen3-0.6B,Qwen3-8B")
    ap.add_argument("--batch-sizes", default="1,16,64,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and sizes (runs on the CPU)")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/decode_gpu-<device>.json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        args.shapes, args.batch_sizes, args.prompt_len, args.new_tokens = "tiny", "1,4", 16, 8
    elif not cuda:
        print("bench_decode_gpu.py: no CUDA device; --quick runs a small version on the CPU", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    print(f"# python bench/bench_decode_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"# {date.today()}, {name}, torch {torch.__version__}, {dtype}")
    tok = Tokenizer.byte_level()
    bw = copy_bandwidth(device, 2.0 if cuda else 0.25)
    print(f"device copy bandwidth (read + write of a large tensor): {bw / 1e9:,.0f} GB/s")
    results = {"date": str(date.today()), "device": name, "torch": torch.__version__, "copy_bandwidth": bw,
               "decode": [], "fig8": None}
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':>11} {'B':>4} {'way':>7} {'tok/s':>9} {'ms/step':>8} {'kernels/step':>12} {'GB/s':>8} "
          f"{'of copy bw':>10} {'rows = graphs':>13}")
    for shape in args.shapes.split(","):
        model = model_of(shape, tok, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        kv = kv_bytes_per_token(model.config, dtype)
        for B in map(int, args.batch_sizes.split(",")):
            prompts = torch.randint(0, 256, (B, args.prompt_len), generator=g).tolist()
            ways = {"graphs": dict(), "eager": dict(enforce_eager=True)}
            runs = {w: engine_run(model, tok, prompts, args.new_tokens, device, **cfg) for w, cfg in ways.items()}
            if not args.no_hf:
                runs["HF"] = hf_run(model, prompts, args.new_tokens, device)
            ctx = args.prompt_len + args.new_tokens / 2  # the mean context a decode step reads
            for w, r in runs.items():
                row = {"shape": shape, "B": B, "way": w, **{k: v for k, v in r.items() if k != "tokens"}}
                gbs = share = None
                if r.get("step_ms"):
                    gbs = (weight_bytes + B * ctx * kv) / (r["step_ms"] / 1e3)
                    share = gbs / bw
                row.update(bandwidth=gbs, bandwidth_share=share)
                equal = sum(a == b for a, b in zip(r["tokens"], runs["graphs"]["tokens"])) if "tokens" in r else None
                results["decode"].append({**row, "rows_equal_graphs": equal})
                fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
                print(f"{shape:>11} {B:>4} {w:>7} {r['tok_per_s']:>9.1f} {fmt(r.get('step_ms'), '.3f'):>8} "
                      f"{fmt(r.get('kernels_per_step'), '.0f'):>12} {fmt(gbs and gbs / 1e9, ',.0f'):>8} "
                      f"{fmt(share, '.1%'):>10} {'-' if equal is None else f'{equal}/{B}':>13}", flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    # the paper's Fig. 8 on this device: memento vs full through one fixed pool
    fig_shape = "tiny" if args.quick else "Qwen3-0.6B"
    model = model_of(fig_shape, tok, device, dtype)
    reqs = workload(tok, 6 if args.quick else 24, 1 / 64 if args.quick else 1 / 8)
    longest = max(len(p) + len(r) for p, r in reqs)
    pool = 4 * longest // 16 * 16
    fig = {m.value: serve(model, tok, reqs, mode=m, pool_tokens=pool, page_size=16) for m in (Mode.MEMENTO, Mode.FULL)}
    ratio = fig["memento"]["tok_per_s"] / fig["full"]["tok_per_s"]
    results["fig8"] = {"shape": fig_shape, "requests": len(reqs), "pool_tokens": pool, "ratio": ratio,
                       **{m: {k: v for k, v in r.items() if k not in ("ttft", "itl")} for m, r in fig.items()}}
    print(f"Fig. 8, {fig_shape}, {len(reqs)} OpenMementos-shaped requests, pool {pool:,} tokens (4x the longest): "
          f"memento {fig['memento']['tok_per_s']:,.0f} tok/s, full {fig['full']['tok_per_s']:,.0f} tok/s, "
          f"{ratio:.2f}x (paper, Qwen3-8B on a B200: 1.75x)")
    out = Path(args.out) if args.out else RESULTS / f"decode_gpu-{'quick' if args.quick else name.replace(' ', '-')}.json"
    if not args.quick or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
