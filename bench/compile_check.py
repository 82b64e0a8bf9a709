"""Compile the Triton kernels for an NVIDIA target without a GPU, as a real launch would.

Uses Triton's own compiler and the ptxas / cuobjdump bundled with the Triton wheel, so it runs
on a CPU-only machine. Each kernel is compiled with the default launch config
memento_flash_attention picks on CUDA and with the specialization a launch on aligned tensors
gets (pointers and strides divisible by 16, as triton's JITFunction specializes them), and
the table reports per kernel: registers per thread, stack bytes (spills), shared memory, and
whether the main loop is software-pipelined: asynchronous copies in the TTGIR
(`async_copy_global_to_local`, TMA loads) and the asynchronous loads they lower to: cp.async /
cp.async.bulk.tensor in the PTX, which ptxas turns into LDGSTS / UTMALDG (with --sass, counted
in the SASS too, and any row where the two counts would disagree is reported).

    python bench/compile_check.py [--arch 90 | --arch 80,90] [--dtypes bf16,fp16,fp32] [--dims 64,128]
                                  [--page-size 16] [--strict] [--jobs 2] [--sass] [--json]

Kernels: the memento flash kernels (memento_kernels/memento_flash.py: fwd, fwd_pos, dq, dkdv) and the
paged-attention kernels (memento_kernels/paged_attention.py), each paged variant with the config
paged_attention launches: paged_dec (decode: GQA group x query positions <= 16 rows, split
KV), paged_dec1 (the same without split: the epilogue normalises and stores), paged_chunk
(prefill chunks: more rows, split KV), paged_chunk1 (no split), and paged_reduce (combines
the splits; it has no loop, so "pipelined" does not apply to it: n/a; its BM and BN columns
are the splits tile and D). Paged kernels compile at --page-size tokens per page.

The first row of each (dtype, head dim) is `reference`: a branch-free causal flash forward in
the style of Triton's fused-attention tutorial (written here, same tiles and stages as our
forward), the baseline that shows what this Triton pipelines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import memento_kernels.memento_flash as mf  # noqa: E402
import memento_kernels.paged_attention as pa  # noqa: E402

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DATA_PTRS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}
_INT_PTRS = {"MF", "KMAX", "KMIN", "KPMIN", "KPMAX", "QPOS", "KPOS", "FULL_NUM", "FULL_IDX", "PART_NUM", "PART_IDX",
             "PT", "CTX", "QLEN", "HIDE"}
_I64_PTRS = {"FULL_START", "PART_START"}
_F32_PTRS = {"LSE", "DELTA", "OP", "MP", "LP"}
# Strides that a launch does not get 16-divisible in general: the page table's row stride is
# max_pages, any number.
_UNALIGNED = {"s_pb"}
# Paged variants: (query rows per program's (row, kv head) = GROUP * W, SPLIT), as launched.
_PAGED = {"paged_dec": (8, True), "paged_dec1": (8, False), "paged_chunk": (128, True), "paged_chunk1": (128, False)}
_NO_LOOP = {"paged_reduce"}  # nothing to pipeline: one load of the partials, one store


@triton.jit
def _reference_inner(acc, l_i, m_i, q, k_base, v_base, start, end, offs_m, offs_n0, offs_d, s_kt, qk_scale,
                     BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    for k_start in range(start, end, BLOCK_N):
        offs_n = k_start + offs_n0
        kT = tl.load(k_base + offs_n[None, :] * s_kt + offs_d[:, None])
        v = tl.load(v_base + offs_n[:, None] * s_kt + offs_d[None, :])
        s = tl.dot(q, kT) * qk_scale
        if MASK:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _reference_causal_fwd(Q, K, V, O, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_ob, s_oh, s_ot, T, H, qk_scale,
                          HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Causal attention, the tutorial's way: an unmasked loop over the key tiles left of the
    # diagonal, then a masked loop over the diagonal ones. No data-dependent branch.
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :])
    k_base, v_base = K + b * s_kb + h * s_kh, V + b * s_kb + h * s_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    acc, l_i, m_i = _reference_inner(acc, l_i, m_i, q, k_base, v_base, 0, pid_m * BLOCK_M, offs_m, offs_n0, offs_d,
                                     s_kt, qk_scale, BLOCK_N, False)
    acc, l_i, m_i = _reference_inner(acc, l_i, m_i, q, k_base, v_base, pid_m * BLOCK_M, (pid_m + 1) * BLOCK_M, offs_m,
                                     offs_n0, offs_d, s_kt, qk_scale, BLOCK_N, True)
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


def _signature(fn, ptr_dt, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _INT_PTRS:
            sig[name] = "*i32"
        elif name in _I64_PTRS:
            sig[name] = "*i64"
        elif name in _F32_PTRS:
            sig[name] = "*fp32"
        elif name in _DATA_PTRS:
            sig[name] = "*" + ptr_dt
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _aligned(fn, sig):
    # What a launch on aligned tensors specializes: 16-byte aligned pointers, strides % 16 == 0.
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if sig[name].startswith("*") or (name.startswith("s_") and name not in _UNALIGNED)}


def _resources(cubin: bytes, sass: bool) -> dict:
    """Registers and stack (spill) bytes per thread from cuobjdump --dump-resource-usage (fast),
    and with `sass` the SASS instruction counts: LDGSTS (cp.async), UTMALDG (TMA load), HGMMA
    (Hopper's warpgroup MMA), HMMA (warp-level MMA). Dumping the SASS is the slowest part of a
    compile here (about 0.4 s of 1.8), hence optional: the PTX counts of the same instructions
    (_ptx_counts) give the same verdicts (`--sass` reports where they would not)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = {"regs": "?", "stack": "?"}
    if not os.path.exists(tool):
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        if sass:
            text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
            out.update(ldgsts=text.count("LDGSTS"), utmaldg=text.count("UTMALDG"), hgmma=text.count("HGMMA"),
                       hmma=text.count("HMMA"))
    for line in usage.splitlines():
        if "REG:" in line:
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            out["regs"], out["stack"] = int(fields.get("REG", -1)), int(fields.get("STACK", -1))
    return out


def _ptx_counts(ptx: str) -> dict:
    """The PTX instructions that ptxas turns into LDGSTS (cp.async to shared memory), UTMALDG
    (cp.async.bulk.tensor: a TMA load), HGMMA (wgmma.mma_async) and HMMA (mma.sync)."""
    tma = ptx.count("cp.async.bulk.tensor")
    return {"cp_async": ptx.count("cp.async.ca.shared") + ptx.count("cp.async.cg.shared"), "tma": tma,
            "wgmma_ops": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync")}


def _paged_launch(name: str, dtype: str, D: int, arch: int, page_size: int):
    # (kernel, constexprs, (BLOCK_M, BLOCK_N, num_warps, num_stages)) as paged_attention launches it.
    if name == "paged_reduce":
        consts = dict(HEAD_D=D, SPLITS_PAD=pa.MAX_SPLITS)
        return pa._paged_reduce_kernel, consts, (pa.MAX_SPLITS, D, pa._REDUCE_WARPS, 1)
    rows, split = _PAGED[name]
    bm, bn, warps, stages = pa.config(D, _DT[dtype], True, rows, capability(arch))
    # decode steps carry a hidden key range (the engine's asynchronous steps); prefill chunks never
    consts = dict(PAGE=page_size, HEAD_D=D, BLOCK_M=bm, BLOCK_N=bn, SPLIT=split, HAS_HIDE=name.startswith("paged_dec"),
                  UPCAST=False, IEEE=dtype == "fp32")
    return pa._paged_fwd_kernel, consts, (bm, bn, warps, stages)


def compile_kernel(name: str, dtype: str, D: int, arch: int, page_size: int = 16, sass: bool = False) -> dict:
    """Compile one kernel (fwd, fwd_pos, dq, dkdv, reference, or a paged one: paged_dec,
    paged_dec1, paged_chunk, paged_chunk1, paged_reduce at page_size) for sm_{arch} with its
    default CUDA config and aligned-launch specialization; returns its figures (the PTX counts
    of _ptx_counts, and with `sass` the SASS counts too). Raises what Triton raises if it does
    not compile."""
    if name in _PAGED or name in _NO_LOOP:
        fn, consts, (bm, bn, warps, stages) = _paged_launch(name, dtype, D, arch, page_size)
    else:
        cfg = mf._config(D, _DT[dtype], True, None, None, capability(arch))
        fn = {"fwd": mf._fwd_kernel, "fwd_pos": mf._fwd_kernel, "dkdv": mf._bwd_dkdv_kernel, "dq": mf._bwd_dq_kernel,
              "reference": _reference_causal_fwd}[name]
        bm, bn, warps, stages = cfg["fwd" if name in ("fwd_pos", "reference") else name]
        consts = dict(HEAD_D=D, BLOCK_M=bm, BLOCK_N=bn)
        if name != "reference":
            consts.update(UPCAST=False, IEEE=dtype == "fp32")
        if fn is mf._fwd_kernel:
            consts["HAS_POS"] = name == "fwd_pos"
    sig = _signature(fn, dtype, consts)
    t0 = time.time()
    c = triton.compile(ASTSource(fn, sig, consts, attrs=_aligned(fn, sig)), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    ttgir = c.asm["ttgir"]
    return {"kernel": name, "dtype": dtype, "D": D, "arch": arch, "page_size": page_size if fn is pa._paged_fwd_kernel
            else None, "block_m": bm, "block_n": bn, "warps": warps,
            "stages": stages, "smem": c.metadata.shared, **_resources(c.asm["cubin"], sass), **_ptx_counts(c.asm["ptx"]),
            "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
            "seconds": round(time.time() - t0, 1)}


def capability(arch: int) -> tuple[int, int]:
    """--arch N as a compute capability: 90 -> (9, 0), 86 -> (8, 6), 120 -> (12, 0)."""
    return arch // 10, arch % 10


def smem_limit(arch: int) -> int:
    """Shared memory per block of the architecture family of sm_{arch} (memento_flash.ARCH_SMEM)."""
    return mf.ARCH_SMEM[mf.arch_family(capability(arch))]


def wgmma(row: dict, sass: bool | None = None) -> bool | None:
    """On sm_90, whether the kernel's dots compiled to warpgroup MMA (HGMMA in the SASS, or
    wgmma.mma_async in the PTX); None elsewhere. sass: which count (default: SASS if there)."""
    if row["arch"] != 90:
        return None
    sass = "hgmma" in row if sass is None else sass
    return (row["hgmma"] if sass else row["wgmma_ops"]) > 0


def pipelined(row: dict, sass: bool | None = None) -> bool:
    """The main loop's loads are asynchronous: async copies in the TTGIR, and cp.async / TMA
    loads in the SASS (LDGSTS / UTMALDG) or the PTX they come from. sass: which count
    (default: SASS if the row has it)."""
    sass = "ldgsts" in row if sass is None else sass
    loads = row["ldgsts"] + row["utmaldg"] if sass else row["cp_async"] + row["tma"]
    return row["async_copies"] > 0 and loads > 0


def acceptable(row: dict) -> bool:
    """What --strict demands of a kernel of ours: no spills, within smem_limit(arch), and a
    pipelined main loop (kernels without a loop: only the first two)."""
    return (row["stack"] == 0 and row["smem"] <= smem_limit(row["arch"])
            and (row["kernel"] in _NO_LOOP or pipelined(row)))


# Largest tiles first; the search keeps the first that compiles pipelined, without spills, and
# within the shared memory of every GPU of the architecture family (memento_flash.ARCH_SMEM).
CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 2),
            (32, 32, 4, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
    "dq": [(128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 8, 2), (16, 16, 4, 2)],
    "dkdv": [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 8, 2), (32, 32, 4, 2),
             (16, 32, 8, 2), (16, 16, 4, 2)],
}


def search(dtype: str, D: int, arch: int) -> dict:
    """The launch config of each kernel for (dtype, D, sm_{arch}): the first of CANDIDATES
    that compiles software-pipelined, spill-free and within smem_limit(arch) (the forward must
    satisfy this in both forms). How memento_kernels/memento_flash._config's table was made."""
    real = mf._config
    picked = {}
    try:
        for kernel, cands in CANDIDATES.items():
            picked[kernel] = None
            for cfg in cands:
                mf._config = lambda *a, cfg=cfg, **kw: {"fwd": cfg, "dq": cfg, "dkdv": cfg}
                ok = True
                for name in ([kernel, "fwd_pos"] if kernel == "fwd" else [kernel]):
                    try:
                        r = compile_kernel(name, dtype, D, arch)
                    except Exception:  # a config Triton cannot compile is simply not a candidate
                        ok = False
                        break
                    if r["stack"] != 0 or r["smem"] > smem_limit(arch) or not pipelined(r):
                        ok = False
                        break
                if ok:
                    picked[kernel] = cfg
                    break
    finally:
        mf._config = real
    return picked


# Paged kernels: "dec" (BLOCK_N, num_warps, num_stages) with a 16-row query tile, "chunk"
# (BLOCK_M, BLOCK_N, num_warps, num_stages); larger tiles and deeper pipelines first.
PAGED_CANDIDATES = {
    "dec": [(64, 4, 3), (64, 4, 2), (64, 8, 3), (64, 8, 2), (32, 4, 3), (32, 4, 2), (32, 8, 3), (32, 8, 2),
            (16, 4, 3), (16, 4, 2), (16, 8, 2)],
    "chunk": [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3), (64, 32, 8, 2),
              (32, 64, 8, 3), (32, 64, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 8, 3), (16, 64, 8, 2),
              (32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2), (16, 16, 4, 2)],
}
PAGED_SEARCH_PAGES = (16, 64)  # tiles of several pages, and part of a page


