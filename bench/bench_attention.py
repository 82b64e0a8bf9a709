"""Benchmark memento attention (paper §4) against SDPA and FlexAttention.

On CUDA, for each sequence length (default 4K, 8K, 16K, 32K; B=1, Hq=32, Hkv=8, D=128,
bf16) it times forward and forward+backward and records peak memory for:

    sdpa_mask     torch SDPA with the dense [T, T] boolean memento mask
    sdpa_causal   torch SDPA, is_causal=True, no mask (lower bound of the dense approach)
    flex          FlexAttention with the memento rule as mask_mod (if it imports)
    ours_causal   kernels.memento_flash with mask_from all NEVER (pure causal)
    ours_memento  kernels.memento_flash with the memento mask_from

The memento mask is shaped like OpenMementos traces: a ~200-token prompt, then blocks of
~1,150 tokens each followed by a ~194-token memento, keep_last_n_blocks=0 (the content of
block b is masked from the position of the <|summary_end|> that ends its memento).

TFLOP/s count only visible (query, key) pairs of each method's own mask:
4 * D * visible_pairs * Hq * B for the forward, 2.5x that for the backward. Peak memory is
what the method allocates on top of q, k, v (and dO), its own mask included.

Without CUDA it runs the kernel under the Triton interpreter on one small shape, checks it
against the dense reference and says so; timings there mean nothing.

    python bench/bench_attention.py [--seq-lens 4096,8192] [--json] [--save FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from blocks import NEVER  # noqa: E402
from kernels.memento_flash import _config, memento_flash_attention, tile_lists, tile_schedule, tile_stats  # noqa: E402
from memento_attention import attention_reference  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("sdpa_mask", "sdpa_causal", "flex", "ours_causal", "ours_memento")


def openmementos_mask_from(T, prompt=200, block=1150, memento=194, jitter=0.25, seed=0):
    """mask_from [T] int32 for one OpenMementos-shaped trace, keep_last_n_blocks=0.

    Layout: prompt, <think>, then per block <|block_start|> content <|block_end|>
    <|summary_start|> memento <|summary_end|>. Content and memento lengths are drawn
    uniformly within +-jitter of the given means (seeded). The content of every completed
    block is masked from its <|summary_end|> position on (delimiters stay visible); a block
    whose memento does not end before T is never masked.
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


def visible_pairs(mask_from):
    """Number of visible (query, key) pairs of a [B, T] mask_from (exact, O(T))."""
    T = mask_from.shape[-1]
    j = torch.arange(T, device=mask_from.device)
    return int((mask_from.long().clamp(max=T) - j).clamp(min=0).sum())


def dense_mask(mask_from):
    """[B, 1, T, T] bool: True where query i may see key j (for SDPA)."""
    T = mask_from.shape[-1]
    i = torch.arange(T, device=mask_from.device)
    return ((i[None, :] <= i[:, None])[None] & (i[None, :, None] < mask_from[:, None, :]))[:, None]


def _time_ms(fn, warmup, reps):
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


