"""Compile the memento flash kernels for an NVIDIA target without a GPU (ahead-of-time check).

Uses Triton's own compiler and the ptxas bundled with the Triton wheel, so it runs on a
CPU-only machine. For every dtype x head dim x kernel it reports the shared memory, and,
when cuobjdump is available, registers per thread and stack (spill) bytes of the default
launch config that memento_flash_attention would use on CUDA.

    python bench/compile_check.py [--arch 90] [--dtypes bf16,fp16,fp32] [--dims 64,128]
"""
from __future__ import annotations

import argparse
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
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels.memento_flash as mf  # noqa: E402

_PTR_ARGS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _signature(fn, ptr_dt, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _PTR_ARGS:
            sig[name] = "*" + ptr_dt
        elif name in ("MF", "KMAX", "KMIN", "QPOS", "KPOS", "KPMIN", "KPMAX"):
            sig[name] = "*i32"
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _resource_usage(cubin: bytes):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "?", "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            return fields.get("REG", "?"), fields.get("STACK", "?")
    return "?", "?"


def main():
    """Compile every kernel config for --arch with Triton's bundled ptxas (no GPU needed) and
    print registers and spills per kernel."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 or 90")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--dims", default="16,32,64,128,256")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    # fwd_pos: the forward with explicit positions (queries against a KV cache, inference).
    kernels = {"fwd": mf._fwd_kernel, "fwd_pos": mf._fwd_kernel, "dkdv": mf._bwd_dkdv_kernel, "dq": mf._bwd_dq_kernel}
    print(f"{'dtype':5} {'D':>4} {'kernel':7} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} {'smem':>7} {'regs':>5} {'stack':>5} {'compile_s':>9}")
    failures = 0
    for dt in args.dtypes.split(","):
        for D in map(int, args.dims.split(",")):
            cfg = mf._config(D, _DT[dt], True, None, None, args.arch // 10)
            for name, fn in kernels.items():
                bm, bn, warps, stages = cfg[name.removesuffix("_pos")]
                consts = dict(HEAD_D=D, BLOCK_M=bm, BLOCK_N=bn, UPCAST=False, IEEE=(dt == "fp32"))
                if fn is mf._fwd_kernel:
                    consts["HAS_POS"] = name == "fwd_pos"
                t0 = time.time()
                try:
                    c = triton.compile(ASTSource(fn, _signature(fn, dt, consts), consts), target=target,
                                       options=dict(num_warps=warps, num_stages=stages))
                except Exception as e:  # report and go on: one bad config should not hide the rest
                    failures += 1
                    print(f"{dt:5} {D:>4} {name:7} FAILED: {type(e).__name__}: {str(e)[:300]}")
                    continue
                regs, stack = _resource_usage(c.asm["cubin"])
                print(f"{dt:5} {D:>4} {name:7} {bm:>4} {bn:>4} {warps:>5} {stages:>6} {c.metadata.shared:>7} {regs:>5} {stack:>5} {time.time() - t0:>9.1f}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
