"""The first run on a CUDA GPU: is the Triton kernel right, and how fast is it (paper §4, §6.1)?

    python bench/gpu_check.py              # about ten minutes: every check, then timings at 4K/16K/32K
    python bench/gpu_check.py --quick      # under three minutes: the checks at 4K, timings at 4K
    bash bench/gpu_check.sh [--quick]      # the same, with the environment recorded

Correctness comes first, and every check has a threshold. summary.json (under --out,
default bench/results/gpu-<device>) holds each check's figures, threshold and verdict, and the
exit status is 1 if any failed. The steps, with what each is budgeted on one H100-class GPU
(full / --quick, in seconds; estimates made without a GPU: the summary records what each took
and flags a step over its budget):

    forward  (150 / 45)  the kernel in native bf16 and fp16 with the production tiles (the
                         default CUDA config) against a chunked fp32 reference (never a dense
                         T x T at 16K) and against FlexAttention with the same mask_mod:
                         T = 4,096 and 16,384 + 77, B = 2 rows with different masks; the
                         model's transposed layout; the positions form (a 512-query chunk
                         against a compacted 16K cache). Passes when the relative Frobenius
                         error is at most 2x the baseline's own error on the same inputs
                         (bf16/fp16 SDPA with the dense mask; `baseline`) + 1e-6, within the
                         same margin of Flex, the output is finite, and two runs are bitwise
                         identical.
    backward (60 / 25)   dQ, dK, dV at 4K (quick: 2K) the same way, against the fp32
                         reference's gradients and the baseline's, with a margin of 3x (the
                         backward rounds P and dS too).
    training (60 / 25)   20 (quick: 10) optimizer steps of a 2-layer Qwen3 with head dim 128 in
                         bf16 autocast, triton against sdpa from one initialization on the same
                         memento-masked batches: every step's losses within 2% of each other.
    paged    (30 / 15)   memento_kernels/paged_attention.py on decode steps and 16-query chunks over a
                         shuffled paged pool, against paged_attention_reference (fp32), the same
                         threshold against the baseline on each row's gathered K/V in bf16.
    graphs   (60 / -)    bench/bench_cuda_graphs.py: eager and CUDA-graph decoding give the
                         same tokens (its exit status).
    timings  (200 / 45)  bench/bench_attention.py: forward and backward separately, the
                         kernel alone (mask prebuilt) and end to end, against SDPA causal and
                         Flex (128x128, 128x64 block masks). Figures only, no verdict.

`--extended` adds, after those (no budget: minutes each), the kernel, real-path, paged and
decode-path test files run natively (pytest's exit status) and bench/memory.py --check (the
training-memory formula against measured CUDA steps; its figures in the summary).

`--tiny` runs the same checks at toy sizes on any device (on a CPU under the Triton
interpreter, TRITON_INTERPRET=1): how tests/test_gpu_check.py checks the checking logic.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_cases import openmementos_mask_from  # noqa: E402
from blocks import NEVER  # noqa: E402
from memento_kernels.memento_flash import memento_flash_attention  # noqa: E402
from memento_kernels.paged_attention import paged_attention, paged_attention_reference  # noqa: E402
from memento_attention import attention_reference, visible_mask  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARGIN, FLOOR = 2.0, 1e-6  # ours may err at most MARGIN x the baseline's error + FLOOR
# Gradients: the backward rounds P and dS to the input dtype as well, one rounding more per
# product than the baseline's autograd; measured at 1.96x on the interpreter's bf16 dQ.
GRAD_MARGIN = 3.0
LOSS_BAND = 0.02  # training: per-step relative difference of the two backends' losses

# Sizes per mode. H: (query heads, kv heads); mask: the OpenMementos-shaped layout (prompt,
# block, memento) scaled to T; budget: seconds per step (estimates for one H100-class GPU).
MODES = {
    "full": dict(T=(4096, 16384 + 77), cache=16384, chunk=512, H=(8, 2), D=128, grad_T=4096, train_T=2048,
                 train_steps=20, pool_ctx=4096, bench="4096,16384,32768", graphs=True,
                 budget=dict(forward=150, backward=60, training=60, paged=30, graphs=60, timings=200)),
    "quick": dict(T=(4096,), cache=4096, chunk=512, H=(8, 2), D=128, grad_T=2048, train_T=1024, train_steps=10,
                  pool_ctx=1024, bench="4096", graphs=False,
                  budget=dict(forward=45, backward=25, training=25, paged=15, timings=45)),
    "tiny": dict(T=(96, 128 + 13), cache=160, chunk=40, H=(4, 2), D=16, grad_T=96, train_T=96, train_steps=3,
                 pool_ctx=100, bench=None, graphs=False,
                 budget=dict(forward=300, backward=120, training=120, paged=120)),
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||x - ref|| / ||ref||, in fp64 (inf if x holds NaN/Inf). Paper §4, §6.1."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return math.inf
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def mask_rows(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """[B, T] int32 OpenMementos-shaped masks scaled to T (blocks ~T/14 tokens, mementos ~T/85),
    a different layout per row. Paper §4, §6.1."""
    scale = T / 16384
    return torch.stack([openmementos_mask_from(T, prompt=max(2, round(200 * scale)), block=max(4, round(1150 * scale)),
                                               memento=max(2, round(194 * scale)), seed=seed + 7 * b) for b in range(B)])


def cache_layout(B: int, Tk: int, Tq: int, seed: int = 0):
    """(q_pos [B, Tq], k_pos [B, Tk], mask_from [B, Tk]) of a chunk against a compacted cache:
    increasing key positions with gaps where blocks were evicted, some keys masked from a later
    position, the chunk's queries at the positions of the last Tq keys. Paper §4, §6.1."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(1, 40, (B, Tk), generator=g) * (torch.rand(B, Tk, generator=g) < 0.02)
    k_pos = torch.cumsum(1 + gaps, 1) - 1
    mf = torch.full((B, Tk), NEVER, dtype=torch.int64)
    later = torch.rand(B, Tk, generator=g) < 0.2
    mf[later] = (k_pos + 1 + torch.randint(0, 3 * Tq, (B, Tk), generator=g))[later]
    mf[:, -Tq:] = NEVER
    return k_pos[:, -Tq:].contiguous(), k_pos, mf


