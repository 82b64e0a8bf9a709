"""Benchmark memento attention (paper §4) against SDPA and FlexAttention.

On CUDA, for each sequence length (default 4K, 8K, 16K, 32K; B=1, Hq=32, Hkv=8, D=128,
bf16) it times the forward and the backward separately, each of the kernel alone with its
mask prebuilt, then end to end (mask built from mask_from + forward + backward), and records
peak memory, for:

    sdpa_mask      torch SDPA with the dense [T, T] boolean memento mask
    sdpa_causal    torch SDPA, is_causal=True, no mask (lower bound of the dense approach)
    flex_128x128   FlexAttention with the memento rule as mask_mod, 128 x 128 block mask
    flex_128x64    the same with a 128 x 64 block mask (our forward's tile)
    ours_causal    memento_kernels.memento_flash with mask_from all NEVER (pure causal)
    ours_memento   memento_kernels.memento_flash with the memento mask_from (a TileMask prebuilt, as a
                   model forward builds it once for all layers)

The memento mask is shaped like OpenMementos traces (bench/attention_cases.py). TFLOP/s count
only visible (query, key) pairs of each method's own mask: 4 * D * visible_pairs * Hq * B for
the forward, 2.5x that for the backward. Peak memory is what the method allocates on top of
q, k, v (and dO), its own mask included.

Without CUDA it runs the kernel under the Triton interpreter on one small shape, checks it
against the dense reference and says so; timings there mean nothing. `--tiles` (no GPU
needed) reports tile shares, list memory (dense against compressed) and list-building time.

    python bench/bench_attention.py [--seq-lens 4096,8192] [--methods ...] [--json] [--save FILE]
    python bench/bench_attention.py --tiles --seq-lens 32768,131072
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attention_cases import dense_mask, openmementos_mask_from, peak_bytes, time_ms, visible_pairs  # noqa: E402
from blocks import NEVER  # noqa: E402
from memento_kernels.memento_flash import (TileMask, _config, csr_lists, memento_flash_attention, tile_lists,  # noqa: E402
                                   tile_schedule, tile_stats)
from memento_attention import attention_reference  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("sdpa_mask", "sdpa_causal", "flex_128x128", "flex_128x64", "ours_causal", "ours_memento")


def matmul_peak_tflops(dtype, n=8192, reps=20, device="cuda"):
    """Dense n x n x n matmul throughput in TFLOP/s: the device's practical ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, 5, reps)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _build_method(name, q, mf, group):
    """(attention callable, visible pairs, tile info, end-to-end callable) for one method.

    The attention callable is the kernel alone: its mask (SDPA's dense mask, Flex's block
    mask, our TileMask with its lists) is built here, so that the caller's peak-memory window
    covers it but its timings do not. The end-to-end callable builds the mask from mask_from
    on every call, then attends (None where there is nothing to build)."""
    T, B = q.shape[2], q.shape[0]
    causal_pairs = B * T * (T + 1) // 2
    if name == "sdpa_mask":
        mask = dense_mask(mf)

        def fwd(q, k, v):
            # Explicit K/V expansion: SDPA's fused kernels that take an arbitrary mask do not
            # all take GQA, and the math fallback would materialise [B, Hq, T, T] scores.
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  attn_mask=mask)

        def e2e(q, k, v):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  attn_mask=dense_mask(mf))
        return fwd, visible_pairs(mf), None, e2e
    if name == "sdpa_causal":
        def fwd(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
        return fwd, causal_pairs, None, None
    if name in ("flex_128x128", "flex_128x64"):
        # imported here: FlexAttention needs a torch with torch.compile support for this device
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        size = (128, 128) if name == "flex_128x128" else (128, 64)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx < mf[b, kv_idx])

        def block_mask():
            return create_block_mask(mask_mod, B, None, T, T, device=q.device, BLOCK_SIZE=size)
        bm = block_mask()
        info = None
        try:
            nb = math.ceil(T / bm.BLOCK_SIZE[1])
            visited = int(bm.kv_num_blocks.sum()) + (int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0)
            rows = math.ceil(T / bm.BLOCK_SIZE[0])
            info = {"tile": list(bm.BLOCK_SIZE), "skipped_fraction": 1 - visited / (B * rows * nb / 2 + B * rows / 2)}
        except Exception:  # BlockMask internals differ across torch versions; the timing does not depend on this
            pass

        def fwd(q, k, v):
            return flex(q, k, v, block_mask=bm, enable_gqa=group > 1)

        def e2e(q, k, v):
            return flex(q, k, v, block_mask=block_mask(), enable_gqa=group > 1)
        return fwd, visible_pairs(mf), info, e2e
    if name in ("ours_causal", "ours_memento"):
        use = mf if name == "ours_memento" else torch.full_like(mf, NEVER)
        cap = torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0)
        cfg = _config(q.shape[-1], q.dtype, q.is_cuda, None, None, cap)
        st = tile_stats(use, T, *cfg["fwd"][:2])
        info = {"tile": list(cfg["fwd"][:2]), "skipped_fraction": st["skipped_fraction"]}
        tiles = TileMask(use)
        tiles.lists(cfg)  # forward, dQ and dK/dV lists, built once as a model forward does

        def fwd(q, k, v):
            return memento_flash_attention(q, k, v, tiles)

        def e2e(q, k, v):
            return memento_flash_attention(q, k, v, use)  # a fresh TileMask: lists built in the call
        return fwd, visible_pairs(use), info, e2e
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def check_against_reference(T, B, Hq, Hkv, D, dtype, seed=0, device="cuda"):
    """Max |error| of our kernel (out, dq, dk, dv) against the fp32 dense reference on one
    OpenMementos-shaped case; the same rounded inputs go to both."""
    mf = torch.stack([openmementos_mask_from(T, seed=seed + b) for b in range(B)]).to(device)
    return _check_small(mf, B, Hq, Hkv, D, dtype, seed, device)