def search_paged(dtype: str, D: int, arch: int) -> dict:
    """The paged-attention launch configs for (dtype, D, sm_{arch}): for "dec" and "chunk" the
    first of PAGED_CANDIDATES whose kernel, with and without split, compiles acceptable() at
    every page size of PAGED_SEARCH_PAGES. How paged_attention._CUDA_CONFIGS was made."""
    real = pa.config
    picked = {}
    try:
        for kind, cands in PAGED_CANDIDATES.items():
            picked[kind] = None
            for cand in cands:
                if kind == "dec":
                    pa.config = lambda *a, c=cand, **kw: (16, *c)
                else:
                    pa.config = lambda *a, c=cand, **kw: c
                ok = True
                for ps in PAGED_SEARCH_PAGES:
                    for name in (f"paged_{kind}", f"paged_{kind}1"):
                        try:
                            ok = acceptable(compile_kernel(name, dtype, D, arch, ps))
                        except Exception:  # a config Triton cannot compile is simply not a candidate
                            ok = False
                        if not ok:
                            break
                    if not ok:
                        break
                if ok:
                    picked[kind] = cand
                    break
    finally:
        pa.config = real
    return picked


def loads(row: dict) -> int:
    """Asynchronous global-to-shared loads: LDGSTS + UTMALDG in the SASS if counted, else the
    cp.async + cp.async.bulk.tensor instructions of the PTX."""
    return row["ldgsts"] + row["utmaldg"] if "ldgsts" in row else row["cp_async"] + row["tma"]