def reference(q, k, v, mask_from, q_pos=None, k_pos=None, chunk=512) -> torch.Tensor:
    """The fp32 dense reference (memento_attention.attention_reference), a chunk of queries at
    a time so that no [T, T] tensor exists; [B, Hq, Tq, D] fp32. Paper §4, §6.1."""
    B, _, Tq, _ = q.shape
    Tk = k.shape[2]
    if q_pos is None:
        q_pos = k_pos = torch.arange(Tk, device=q.device).expand(B, Tk)
    out = [attention_reference(q[:, :, i:i + chunk].float(), k.float(), v.float(), mask_from,
                               q_pos=q_pos[:, i:i + chunk], k_pos=k_pos) for i in range(0, Tq, chunk)]
    return torch.cat(out, 2)


def baseline(q, k, v, mask_from, q_pos=None, k_pos=None, chunk=512) -> torch.Tensor:
    """Standard attention in q's dtype with the dense boolean memento mask of each query chunk
    (K/V repeated for GQA): the error a standard low-precision implementation makes on the
    same inputs. On CUDA torch's SDPA (its fused kernels round P to q's dtype, as flash
    kernels do); elsewhere the plain computation in q's dtype (scores and P rounded to it,
    softmax in fp32): the CPU's SDPA keeps P in fp32, so it errs less than any kernel that
    rounds P, this one included. Paper §4, §6.1."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    if q_pos is None:
        q_pos = k_pos = torch.arange(Tk, device=q.device).expand(B, Tk)
    group = Hq // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = []
    for i in range(0, Tq, chunk):
        vis = visible_mask(q_pos[:, i:i + chunk].long(), k_pos.long(), mask_from.long())[:, None]
        if q.is_cuda:
            out.append(F.scaled_dot_product_attention(q[:, :, i:i + chunk], kr, vr, attn_mask=vis))
            continue
        s = (q[:, :, i:i + chunk] @ kr.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        p = torch.softmax(s.float().masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0).to(q.dtype)
        out.append(p @ vr)
    return torch.cat(out, 2)


def flex_output(q, k, v, mask_from, q_pos=None, k_pos=None):
    """FlexAttention with the memento rule as mask_mod (CUDA only; None elsewhere). Paper §4, §6.1."""
    if not q.is_cuda:
        return None
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # CUDA + torch.compile only

    # one compilation per shape and mask here: past dynamo's default limit of recompilations
    # Flex would fall back to its eager form, which materialises the scores
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    qp = torch.arange(Tq, device=q.device).expand(B, Tq) if q_pos is None else q_pos
    kp = torch.arange(Tk, device=q.device).expand(B, Tk) if k_pos is None else k_pos
    mf = mask_from.to(q.device)

    def mask_mod(b, h, qi, ki):
        return (kp[b, ki] <= qp[b, qi]) & (qp[b, qi] < mf[b, ki])
    bm = create_block_mask(mask_mod, B, None, Tq, Tk, device=q.device)
    return torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm, enable_gqa=Hq != k.shape[1])


def verdict(name: str, ours: float, baseline: float, margin: float = MARGIN, **extra) -> dict:
    """One check's record: ours passes when ours <= margin x baseline + FLOOR. Paper §4, §6.1."""
    limit = margin * baseline + FLOOR
    return {"check": name, "ok": bool(ours <= limit), "rel_err": ours, "baseline_rel_err": baseline,
            "threshold": limit, **extra}