def _check_small(mf, B, Hq, Hkv, D, dtype, seed=0, device="cpu"):
    T = mf.shape[-1]
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(B, h, T, D, device=device, generator=g).to(dtype) for h in (Hq, Hkv, Hkv, Hq))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = memento_flash_attention(*ours, mf)
    grads = torch.autograd.grad(out, ours, do)
    ref_in = [t.float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_in, mf)
    rgrads = torch.autograd.grad(ref, ref_in, do.float())
    errs = {"out": (out.float() - ref).abs().max().item()}
    errs.update({n: (a.float() - r).abs().max().item() for n, a, r in zip(("dq", "dk", "dv"), grads, rgrads)})
    return errs


def bench_cuda(args, device="cuda"):
    """Time every method at each T of args.seq_lens on `device` (§4 kernel vs SDPA/Flex).

    Returns a list of records: first a reference check ("check_vs_reference", max abs error
    per output at T=2048) and the measured bf16/fp16 matmul peak ("matmul_peak", TFLOP/s),
    then per (method, T): visible_pairs, tiles_skipped (fraction), fwd_ms and bwd_ms (the
    kernel alone, its mask prebuilt; bwd_ms is the backward of one forward, by itself),
    e2e_ms (building the mask from mask_from + forward + backward; methods with a mask to
    build), fwd_tflops and bwd_tflops (counted on visible pairs, the backward as 2.5x the
    forward's flops), fwd_peak_gib and fwd_bwd_peak_gib. A method or pass that fails (e.g.
    out of memory for the dense mask) records its error string instead, and the others
    still run.
    """
    dtype = _DTYPES[args.dtype]
    B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    group = Hq // Hkv
    records = []
    errs = check_against_reference(2048, B, Hq, Hkv, D, dtype, args.seed, device)
    records.append({"method": "check_vs_reference", "T": 2048, "dtype": args.dtype, "max_abs_err": errs})
    peak = matmul_peak_tflops(dtype, device=device)
    records.append({"method": "matmul_peak", "dtype": args.dtype, "tflops": peak, "device": torch.cuda.get_device_name()})
    if not args.json:
        print(torch.cuda.get_device_name())
        print("ours vs fp32 reference at T=2048, max |err|: " + ", ".join(f"{n}={e:.1e}" for n, e in errs.items()))
        _print_header(peak, args.dtype)
    for T in args.seq_lens:
        mf = torch.stack([openmementos_mask_from(T, seed=args.seed + b) for b in range(B)]).to(device)
        g = torch.Generator(device=device).manual_seed(args.seed)
        qkv = [torch.randn(B, h, T, D, device=device, dtype=dtype, generator=g).requires_grad_() for h in (Hq, Hkv, Hkv)]
        do = torch.randn(B, Hq, T, D, device=device, dtype=dtype, generator=g)
        for name in args.methods:
            records.append(_bench_method(name, qkv, do, mf, group, args))
            if not args.json:
                _print_row(records[-1])
        del qkv, do
    return records


