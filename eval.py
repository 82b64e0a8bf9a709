"""Evaluate a checkpoint: pass@1 with the paper's answer checking, and the KV figures of Table 1.

    python eval.py --checkpoint out/stage2 --data toy --n-samples 4           # the embedded task, CPU
    python eval.py --checkpoint DIR|hub-id --data aime.jsonl --n-samples 8 --kv-cache-gib 40

The command line over evaluation.py (modes memento / full / restart, seeds, records, summary,
answer checking: see there). Each finished sample is appended to --out at once, one JSON
line; rerunning the same command skips what is there, so a killed run continues where it
stopped, and a rerun with other run-defining flags is refused. The summary per mode is
printed as a Markdown table and written to --out with .summary.json in place of .jsonl.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from checkpoint import model_fingerprint
from cli import (DEFAULT_CHECKPOINT, ArgumentParser, add_generation_args, engine_config, kv_cache_budget, load_or_exit,
                 nonnegative_int, positive_int)
from evaluation import MODES, load_problems, markdown, run, summarize, toy_problems
from kv_cache import kv_bytes_per_token
from model import QWEN3_SHAPES, Qwen3Config

# Flags whose change makes earlier results incomparable: a rerun with another value is refused.
RUN_DEFINING = ("checkpoint", "data", "split", "config", "problem_key", "answer_key", "seed", "temperature",
                "top_p", "top_k", "min_p",
                "max_new_tokens", "max_block_tokens", "keep_last_n_blocks", "mask_delimiters",
                "keep_last_block_for_answer", "dtype")


# ----------------------------------------------------------------------------- results file

def read_done(path: Path) -> list[dict]:
    """The records already in a results file. A last line cut by a kill is dropped from the
    file (it is rewritten without it), so appending continues on a clean line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1] if not raw.endswith(b"\n") else raw
    if keep != raw:
        path.write_bytes(keep)
    out = []
    for i, line in enumerate(keep.decode("utf-8").splitlines(), 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i}: not a results line; pass --overwrite or another --out") from None
    return out