def check_forward(sizes: dict, device, attend=memento_flash_attention) -> list[dict]:
    """The forward cases of the module docstring, for bf16 and fp16; `attend` is the kernel
    under test (a wrong one must fail: tests/test_gpu_check.py). Paper §4, §6.1."""
    Hq, Hkv = sizes["H"]
    D, chunk = sizes["D"], sizes["chunk"]
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        cases = []
        for T in sizes["T"]:
            mf = mask_rows(2, T).to(device)
            cases.append((f"T={T}, B=2, two masks", [torch.randn(2, h, T, D, device=device, generator=g).to(dtype)
                                                      for h in (Hq, Hkv, Hkv)], mf, None, None))
        T = sizes["T"][0]  # the model's layout: [B, T, H, D] viewed as [B, H, T, D]
        qkv = [torch.randn(2, T, h, D, device=device, generator=g).to(dtype).transpose(1, 2) for h in (Hq, Hkv, Hkv)]
        cases.append((f"T={T}, model layout [B, T, H, D]", qkv, mask_rows(2, T, seed=3).to(device), None, None))
        q_pos, k_pos, mf = (t.to(device) for t in cache_layout(2, sizes["cache"], chunk))
        qkv = [torch.randn(2, h, n, D, device=device, generator=g).to(dtype)
               for h, n in ((Hq, chunk), (Hkv, sizes["cache"]), (Hkv, sizes["cache"]))]
        cases.append((f"{chunk} queries against a compacted {sizes['cache']}-slot cache", qkv, mf, q_pos, k_pos))
        for what, (q, k, v), mf, q_pos, k_pos in cases:
            kw = {} if q_pos is None else {"q_pos": q_pos, "k_pos": k_pos}
            with torch.no_grad():
                ours = attend(q, k, v, mf, **kw)
                again = attend(q, k, v, mf, **kw)
                ref = reference(q, k, v, mf, q_pos, k_pos)
                base = rel_err(baseline(q, k, v, mf, q_pos, k_pos), ref)
                flex = flex_output(q, k, v, mf, q_pos, k_pos)
            rec = verdict(f"forward {str(dtype).removeprefix('torch.')}: {what}", rel_err(ours, ref), base,
                          finite=bool(torch.isfinite(ours).all()), deterministic=bool(torch.equal(ours, again)))
            if flex is not None:
                rec["flex_rel_err"] = rel_err(flex, ref)
                rec["vs_flex_rel_err"] = rel_err(ours, flex)
                rec["ok"] = rec["ok"] and rec["vs_flex_rel_err"] <= MARGIN * base + rec["flex_rel_err"] + FLOOR
            rec["ok"] = rec["ok"] and rec["finite"] and rec["deterministic"]
            out.append(rec)
    return out