def _bench_method(name, qkv, do, mf, group, args) -> dict:
    q = qkv[0]
    B, Hq, T, D = q.shape
    rec = {"method": name, "T": T, "B": B, "Hq": Hq, "Hkv": qkv[1].shape[1], "D": D, "dtype": args.dtype}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    try:
        fwd, pairs, info, e2e = _build_method(name, q, mf, group)
    except Exception as e:  # one failing baseline (OOM, missing backend) must not hide the others
        rec["error"] = _err(e)
        return rec
    rec["visible_pairs"] = pairs
    rec["tiles_skipped"] = info["skipped_fraction"] if info else None
    flops_fwd = 4 * D * pairs * Hq
    detached = [t.detach() for t in qkv]

    def run_fwd():
        with torch.no_grad():
            fwd(*detached)

    def run_fwd_bwd(attend=fwd):
        torch.autograd.grad(attend(*qkv), qkv, do)

    # Each pass is measured separately so that a failure (OOM of a dense baseline, say) keeps
    # the other figures.
    try:
        rec["fwd_ms"] = time_ms(run_fwd, args.warmup, args.reps)
        rec["fwd_tflops"] = flops_fwd / (rec["fwd_ms"] * 1e-3) / 1e12
        rec["fwd_peak_gib"] = peak_bytes(run_fwd, base) / 2**30
    except Exception as e:
        rec["fwd_error"] = _err(e)
    try:
        graph = [fwd(*qkv)]  # one forward, its backward timed alone
        rec["bwd_ms"] = time_ms(lambda: torch.autograd.grad(graph[0], qkv, do, retain_graph=True), args.warmup, args.reps)
        rec["bwd_tflops"] = 2.5 * flops_fwd / (rec["bwd_ms"] * 1e-3) / 1e12
        graph.clear()
        rec["fwd_bwd_peak_gib"] = peak_bytes(run_fwd_bwd, base) / 2**30
    except Exception as e:
        rec["bwd_error"] = _err(e)
    if e2e is not None:
        try:
            rec["e2e_ms"] = time_ms(lambda: run_fwd_bwd(e2e), args.warmup, args.reps)
        except Exception as e:
            rec["e2e_error"] = _err(e)
    return rec


def _err(e):
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-".rjust(int(spec.split(".")[0]))


def _print_header(peak, dtype):
    print(f"dense {dtype} matmul peak: {peak:.0f} TFLOP/s (8192^3); fwd and bwd: the kernel alone, its mask prebuilt; "
          "e2e: mask built + fwd + bwd")
    print(f"{'method':13} {'T':>6} {'fwd ms':>8} {'fwd TF/s':>9} {'bwd ms':>8} {'bwd TF/s':>9} {'e2e ms':>8} "
          f"{'fwd GiB':>8} {'f+b GiB':>8} {'skipped':>8}")