def check_config(path: Path, config: dict, overwrite: bool, keys=RUN_DEFINING) -> None:
    """Refuse to mix results of different settings in one file (one line naming the flags);
    `keys`: the entries compared (the flags, or the checkpoint's fingerprint once it is
    loaded: a checkpoint retrained in the same directory is another checkpoint)."""
    if overwrite or not path.exists():
        return
    saved = json.loads(path.read_text())
    diff = [f"--{k.replace('_', '-')} (saved {saved.get(k)!r}, now {config[k]!r})"
            for k in keys if k in saved and saved.get(k) != config[k]]
    if diff:
        raise ValueError(f"results in this --out were made with other settings: {'; '.join(diff)}; "
                         "rerun with the saved values, or pass --overwrite or another --out")


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> dict:
    """Run the evaluation command; returns the summary dict."""
    ap = ArgumentParser(prog="eval.py", description=__doc__)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint dir, training run dir or hub id")
    ap.add_argument("--data", default="toy", help="'toy', a .jsonl/.parquet file or a hub dataset id")
    ap.add_argument("--problem-key", default="problem", help="column holding the problem")
    ap.add_argument("--answer-key", default="answer", help="column holding the reference answer")
    ap.add_argument("--grading-workers", type=nonnegative_int, default=1,
                    help="processes grading answers beside decoding (0: grade in the decoding thread)")
    ap.add_argument("--split", default=None, help="the dataset split (required when it has several, e.g. test)")
    ap.add_argument("--config", default=None, help="the hub dataset's config (subset), e.g. gpqa_diamond")
    ap.add_argument("--toy-problems", type=positive_int, default=200, help="problems of --data toy")
    ap.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N problems only")
    ap.add_argument("--n-samples", type=positive_int, default=8, help="samples per problem and mode")
    ap.add_argument("--modes", default="memento,full", help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--out", default="out/eval/results.jsonl", help="results, one JSON line per sample")
    ap.add_argument("--overwrite", action="store_true", help="start --out afresh instead of continuing it")
    ap.add_argument("--kv-shapes", default="Qwen3-8B,Qwen3-32B",
                    help=f"also report KV GB at these model shapes (bf16), from {', '.join(QWEN3_SHAPES)}; '' = none")
    add_generation_args(ap, max_new_tokens=32768)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown mode(s) {', '.join(bad) or '(none)'}; choose from {', '.join(MODES)}")
    shapes = [s.strip() for s in args.kv_shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in QWEN3_SHAPES]
    if unknown:
        ap.error(f"--kv-shapes: unknown shape(s) {', '.join(unknown)}; choose from {', '.join(QWEN3_SHAPES)}")
    engine = engine_config(ap, args, "restart" if "restart" in modes else "memento")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the engine's one line on its KV budget

    if args.data == "toy":
        problems, skipped = toy_problems(args.toy_problems, args.seed), []
    else:
        try:
            problems, skipped = load_problems(args.data, args.problem_key, args.answer_key, split=args.split,
                                              config=args.config, seed=args.seed)
        except (FileNotFoundError, ValueError, ImportError) as e:
            sys.exit(f"eval.py: {e}")
        if skipped:
            rows = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
            print(f"eval.py: skipped {len(skipped)} row(s) without {args.problem_key!r} or {args.answer_key!r}: "
                  f"row(s) {rows}", file=sys.stderr)
        if not problems:
            sys.exit(f"eval.py: --data {args.data}: no usable problem")
    problems = problems[:args.limit]

    out = Path(args.out)
    config_path = out.with_name(out.name.removesuffix(".jsonl") + ".config.json")
    summary_path = out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
    config = {k: getattr(args, k) for k in RUN_DEFINING}
    try:
        check_config(config_path, config, args.overwrite)
        if args.overwrite and out.exists():
            out.unlink()
        previous = read_done(out)
    except ValueError as e:
        sys.exit(f"eval.py: {e}")
    model, tok = load_or_exit("eval.py", args.checkpoint, args.device, getattr(torch, args.dtype))
    config["checkpoint_sha256"] = model_fingerprint(model)
    try:
        check_config(config_path, config, args.overwrite, ("checkpoint_sha256",))
    except ValueError as e:
        sys.exit(f"eval.py: {e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=1) + "\n")

    wanted = {(p.id, m, k) for p in problems for m in modes for k in range(args.n_samples)}
    latest = {(r["problem"], r["mode"], r["sample"]): r for r in previous}  # a retried sample's last line counts
    previous = list(latest.values())
    cut = {key for key, r in latest.items() if r.get("kv_pool_cut")} & wanted  # retried now
    done = set(latest) & wanted - cut
    engine = kv_cache_budget(ap, args, engine, model.config)
    print(f"eval.py: {len(problems)} problems x {args.n_samples} samples x {len(modes)} modes = {len(wanted)} samples, "
          f"{len(done)} already in {out}" + (f", {len(cut)} ended by the KV pool retried" if cut else ""), file=sys.stderr)

    t0 = time.perf_counter()
    with out.open("a", encoding="utf-8") as f:
        def write(r: dict, _seq) -> None:
            f.write(json.dumps(r) + "\n")
            f.flush()

        new = run(model, tok, problems, modes, args.n_samples, seed=args.seed, config=engine,
                  shapes={s: kv_bytes_per_token(Qwen3Config.released(s), torch.bfloat16) for s in shapes}, done=done,
                  on_record=write, progress=not args.no_progress and sys.stderr.isatty(),
                  grading_workers=args.grading_workers)
    seconds = time.perf_counter() - t0
    records = [r for r in previous if (r["problem"], r["mode"], r["sample"]) in done] + new
    summary = summarize(records, modes)
    new_tokens = sum(r["tokens"] for r in new)
    result = {"summary": summary, "config": {**config, "modes": modes, "n_samples": args.n_samples,
                                             "problems": len(problems), "skipped_rows": skipped},
              "generated": {"samples": len(new), "tokens": new_tokens, "seconds": seconds,
                            "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0}}
    summary_path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(summary))
    print(f"\n{len(new)} samples generated in {seconds:.1f} s ({result['generated']['tokens_per_s']:.0f} tokens/s); "
          f"results in {out}, summary in {summary_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