def check_backward(sizes: dict, device, attend=memento_flash_attention) -> list[dict]:
    """dQ, dK, dV at grad_T for bf16 and fp16 against the fp32 reference's gradients, the
    threshold from the baseline's gradients; finite and bitwise repeatable. Paper §4, §6.1."""
    Hq, Hkv = sizes["H"]
    D, T = sizes["D"], sizes["grad_T"]
    g = torch.Generator(device=device).manual_seed(1)
    mf = mask_rows(2, T, seed=5).to(device)
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, do = (torch.randn(2, h, T, D, device=device, generator=g).to(dtype) for h in (Hq, Hkv, Hkv, Hq))

        def grads(fn, cast):
            x = [t.to(cast).requires_grad_() for t in (q, k, v)]
            return torch.autograd.grad(fn(*x), x, do.to(cast))
        ours = grads(lambda *x: attend(*x, mf), dtype)
        again = grads(lambda *x: attend(*x, mf), dtype)
        ref = grads(lambda *x: reference(*x, mf, chunk=T), torch.float32)
        base = grads(lambda *x: baseline(*x, mf, chunk=T), dtype)
        for name, a, b, r, s in zip(("dq", "dk", "dv"), ours, again, ref, base):
            rec = verdict(f"backward {str(dtype).removeprefix('torch.')}: {name} at T={T}", rel_err(a, r), rel_err(s, r),
                          GRAD_MARGIN, finite=bool(torch.isfinite(a).all()), deterministic=bool(torch.equal(a, b)))
            rec["ok"] = rec["ok"] and rec["finite"] and rec["deterministic"]
            out.append(rec)
    return out


def check_training(sizes: dict, device) -> list[dict]:
    """train_steps AdamW steps of one small Qwen3 (head dim 128 on a GPU) under bf16 autocast
    with the triton backend and with sdpa, from one initialization on the same batches: the
    per-step losses agree within LOSS_BAND. Paper §4, §6.1."""
    T, steps = sizes["train_T"], sizes["train_steps"]
    head_dim = 128 if device.type == "cuda" else sizes["D"]
    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=T)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 512, (2, T), generator=g), mask_rows(2, T, seed=11 * s)) for s in range(steps)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    losses = {}
    for backend in ("sdpa", "triton"):
        os.environ["MEMENTO_ATTN_BACKEND"] = backend
        torch.manual_seed(0)
        model = Qwen3(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[backend] = []
        for ids, mf in batches:
            with autocast:
                loss = model(ids.to(device), mask_from=mf.to(device), labels=ids.to(device)).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[backend].append(loss.item())
    os.environ.pop("MEMENTO_ATTN_BACKEND")
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["triton"], losses["sdpa"]))
    finite = all(math.isfinite(x) for x in losses["triton"])
    return [{"check": f"training: {steps} steps, triton vs sdpa, head dim {head_dim}", "ok": bool(worst <= LOSS_BAND and finite),
             "worst_rel_loss_diff": worst, "threshold": LOSS_BAND, "losses_triton": losses["triton"],
             "losses_sdpa": losses["sdpa"]}]