def _print_row(r):
    if "error" in r:
        print(f"{r['method']:13} {r['T']:>6} ERROR {r['error']}")
        return
    skipped = f"{r['tiles_skipped']:.1%}" if r.get("tiles_skipped") is not None else "-"
    print(f"{r['method']:13} {r['T']:>6} {_fmt(r.get('fwd_ms'), '8.2f')} {_fmt(r.get('fwd_tflops'), '9.1f')} "
          f"{_fmt(r.get('bwd_ms'), '8.2f')} {_fmt(r.get('bwd_tflops'), '9.1f')} {_fmt(r.get('e2e_ms'), '8.2f')} "
          f"{_fmt(r.get('fwd_peak_gib'), '8.2f')} {_fmt(r.get('fwd_bwd_peak_gib'), '8.2f')} {skipped:>8}", flush=True)
    for key in ("fwd_error", "bwd_error", "e2e_error"):
        if key in r:
            print(f"{'':13} {'':>6} {key}: {r[key]}")


def check_cpu(args):
    """Interpreter run of one small OpenMementos-shaped case (lengths scaled down 10x)."""
    T, B, Hq, Hkv, D = 300, 1, 4, 2, 32
    mf = openmementos_mask_from(T, prompt=20, block=115, memento=19, seed=args.seed)[None]
    records = []
    for dtype_name in ("fp32", "bf16"):
        dtype = _DTYPES[dtype_name]
        t0 = time.time()
        errs = _check_small(mf, B, Hq, Hkv, D, dtype, args.seed)
        secs = time.time() - t0
        bm_, bn_, _, _ = _config(D, dtype, False, None, None)["fwd"]
        rec = {"method": "ours_memento", "device": "cpu (Triton interpreter)", "T": T, "B": B, "Hq": Hq, "Hkv": Hkv,
               "D": D, "dtype": dtype_name, "max_abs_err": errs, "seconds": secs,
               "tiles_skipped": tile_stats(mf, T, bm_, bn_)["skipped_fraction"], "visible_pairs": visible_pairs(mf)}
        tol = 1e-4 if dtype == torch.float32 else 1e-1
        rec["ok"] = all(e <= tol for e in errs.values())
        records.append(rec)
    if not args.json:
        print("No CUDA device: ran the kernels under the Triton interpreter on one small shape.")
        print("Timings here mean nothing; this only checks that the benchmark path works.")
        for r in records:
            print(f"  {r['dtype']}: T={T} Hq={Hq} Hkv={Hkv} D={D}  max |err| vs reference "
                  + ", ".join(f"{n}={e:.1e}" for n, e in r["max_abs_err"].items())
                  + f"  tiles skipped {r['tiles_skipped']:.1%}  {'OK' if r['ok'] else 'MISMATCH'}")
    return records


def tile_report(seq_lens, D=128, dtype=torch.bfloat16, sm=(9, 0), reps=5) -> list[dict]:
    """For OpenMementos-shaped masks: each kernel's skipped / full / partial share of the
    causal tiles under its default CUDA tiling; the visiting lists' memory, dense [B, R, C]
    (tile_lists) against compressed (csr_lists, what the kernels read), forward + dQ + dK/dV;
    and the time to build all three on this machine's device as a TileMask does, once per
    batch. Needs no GPU. Paper §4."""
    out = []
    cfg = _config(D, dtype, True, None, None, sm)
    for T in seq_lens:
        mf = openmementos_mask_from(T)[None]
        dense = csr = 0
        for kernel, (bm, bn, _, _) in cfg.items():
            st = tile_stats(mf, T, bm, bn)
            sched = tile_schedule(mf, T, bm, bn)
            sched = sched.transpose(1, 2) if kernel == "dkdv" else sched
            dense += sum(t.numel() * t.element_size() for t in tile_lists(sched))
            csr += sum(t.numel() * t.element_size() for t in csr_lists(sched))
            causal = st["causal_tiles"]
            out.append({"T": T, "kernel": kernel, "block_m": bm, "block_n": bn, "causal_tiles": causal,
                        "skipped": st["skipped"] / causal, "full": st["full"] / causal, "partial": st["partial"] / causal})
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            TileMask(mf).lists(cfg)
            times.append(time.perf_counter() - t0)
        out.append({"T": T, "kernel": "all", "dense_list_bytes": dense, "csr_list_bytes": csr,
                    "tile_mask_ms": 1e3 * statistics.median(times)})
    return out


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators that compute (views excluded): on a GPU each is one kernel
    launch, so this is the launch count of the code it wraps, read on any device."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def launch_report(T: int, layers: int, D=128, dtype=torch.bfloat16, sm=(9, 0)) -> dict:
    """List-building launches per training step of a `layers`-layer model at T tokens
    (OpenMementos-shaped mask, the default CUDA tilings). Before the TileMask, each layer
    built its forward, dQ and dK/dV lists itself (tile_schedule + tile_lists: 3 builds per
    layer, 4 with checkpointing's recompute of the forward); now one TileMask per batch builds
    them together. Operators counted here, builds per step as the two designs make them (the
    new one checked by tests/test_kernel.py). Paper §4."""
    mf = openmementos_mask_from(T)[None]
    cfg = _config(D, dtype, True, None, None, sm)
    per_kernel = {}
    for kernel, (bm, bn, _, _) in cfg.items():
        with _CountOps() as c:
            sched = tile_schedule(mf, T, bm, bn)
            tile_lists(sched.transpose(1, 2) if kernel == "dkdv" else sched)
        per_kernel[kernel] = c.ops
    with _CountOps() as c:
        TileMask(mf).lists(cfg)
    before = layers * sum(per_kernel.values())
    return {"T": T, "layers": layers, "ops_per_layer_build": per_kernel, "before": before,
            "before_checkpointing": before + layers * per_kernel["fwd"], "after": c.ops}


