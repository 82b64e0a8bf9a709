"""bench/gpu_check.py's checking logic at toy sizes on the CPU (the Triton interpreter): the real
kernels pass every check, a kernel 5% off fails them, and the exit status and summary say so
(paper §4, §6.1)."""
import functools
import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

from memento_kernels.memento_flash import memento_flash_attention  # noqa: E402
from memento_kernels.paged_attention import paged_attention  # noqa: E402


def test_the_real_kernels_pass_every_check(tmp_path, capsys):
    assert gpu_check.main(["--tiny", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    kinds = {r["check"].split(":")[0].split()[0] for r in summary["checks"]}
    assert summary["ok"] and kinds == {"forward", "backward", "training", "paged"}
    assert len(summary["checks"]) == 17 and all(r["ok"] for r in summary["checks"])
    forward = [r for r in summary["checks"] if r["check"].startswith("forward")]
    assert all(r["deterministic"] and r["finite"] and r["rel_err"] <= r["threshold"] for r in forward)
    assert {s["step"] for s in summary["steps"]} == {"forward", "backward", "training", "paged"}
    assert all(s["budget_s"] and s["seconds"] >= 0 for s in summary["steps"])
    assert "17/17 checks passed" in capsys.readouterr().out


def test_a_kernel_five_percent_off_fails(tmp_path, monkeypatch, capsys):
    """Outputs (hence gradients) scaled by 1.05 (bf16 itself errs by ~0.5%): every forward,
    backward and paged check must fail, the training check (which runs the model's own
    kernels) still passes, and the exit status is 1 with the failures named."""
    def off(*a, **kw):
        return memento_flash_attention(*a, **kw) * 1.05

    def paged_off(*a, **kw):
        return paged_attention(*a, **kw) * 1.05
    monkeypatch.setattr(gpu_check, "run", functools.partial(gpu_check.run, attend=off, paged=paged_off))
    assert gpu_check.main(["--tiny", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    verdicts = {r["check"]: r["ok"] for r in summary["checks"]}
    assert not summary["ok"]
    assert [ok for c, ok in verdicts.items() if not c.startswith("training")] == [False] * 16
    assert verdicts["training: 3 steps, triton vs sdpa, head dim 16"]
    assert "FAILED: forward bfloat16" in capsys.readouterr().err


def test_without_a_gpu_it_says_so(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_attention_methods_kernel_alone_and_end_to_end_agree():
    """bench/bench_attention.py's timed callables, built on the CPU: for our kernel the one with
    its TileMask prebuilt (kernel alone) and the one building it per call (end to end) give the
    dense reference's output, as do SDPA's two; visible pairs counted exactly."""
    import bench_attention
    import torch
    from attention_cases import openmementos_mask_from, visible_pairs

    from memento_attention import attention_reference

    T = 300
    mf = openmementos_mask_from(T, prompt=10, block=90, memento=10)[None]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, 16, generator=g) for h in (4, 2, 2))
    ref = attention_reference(q, k, v, mf)
    for name in ("ours_memento", "sdpa_mask"):
        fwd, pairs, info, e2e = bench_attention._build_method(name, q, mf, 2)
        assert pairs == visible_pairs(mf) < T * (T + 1) // 2
        for attend in (fwd, e2e):
            assert torch.allclose(attend(q, k, v), ref, atol=1e-5)
    assert 0 < bench_attention._build_method("ours_memento", q, mf, 2)[2]["skipped_fraction"] < 1


def test_decode_benchmark_runs_quick(tmp_path):
    """bench/bench_decode_gpu.py --quick (tiny shapes, on the CPU here): every way of every batch
    size reports tok/s and a step time, the engine's ways a bandwidth and kernels per step, and
    Fig. 8's memento and full runs finish; the figures themselves are not asserted."""
    import os
    import subprocess

    out = tmp_path / "decode.json"
    r = subprocess.run([sys.executable, "bench/bench_decode_gpu.py", "--quick", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {(x["B"], x["way"]) for x in res["decode"]}
    assert rows == {(b, w) for b in (1, 4) for w in ("graphs", "eager", "HF")}
    for x in res["decode"]:
        assert x["tok_per_s"] > 0
        if x["way"] != "HF":
            assert x["step_ms"] > 0 and x["kernels_per_step"] > 0 and 0 < x["bandwidth"]
            assert x["rows_equal_graphs"] == x["B"] if x["way"] == "graphs" else True
    assert res["fig8"]["memento"]["ok"] and res["fig8"]["full"]["ok"] and res["fig8"]["ratio"] > 0