def _peak_bytes(fn, base):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def matmul_peak_tflops(dtype, n=8192, reps=20, device="cuda"):
    """Dense n x n x n matmul throughput in TFLOP/s: the device's practical ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _time_ms(lambda: a @ b, 5, reps)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _build_method(name, q, k, v, mf, group):
    """Return (forward callable, visible pairs, tile info) for one method; state it builds
    (masks) is allocated here so that the caller's peak-memory window covers it."""
    T = q.shape[2]
    B = q.shape[0]
    causal_pairs = B * T * (T + 1) // 2
    if name == "sdpa_mask":
        mask = dense_mask(mf)

        def fwd(q, k, v):
            # Explicit K/V expansion: SDPA's fused kernels that take an arbitrary mask do not
            # all take GQA, and the math fallback would materialise [B, Hq, T, T] scores.
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  attn_mask=mask)
        return fwd, visible_pairs(mf), None, mask
    if name == "sdpa_causal":
        def fwd(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
        return fwd, causal_pairs, None, None
    if name == "flex":
        # imported here: FlexAttention needs a torch with torch.compile support for this device
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx < mf[b, kv_idx])
        bm = create_block_mask(mask_mod, B, None, T, T, device=q.device)
        info = None
        try:
            nb = math.ceil(T / bm.BLOCK_SIZE[1])
            visited = int(bm.kv_num_blocks.sum()) + (int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0)
            info = {"tile": list(bm.BLOCK_SIZE), "skipped_fraction": 1 - visited / (B * nb * (nb + 1) / 2)}
        except Exception:  # BlockMask internals differ across torch versions; the timing does not depend on this
            pass

        def fwd(q, k, v):
            return flex(q, k, v, block_mask=bm, enable_gqa=group > 1)
        return fwd, visible_pairs(mf), info, bm
    if name in ("ours_causal", "ours_memento"):
        use = mf if name == "ours_memento" else torch.full_like(mf, NEVER)
        major = torch.cuda.get_device_capability(q.device)[0] if q.is_cuda else 0
        bm_, bn_, _, _ = _config(q.shape[-1], q.dtype, q.is_cuda, None, None, major)["fwd"]
        st = tile_stats(use, T, bm_, bn_)
        info = {"tile": [bm_, bn_], "skipped_fraction": st["skipped_fraction"]}

        def fwd(q, k, v):
            return memento_flash_attention(q, k, v, use)
        return fwd, visible_pairs(use), info, use
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
    then per (method, T): visible_pairs, tiles_skipped (fraction), fwd_ms, fwd_tflops,
    fwd_peak_gib, fwd_bwd_ms, fwd_bwd_tflops, fwd_bwd_peak_gib (TFLOP/s counted on visible
    pairs only). A method or pass that fails (e.g. out of memory for the dense mask) records
    its error string instead, and the others still run.
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
        q = torch.randn(B, Hq, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
        k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
        v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
        do = torch.randn(B, Hq, T, D, device=device, dtype=dtype, generator=g)
        for name in args.methods:
            rec = {"method": name, "T": T, "B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": args.dtype}
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            fwd = state = None
            try:
                fwd, pairs, info, state = _build_method(name, q, k, v, mf, group)
                rec["visible_pairs"] = pairs
                rec["tiles_skipped"] = info["skipped_fraction"] if info else None
                flops_fwd = 4 * D * pairs * Hq

                def run_fwd():
                    with torch.no_grad():
                        fwd(q.detach(), k.detach(), v.detach())

                def run_fwd_bwd():
                    out = fwd(q, k, v)
                    torch.autograd.grad(out, (q, k, v), do)

                # Forward and forward+backward are measured separately so that a backward
                # failure (OOM of a dense baseline, say) keeps the forward numbers.
                for key, fn, flops in (("fwd", run_fwd, flops_fwd), ("fwd_bwd", run_fwd_bwd, 3.5 * flops_fwd)):
                    try:
                        rec[f"{key}_ms"] = _time_ms(fn, args.warmup, args.reps)
                        rec[f"{key}_tflops"] = flops / (rec[f"{key}_ms"] * 1e-3) / 1e12
                        rec[f"{key}_peak_gib"] = _peak_bytes(fn, base) / 2**30
                    except Exception as e:
                        rec[f"{key}_error"] = _err(e)
            except Exception as e:  # one failing baseline (OOM, missing backend) must not hide the others
                rec["error"] = _err(e)
            finally:
                fwd = state = None  # drop this method's mask before the next one is measured
            records.append(rec)
            if not args.json:
                _print_row(rec)
        del q, k, v, do
    return records


def _err(e):
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-".rjust(int(spec.split(".")[0]))


def _print_header(peak, dtype):
    print(f"dense {dtype} matmul peak: {peak:.0f} TFLOP/s (8192^3)")
    print(f"{'method':13} {'T':>6} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9} "
          f"{'fwd GiB':>8} {'f+b GiB':>8} {'skipped':>8}")


def _print_row(r):
    if "error" in r:
        print(f"{r['method']:13} {r['T']:>6} ERROR {r['error']}")
        return
    skipped = f"{r['tiles_skipped']:.1%}" if r.get("tiles_skipped") is not None else "-"
    print(f"{r['method']:13} {r['T']:>6} {_fmt(r.get('fwd_ms'), '8.2f')} {_fmt(r.get('fwd_tflops'), '9.1f')} "
          f"{_fmt(r.get('fwd_bwd_ms'), '8.2f')} {_fmt(r.get('fwd_bwd_tflops'), '9.1f')} "
          f"{_fmt(r.get('fwd_peak_gib'), '8.2f')} {_fmt(r.get('fwd_bwd_peak_gib'), '8.2f')} {skipped:>8}", flush=True)
    for key in ("fwd_error", "fwd_bwd_error"):
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


def tile_report(seq_lens, D=128, dtype=torch.bfloat16, sm=9, reps=5) -> list[dict]:
    """For OpenMementos-shaped masks: each kernel's skipped / full / partial share of the
    causal tiles under its default CUDA tiling, and the time to build its visiting lists
    (tile_schedule + tile_lists) on this machine's device. Needs no GPU."""
    out = []
    for T in seq_lens:
        mf = openmementos_mask_from(T)[None]
        for kernel, (bm, bn, _, _) in _config(D, dtype, True, None, None, sm).items():
            st = tile_stats(mf, T, bm, bn)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                sched = tile_schedule(mf, T, bm, bn)
                tile_lists(sched.transpose(1, 2) if kernel == "dkdv" else sched)
                times.append(time.perf_counter() - t0)
            causal = st["causal_tiles"]
            out.append({"T": T, "kernel": kernel, "block_m": bm, "block_n": bn, "causal_tiles": causal,
                        "skipped": st["skipped"] / causal, "full": st["full"] / causal, "partial": st["partial"] / causal,
                        "lists_ms": 1e3 * statistics.median(times)})
    return out


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
        if not args.json:
            print(f"OpenMementos-shaped masks, tiles of the default CUDA configs (bf16, D={args.head_dim}, sm_90); "
                  f"lists built on {'cuda' if torch.cuda.is_available() else 'cpu'}")
            print(f"{'T':>6} {'kernel':6} {'tile':>7} {'causal tiles':>12} {'skipped':>8} {'full':>6} {'partial':>8} {'lists ms':>9}")
            for r in records:
                print(f"{r['T']:>6} {r['kernel']:6} {r['block_m']:>3}x{r['block_n']:<3} {r['causal_tiles']:>12,} "
                      f"{r['skipped']:>8.1%} {r['full']:>6.1%} {r['partial']:>8.1%} {r['lists_ms']:>9.2f}")
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