def main(argv=None):
    """Command line: CUDA timings table (or --json records); on a CPU one small interpreted
    correctness run whose timings mean nothing."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="4096,8192,16384,32768", help="comma-separated T values")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32, help="query heads Hq")
    ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads Hkv")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON record per line instead of a table")
    ap.add_argument("--save", default=None, help="also write all records as a JSON list to this file")
    ap.add_argument("--layers", type=int, default=36, help="--tiles: layers of the model whose training step is counted")
    ap.add_argument("--tiles", action="store_true",
                    help="only tile shares and list-building time per kernel (CUDA tilings, bf16, --head-dim; no GPU needed)")
    args = ap.parse_args(argv)
    args.seq_lens = [int(x) for x in args.seq_lens.split(",") if x]
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.heads % args.kv_heads:
        ap.error("--heads must be a multiple of --kv-heads")

    if args.tiles:
        records = tile_report(args.seq_lens, args.head_dim)
        records += [launch_report(T, args.layers, args.head_dim) for T in args.seq_lens]
        if not args.json:
            print(f"OpenMementos-shaped masks, tiles of the default CUDA configs (bf16, D={args.head_dim}, sm_90); "
                  f"lists built on {'cuda' if torch.cuda.is_available() else 'cpu'}")
            print(f"{'T':>7} {'kernel':6} {'tile':>7} {'causal tiles':>12} {'skipped':>8} {'full':>6} {'partial':>8}")
            for r in records:
                if "layers" in r:
                    print(f"{r['T']:>7} list-building launches per training step of {r['layers']} layers: before "
                          f"{r['before']:,} ({r['before_checkpointing']:,} with checkpointing), after {r['after']:,} "
                          f"(per layer before: {r['ops_per_layer_build']})")
                    continue
                if r["kernel"] == "all":
                    print(f"{r['T']:>7} lists of the three kernels: dense {r['dense_list_bytes'] / 2**20:.2f} MiB, "
                          f"compressed {r['csr_list_bytes'] / 2**20:.3f} MiB; one TileMask build "
                          f"{r['tile_mask_ms']:.1f} ms")
                    continue
                print(f"{r['T']:>7} {r['kernel']:6} {r['block_m']:>3}x{r['block_n']:<3} {r['causal_tiles']:>12,} "
                      f"{r['skipped']:>8.1%} {r['full']:>6.1%} {r['partial']:>8.1%}")
    elif torch.cuda.is_available():
        records = bench_cuda(args)
    else:
        records = check_cpu(args)
    if args.json:
        for r in records:
            print(json.dumps(r))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(records, f, indent=1)
    if not torch.cuda.is_available() and not all(r.get("ok", True) for r in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
