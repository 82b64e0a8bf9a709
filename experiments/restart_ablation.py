"""Restart-mode ablation on the embedded toy task (paper §6.2.1).

    python experiments/restart_ablation.py [--stage1 out/stage1] [--stage2 out/stage2] [--n 500] [--json]
    python experiments/restart_ablation.py --train-seed 1     # train both stages with seed 1 first

Generates traces for the same n prompts (eval.toy_problems, seeded) with the same sampling
seeds in every mode, through eval.py's machinery (one engine per model, its modes in one
batch; answers checked by data/grading.py, i.e. data/toy_task.check_trace), and reports
accuracy with a Wilson 95% interval. `python eval.py --data toy --toy-problems N --n-samples 1
--modes memento,restart --seed S` gives the same per-prompt verdicts. Rows (model x mode):

    stage2 / memento   compaction on, keep_last_n_blocks=0 (the method)
    stage2 / restart   restart mode: each memento's K/V recomputed without
                       its block once the block is evicted (the implicit channel removed)
    stage1 / memento   the stage-1 model (trained with full attention) under compaction
    stage1 / restart   the same with restart mode
    stage1 / full      the stage-1 model with no compaction (reference row)

Paired comparison: for each model, memento vs restart on the same prompts and seeds, the
discordant counts and an exact McNemar p-value.

JSON (stdout with --json; always written to --out):
    rows: list of {model, checkpoint, mode, n, correct, accuracy, ci95_low, ci95_high,
        failure_reasons (histogram of check_trace reasons with numbers replaced by '#';
        'ok' counts the correct ones), mean_tokens, verdicts (per prompt, in prompt order),
        seconds (the model's whole run: its modes share one batch)}
    paired: {model: {memento_only, restart_only, both, neither, mcnemar_p}}
    config: the arguments (n, seed, temperature, top_p, top_k, max_num_seqs, max_new_tokens,
        train_seed, ...)
    train_seconds: {stage1, stage2} wall time of the training with --train-seed, else null
    machine: cpu_model, cpu_count, torch, torch_threads, python, platform, cuda
    wall_seconds: the whole run, model loading included
Checkpoints missing: exits with one line saying how to make them.

--train-seed S first trains stage 1 and stage 2 exactly as the quickstart does (train_sft.py
defaults) but with --seed S, into --work-dir/seedS (outside the repository), then runs the
ablation on those checkpoints; the output defaults to restart_ablation_seedS.json (no plot). That
is how the README's seed-to-seed comparison was made: a single training run of this toy
model does not tell how much it comes to rely on the implicit channel.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot, load_checkpoint, machine_info, mcnemar_exact, wilson  # noqa: E402

import torch  # noqa: E402

import sft  # noqa: E402
from blocks import MementoConfig  # noqa: E402
from cli import add_sampling_args, sampling_params  # noqa: E402
from engine import EngineConfig  # noqa: E402
from evaluation import run as eval_run, toy_problems  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage1", default="out/stage1", help="stage-1 checkpoint dir")
    ap.add_argument("--stage2", default="out/stage2", help="stage-2 checkpoint dir")
    ap.add_argument("--n", type=int, default=500, help="prompts (the same for every row)")
    ap.add_argument("--max-num-seqs", type=int, default=500, help="sequences decoded together")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed and base sampling seed (eval.py's --seed)")
    add_sampling_args(ap, max_new_tokens=320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "restart_ablation.json"), help="JSON output file ('' = none)")
    ap.add_argument("--plot", default=str(RESULTS / "restart_ablation.png"), help="PNG output ('' = none)")
    ap.add_argument("--json", action="store_true", help="print the JSON on stdout")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="train both stages (quickstart defaults) with this seed first, then ablate them")
    ap.add_argument("--work-dir", default="/tmp/memento_seeds", help="checkpoints of --train-seed (outside the repo)")
    args = ap.parse_args(argv)
    if args.train_seed is not None:
        base = Path(args.work_dir) / f"seed{args.train_seed}"
        args.stage1, args.stage2 = str(base / "stage1"), str(base / "stage2")
        default_out = str(RESULTS / "restart_ablation.json")
        if args.out == default_out:
            args.out = str(RESULTS / f"restart_ablation_seed{args.train_seed}.json")
        if args.plot == str(RESULTS / "restart_ablation.png"):
            args.plot = ""  # the README compares seeds in a table (experiments/report.py)
    return args


def train_both_stages(args) -> dict:
    """Stage 1 then stage 2 with train_sft.py's toy defaults and --seed args.train_seed
    (evals off: they do not change the weights), through sft.train. Returns {stage: seconds}."""
    seconds = {}
    for stage, extra in ((1, []), (2, ["--init-from", args.stage1])):
        t0 = time.perf_counter()
        sft.train(sft.parse_args(["--stage", str(stage), "--seed", str(args.train_seed), "--out",
                                  getattr(args, f"stage{stage}"), "--eval-samples", "0", "--no-progress", "--overwrite",
                                  *extra]))
        seconds[f"stage{stage}"] = time.perf_counter() - t0
    return seconds


def reason_key(reason: str) -> str:
    """check_trace's reason with every number (and quoted answer) replaced by '#', so that
    reasons of the same kind fall into one histogram bin."""
    return re.sub(r"\d+", "#", re.sub(r"'[^']*'", "'#'", reason))


def run_model(model, tok, problems, modes: list[str], args) -> list[dict]:
    """Generate and check every problem in each mode with evaluation.run (one engine, all modes in
    one batch; sample 0 of problem p draws with eval.sample_seed(seed, p, 0) in every mode, so
    the modes see the same prompts with the same random streams: the draws differ as soon as
    the logits differ, which is the point of the comparison). Returns one row per mode,
    without model/checkpoint."""
    t0 = time.perf_counter()
    config = EngineConfig(MementoConfig(keep_last_n_blocks=0), max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=max(2048, args.max_num_seqs), sampling=sampling_params(args))
    recs = eval_run(model, tok, problems, modes, 1, seed=args.seed, config=config)
    seconds = time.perf_counter() - t0
    rows = []
    for mode in modes:
        rs = sorted((r for r in recs if r["mode"] == mode), key=lambda r: r["problem"])
        ok = [r["correct"] for r in rs]
        reasons = Counter("ok" if r["correct"] else reason_key(r["reason"]) for r in rs)
        n, c = len(ok), sum(ok)
        lo, hi = wilson(c, n)
        rows.append({"mode": mode, "n": n, "correct": c, "accuracy": c / n if n else 0.0, "ci95_low": lo,
                     "ci95_high": hi, "failure_reasons": dict(reasons.most_common()),
                     "mean_tokens": sum(r["tokens"] for r in rs) / max(1, n), "verdicts": ok, "seconds": seconds})
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Bar chart of accuracy per (model, mode) with the Wilson 95% interval as error bars."""
    plt = pyplot("restart_ablation.py")
    if plt is None:
        return

    labels = [f"{r['model']}\n{r['mode']}" for r in rows]
    acc = [r["accuracy"] for r in rows]
    # max(0, .): at 0/n or n/n the interval's end equals the estimate up to rounding
    err = [[max(0.0, a - r["ci95_low"]) for a, r in zip(acc, rows)], [max(0.0, r["ci95_high"] - a) for a, r in zip(acc, rows)]]
    colors = {"memento": "tab:blue", "restart": "tab:red", "full": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(rows)), acc, yerr=err, capsize=4, color=[colors[r["mode"]] for r in rows])
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"trace accuracy (n={rows[0]['n']}, 95% Wilson)")
    ax.set_title("Toy task: memento attention vs restart mode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run the ablation; returns the JSON dict (also written to --out, printed with --json)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    train_seconds = train_both_stages(args) if args.train_seed is not None else None
    # Load both before generating anything, so a missing checkpoint fails in a second.
    models = {"stage2": load_checkpoint(args.stage2, "--stage2", "restart_ablation.py"),
              "stage1": load_checkpoint(args.stage1, "--stage1", "restart_ablation.py")}
    problems = toy_problems(args.n, args.seed)
    rows, paired = [], {}
    plan = {"stage2": ["memento", "restart"], "stage1": ["memento", "restart", "full"]}
    correct = {}
    for name, modes in plan.items():
        model, tok = models[name]
        for row in run_model(model, tok, problems, modes, args):
            correct[name, row["mode"]] = row["verdicts"]
            rows.append({"model": name, "checkpoint": str(args.stage1 if name == "stage1" else args.stage2), **row})
            print(f"{name:7s} {row['mode']:8s} {row['correct']}/{row['n']} = {row['accuracy']:.3f} "
                  f"[{row['ci95_low']:.3f}, {row['ci95_high']:.3f}] ({row['seconds']:.0f} s for the model)", file=sys.stderr)
    for name in ("stage2", "stage1"):
        a, b = correct[name, "memento"], correct[name, "restart"]
        mo = sum(x and not y for x, y in zip(a, b))
        ro = sum(y and not x for x, y in zip(a, b))
        paired[name] = {"memento_only": mo, "restart_only": ro, "both": sum(x and y for x, y in zip(a, b)),
                        "neither": sum(not x and not y for x, y in zip(a, b)), "mcnemar_p": mcnemar_exact(mo, ro)}
    out = {"experiment": "restart_ablation", "rows": rows, "paired": paired,
           "config": {k: v for k, v in vars(args).items() if k not in ("json", "out", "plot")},
           "train_seconds": train_seconds,
           "machine": machine_info(), "wall_seconds": time.perf_counter() - t0}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