def _yes(flag) -> str:
    return "n/a" if flag is None else "yes" if flag else "NO"


def _compile_row(task: tuple) -> tuple[tuple, dict | str]:
    """One compile of main's table, in a worker process: (task, figures) or (task, error line)."""
    name, dt, D, arch, page_size, sass = task
    try:
        return task, compile_kernel(name, dt, D, arch, page_size, sass)
    except Exception as e:  # report and go on: one bad config should not hide the rest
        return task, f"FAILED: {type(e).__name__}: {str(e)[:300]}"


def main():
    """Compile every kernel config for each --arch and print one row per kernel (rows in a fixed
    order whatever --jobs is); exit 1 under --strict if any kernel of ours is not acceptable."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90",
                    help="SM version(s), comma-separated: 80, 86, 89, 90, 100 or 120 (each family has its own "
                         "config table)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--dims", default="16,32,64,128,256")
    ap.add_argument("--kernels", default="reference,fwd,fwd_pos,dq,dkdv,paged_dec,paged_dec1,paged_chunk,paged_chunk1,"
                                         "paged_reduce")
    ap.add_argument("--page-size", type=int, default=16, help="tokens per page for the paged kernels")
    ap.add_argument("--jobs", type=int, default=1,
                    help="compiles at once, in worker processes (each compile is one core: Triton, then ptxas)")
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel")
    ap.add_argument("--search", action="store_true", help="print the config table _config holds (slow: minutes)")
    ap.add_argument("--search-paged", action="store_true",
                    help="print the config table memento_kernels/paged_attention._CUDA_CONFIGS holds (slow: minutes)")
    ap.add_argument("--sass", action="store_true",
                    help="count LDGSTS / UTMALDG / HGMMA in the SASS too (slower) and report any row where the PTX "
                         "counts would give another verdict")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 if a kernel of ours spills, exceeds the family's shared memory or has a main loop not pipelined")
    args = ap.parse_args()
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        ap.error(f"--arch {args.arch}: use SM versions such as 80 or 80,90")
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: use 1 or more")
    if args.search or args.search_paged:
        for arch in archs:
            for dt in args.dtypes.split(","):
                for D in map(int, args.dims.split(",")):
                    picked = search(dt, D, arch) if args.search else search_paged(dt, D, arch)
                    print(json.dumps({"dtype": dt, "D": D, "arch": arch, **picked}), flush=True)
        return
    head = (f"{'dtype':5} {'D':>4} {'kernel':12} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} {'smem':>7} "
            f"{'regs':>5} {'stack':>5} {'async':>5} {'loads' if not args.sass else 'LDGSTS':>6} {'pipelined':>9} "
            f"{'wgmma':>5} {'s':>5}")
    tasks = [(name, dt, D, arch, args.page_size, args.sass) for arch in archs for dt in args.dtypes.split(",")
             for D in map(int, args.dims.split(",")) for name in args.kernels.split(",")]
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.jobs)
        results = pool.map(_compile_row, tasks)
    else:
        pool, results = None, map(_compile_row, tasks)
    failures, disagree, arch_seen, t0 = 0, 0, None, time.time()
    for (name, dt, D, arch, _, _), r in results:
        if arch != arch_seen and not args.json:
            print(f"sm_{arch}, pointers and strides specialized as 16-divisible (an aligned launch); "
                  f"paged kernels at page size {args.page_size}")
            print(head)
        arch_seen = arch
        if isinstance(r, str):
            failures += 1
            print(f"{dt:5} {D:>4} {name:12} {r}")
            continue
        if args.strict and name != "reference" and not acceptable(r):
            failures += 1
        if args.sass and (pipelined(r, True) != pipelined(r, False) or wgmma(r, True) != wgmma(r, False)):
            disagree += 1
            print(f"{dt:5} {D:>4} {name:12} PTX and SASS counts disagree: {r}")
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        piped = "n/a" if name in _NO_LOOP else "yes" if pipelined(r) else "NO"
        print(f"{dt:5} {D:>4} {name:12} {r['block_m']:>4} {r['block_n']:>4} {r['warps']:>5} {r['stages']:>6} "
              f"{r['smem']:>7} {r['regs']:>5} {r['stack']:>5} {r['async_copies']:>5} {loads(r):>6} "
              f"{piped:>9} {_yes(wgmma(r)):>5} {r['seconds']:>5}", flush=True)
    if pool is not None:
        pool.shutdown()
    if not args.json:
        print(f"{len(tasks)} compiles for sm_{', sm_'.join(map(str, archs))} in {time.time() - t0:.0f} s "
              f"with {args.jobs} job(s); {failures} not acceptable" + (" (--strict)" if args.strict else "")
              + (f"; PTX and SASS verdicts disagree on {disagree} row(s)" if args.sass else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