def check_paged(sizes: dict, device, attend=paged_attention) -> list[dict]:
    """Decode steps (1 query) and 16-query chunks over a shuffled paged pool against
    paged_attention_reference, the threshold from the baseline on the gathered K/V in bf16.
    Paper §4, §6.1."""
    Hq, Hkv = sizes["H"]
    D, page = sizes["D"], 16
    g = torch.Generator().manual_seed(3)
    out = []
    for W in (1, 16):
        B = 4
        ctx = torch.randint(W, sizes["pool_ctx"] + 1, (B,), generator=g)
        pages = [math.ceil(int(c) / page) for c in ctx]
        perm = torch.randperm(sum(pages), generator=g)
        table = torch.zeros(B, max(pages), dtype=torch.int32)
        used = 0
        for b, n in enumerate(pages):
            table[b, :n] = perm[used:used + n]
            used += n
        kc, vc = (torch.randn(Hkv, sum(pages) * page, D, generator=g).to(torch.bfloat16) for _ in range(2))
        q = torch.randn(B, Hq, W, D, generator=g).to(torch.bfloat16)
        args = [t.to(device) for t in (q, kc, vc, table, ctx.to(torch.int32))]
        ours = attend(*args, page_size=page)
        ref = paged_attention_reference(*[a.float() if a.is_floating_point() else a for a in args], page_size=page)
        base = []
        for b in range(B):  # the baseline over the row's gathered keys, its queries the last W positions
            slots = (table[b, :pages[b]].long()[:, None] * page + torch.arange(page)).flatten()[:int(ctx[b])].to(device)
            keys, vals = args[1][:, slots][None], args[2][:, slots][None]
            qpos = torch.arange(int(ctx[b]) - W, int(ctx[b]), device=device)[None]
            kpos = torch.arange(int(ctx[b]), device=device)[None]
            base.append(baseline(args[0][b:b + 1], keys, vals, torch.full_like(kpos, NEVER), qpos, kpos))
        rec = verdict(f"paged {'decode' if W == 1 else f'{W}-query chunk'}: bf16, {B} rows of up to {sizes['pool_ctx']} "
                      "tokens", rel_err(ours, ref), rel_err(torch.cat(base), ref), finite=bool(torch.isfinite(ours).all()))
        rec["ok"] = rec["ok"] and rec["finite"]
        out.append(rec)
    return out


def run_script(args: list[str], timeout: int) -> dict:
    """A repository script as a step: its exit status, last lines of output and JSON lines.
    Paper §4, §6.1."""
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return {"returncode": r.returncode, "tail": (r.stdout + r.stderr)[-2000:], "records": lines}


def run(mode: str, device: torch.device, attend=memento_flash_attention, paged=paged_attention,
        log=print, extended: bool = False) -> dict:
    """Every step of `mode` ("full", "quick" or "tiny") on `device`; returns the summary
    (checks, timings, steps with seconds and budgets, ok). attend / paged: the kernels under
    test (tests pass a wrong one to see the checks fail). extended: the native test files and
    the memory formula's check after the timings (CUDA only). Paper §4, §6.1."""
    sizes = MODES[mode]
    summary = {"mode": mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
               "torch": torch.__version__, "checks": [], "steps": [], "timings": []}
    steps = [("forward", lambda: check_forward(sizes, device, attend)),
             ("backward", lambda: check_backward(sizes, device, attend)),
             ("training", lambda: check_training(sizes, device)),
             ("paged", lambda: check_paged(sizes, device, paged))]
    if device.type == "cuda" and sizes["graphs"]:
        steps.append(("graphs", lambda: [_script_check("graphs: eager and CUDA-graph decoding give the same tokens",
                                                       run_script(["bench/bench_cuda_graphs.py"], 600))]))
    for name, fn in steps:
        t0 = time.time()
        try:
            records = fn()
        except Exception as e:  # a crash is a failed check, and the next step still runs
            records = [{"check": f"{name}: raised", "ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}]
        summary["checks"] += records
        summary["steps"].append(_step(name, t0, sizes))
        for r in records:
            log(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}" + _figures(r))
    if device.type == "cuda" and sizes["bench"]:
        t0 = time.time()
        r = run_script(["bench/bench_attention.py", "--json", "--seq-lens", sizes["bench"], "--methods",
                        "sdpa_causal,flex_128x128,flex_128x64,ours_causal,ours_memento"], 900)
        summary["timings"] = r["records"]
        summary["steps"].append(_step("timings", t0, sizes))
        for rec in r["records"]:
            if "fwd_ms" in rec or "error" in rec:
                log(f"time {rec['method']:13} T={rec['T']:>6} fwd {rec.get('fwd_ms', float('nan')):8.2f} ms  "
                    f"bwd {rec.get('bwd_ms', float('nan')):8.2f} ms  e2e {rec.get('e2e_ms', float('nan')):8.2f} ms"
                    + (f"  {rec['error']}" if "error" in rec else ""))
    if device.type == "cuda" and extended:
        for name, cmd, title in (
                ("tests", ["-m", "pytest", "-q", "tests/test_kernel.py", "tests/test_real_path.py",
                           "tests/test_paged_attention.py", "tests/test_decode_path.py"], "native test files pass"),
                ("memory", ["bench/memory.py", "--check", "--check-tokens", "2048"],
                 "the memory formula's check on CUDA runs")):
            t0 = time.time()
            rec = _script_check(f"{name}: {title}", run_script(cmd, 3600))
            summary["checks"].append(rec)
            summary["steps"].append(_step(name, t0, sizes))
            log(f"{'ok  ' if rec['ok'] else 'FAIL'} {rec['check']}")
    summary["ok"] = all(r["ok"] for r in summary["checks"])
    return summary


def _script_check(name: str, r: dict) -> dict:
    return {"check": name, "ok": r["returncode"] == 0, "returncode": r["returncode"], "tail": r["tail"]}


def _step(name: str, t0: float, sizes: dict) -> dict:
    seconds = time.time() - t0
    budget = sizes["budget"].get(name)
    return {"step": name, "seconds": round(seconds, 1), "budget_s": budget,
            "over_budget": budget is not None and seconds > budget}


def _figures(r: dict) -> str:
    if "rel_err" in r:
        return f"  rel err {r['rel_err']:.2e} (limit {r['threshold']:.2e}; baseline {r['baseline_rel_err']:.2e})"
    if "worst_rel_loss_diff" in r:
        return f"  worst loss difference {r['worst_rel_loss_diff']:.2%} (limit {r['threshold']:.0%})"
    return f"  {r.get('error', '')}"


def main(argv=None) -> int:
    """Command line; returns the exit status (0: every check passed, 1: one failed, 2: no GPU
    and no --tiny). Paper §4, §6.1."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sel = ap.add_mutually_exclusive_group()
    sel.add_argument("--quick", action="store_true", help="the checks at 4K and timings at 4K: under three minutes")
    sel.add_argument("--tiny", action="store_true", help="toy sizes on any device (the CPU interpreter): for tests")
    ap.add_argument("--extended", action="store_true",
                    help="then the kernel, paged and decode-path tests natively and the memory check (minutes more)")
    ap.add_argument("--out", default=None, help="folder for summary.json (default bench/results/gpu-<device>)")
    args = ap.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    if not torch.cuda.is_available() and mode != "tiny":
        print("bench/gpu_check.py: no CUDA device visible; run it on a GPU machine (or --tiny to check the logic)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-") if device.type == "cuda" else "cpu"
    out = Path(args.out or REPO / "bench" / "results" / f"gpu-{name}")
    t0 = time.time()
    summary = run(mode, device, extended=args.extended)
    summary["seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
    failed = [r["check"] for r in summary["checks"] if not r["ok"]]
    over = [s["step"] for s in summary["steps"] if s["over_budget"]]
    print(f"{len(summary['checks']) - len(failed)}/{len(summary['checks'])} checks passed in {summary['seconds']:.0f} s"
          + (f"; steps over budget: {', '.join(over)}" if over else "") + f"; summary in {out / 'summary.json'}")
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
