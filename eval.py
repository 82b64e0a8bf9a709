"""Evaluate a checkpoint: pass@1 with the paper's answer checking, and the KV figures of Table 1.

    python eval.py --checkpoint out/stage2 --data toy --n-samples 4           # the embedded task, CPU
    python eval.py --checkpoint DIR|hub-id --data aime.jsonl --n-samples 8 --kv-cache-gib 40

Every problem x sample x mode is one request to one engine.Engine (continuous batching: the
modes share the batch), sampled with the paper's defaults (temperature 0.6, top-p 0.95,
top-k 20, 32K new tokens; §6.1). Modes (paper Table 1 and §6.2.1):

    memento   compaction on: a block is evicted when its memento ends (keep_last_n_blocks 0)
    full      no compaction: the vanilla full KV cache on the same weights
    restart   restart mode: each memento's K/V recomputed without its block

Sample k of problem p draws with seed sample_seed(seed, p, k) in every mode, so the modes are
compared on the same prompts with the same random streams. Each finished sample is appended
to --out at once (one JSON line: the verdict, the extracted answer, tokens, blocks, mean block
and memento length, peak KV tokens, KV AUC and both in GB by §A.3.1); rerunning the same
command skips what is there, so a killed run continues where it stopped. The summary per
mode (pass@1 with its standard error across problems as in paper §A.2.2, maj@k, the KV means
and the full/memento ratios) is printed as a Markdown table and written to
--out with .summary.json in place of .jsonl.

Answers are checked by data/grading.py: math (the last \\boxed{}, "Final Answer:", the last
$...$ or the raw text, then math-verify equivalence), multiple choice (the last A-D letter,
for a gold answer that is one letter) and the embedded task (data/toy_task.check_trace).
"""
from __future__ import annotations

import json
import logging
import math
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cli import ArgumentParser, add_generation_args, engine_config, kv_cache_budget, positive_int
from data import grading, toy_task
from engine import Engine, EngineConfig, Mode, Sequence, check_mode
from kv_cache import kv_bytes_per_token
from memento_attention import MementoTokens
from model import QWEN3_SHAPES, Qwen3Config

MODES = [m.value for m in Mode]  # memento, full, restart
GB = 1e9  # the paper's GB (§A.3.1)
# Flags whose change makes earlier results incomparable: a rerun with another value is refused.
RUN_DEFINING = ("checkpoint", "data", "problem_key", "answer_key", "seed", "temperature", "top_p", "top_k", "min_p",
                "max_new_tokens", "max_block_tokens", "keep_last_n_blocks", "mask_delimiters",
                "keep_last_block_for_answer", "dtype")


@dataclass(frozen=True)
class Problem:
    """One evaluation problem. id: its index in the data (stable across runs); kind: "math",
    "choice" or "toy" (data/grading.py); gold: the reference answer (None for toy)."""

    id: int
    prompt: str
    gold: str | None
    kind: str


def sample_seed(seed: int, problem: int, k: int) -> int:
    """The sampling seed (int >= 0 for seed >= 0) of sample k of problem `problem`, the same
    in every mode and batch, so modes are compared on the same random streams (§A.2.2)."""
    return (seed * 1_000_003 + problem) * 1_000_003 + k


def toy_problems(n: int, seed: int) -> list[Problem]:
    """n problems of the embedded task, drawn with a generator seeded from `seed`."""
    rng = random.Random(f"eval:{seed}")
    return [Problem(i, p.prompt, None, "toy") for i, p in enumerate(toy_task.sample_problem(rng) for _ in range(n))]


def toy_max_new_tokens(tok) -> int:
    """The longest response the embedded task can have, in tokens, plus the stop token: an
    untrained model that never stops generates this much and no more."""
    longest = toy_task.Problem(toy_task.MAX_BLOCKS, toy_task.BASE - 1)
    text, _ = toy_task.solve(longest, random.Random(0))
    return len(tok.encode(text)) + 8


def load_problems(source: str, problem_key: str, answer_key: str) -> tuple[list[Problem], list[int]]:
    """Problems of a .jsonl/.parquet file or hub dataset (data/openmementos.read_records).

    Returns (problems, rows skipped because their problem or answer is empty, 1-based).
    Raises FileNotFoundError/ValueError with one line: no such file or unreachable hub id,
    or neither column present (naming the columns found)."""
    from data.openmementos import read_records

    rows = read_records(source)
    if rows and not any(problem_key in r and answer_key in r for r in rows):
        found = sorted({k for r in rows for k in r if not k.startswith("_")})
        raise ValueError(f"--data {source}: no row has both {problem_key!r} and {answer_key!r}; columns found: "
                         f"{', '.join(found) or 'none'} (use --problem-key / --answer-key)")
    problems, skipped = [], []
    for i, r in enumerate(rows):
        q, a = r.get(problem_key), r.get(answer_key)
        if q is None or a is None or not str(q).strip() or not str(a).strip():
            skipped.append(i + 1)
            continue
        gold = str(a).strip()
        problems.append(Problem(i, str(q), gold, grading.infer_kind(gold)))
    return problems, skipped


def trace_stats(tokens: list[int], T: MementoTokens) -> dict:
    """Blocks completed, mean block and memento length in tokens (between their delimiters,
    paper §3 format) of a response's token ids; {"blocks": int, "mean_block_tokens": float,
    "mean_memento_tokens": float} (0.0 when there is none). Raises nothing."""
    blocks, mementos, start = [], [], None
    for i, t in enumerate(tokens):
        if t in (T.block_start, T.summary_start):
            start = i
        elif t == T.block_end and start is not None:
            blocks.append(i - start - 1)
        elif t == T.summary_end and start is not None:
            mementos.append(i - start - 1)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"blocks": len(mementos), "mean_block_tokens": mean(blocks), "mean_memento_tokens": mean(mementos)}


def record(p: Problem, mode: str, k: int, seed: int, s: Sequence, tok, T, bytes_per_token: dict[str, int]) -> dict:
    """One sample's results line (a JSON-ready dict): verdict and extracted answer (§A.2.2),
    token and block counts, peak KV in tokens and KV AUC in token·steps (the sequence's curve,
    §A.3.1), and for each name in bytes_per_token (bytes per KV token) peak KV in GB (1e9 B)
    and KV AUC in GB·ktok. Raises ValueError from grading for a toy problem without its prompt."""
    text = tok.decode(s.tokens)
    verdict = grading.grade(text, p.gold, p.kind, prompt=p.prompt)
    curve = s.curve
    peak, auc = (max(curve) if curve else 0), sum(curve)
    out = {"problem": p.id, "mode": mode, "sample": k, "seed": seed, "correct": bool(verdict["correct"]),
           "extracted": verdict.get("extracted"), "gold": p.gold, "tokens": len(s.tokens),
           "stop_reason": s.stop_reason, **trace_stats(s.tokens, T), "peak_kv_tokens": peak, "kv_auc": auc,
           "preemptions": s.preemptions, "metrics": s.metrics()}
    if "reason" in verdict:
        out["reason"] = verdict["reason"]
    for name, b in bytes_per_token.items():
        out[f"peak_kv_gb@{name}"] = peak * b / GB
        out[f"kv_auc_gb_ktok@{name}"] = auc * b / GB / 1000
    out["response"] = text
    return out


def run(model, tok, problems: list[Problem], modes: list[str], n_samples: int, *, seed: int,
        config: EngineConfig = EngineConfig(), shapes: dict[str, int] | None = None,
        done: set | frozenset = frozenset(), on_record=None, progress: bool = False) -> list[dict]:
    """Generate and grade every (problem, mode, sample) not in `done` through one Engine.

    Args:
        model, tok: a model.Qwen3 (eval) and its tokenizer.Tokenizer with the memento tokens.
        problems: the Problems; modes: names from MODES; n_samples: samples per problem and mode.
        seed: base of sample_seed. config: the engine's options; its sampling holds the
            sampling parameters (max_tokens None: the paper's 32,768, within
            max_position_embeddings; a toy problem is capped at toy_max_new_tokens).
        shapes: {name: KV bytes per token} reported beside this model's own figures ("model").
        done: (problem id, mode, sample) keys to skip. on_record: callback(record, Sequence)
            per finished sample, in finishing order.
    Returns:
        the new records, in finishing order.
    Raises:
        ValueError for an unknown mode or restart with masking options it does not define.
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    for m in modes:
        check_mode(m, config.masking)  # restart where it is undefined: one line, before any work
    T = MementoTokens.from_tokenizer(tok)
    per_token = {"model": kv_bytes_per_token(model.config, next(model.parameters()).dtype), **(shapes or {})}
    toy_cap = toy_max_new_tokens(tok)
    jobs, records = {}, []

    bar = None
    todo = [(p, m, k) for p in problems for m in modes for k in range(n_samples) if (p.id, m, k) not in done]
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(problems) * len(modes) * n_samples, initial=len(problems) * len(modes) * n_samples - len(todo),
                   desc="samples", dynamic_ncols=True)

    def finished(s: Sequence) -> None:
        if s.id not in jobs:  # rejected inside Engine.add: reported below, once jobs knows it
            return
        p, m, k = jobs[s.id]
        r = record(p, m, k, sample_seed(seed, p.id, k), s, tok, T, per_token)
        records.append(r)
        if on_record:
            on_record(r, s)
        if bar is not None:
            bar.update(1)

    eng = Engine(model, tok, config, on_finish=finished)
    max_tokens = config.sampling.max_tokens or 32768
    for p, m, k in todo:
        prompt = tok.encode(tok.chat_prompt(p.prompt))
        cap = min(max_tokens, toy_cap) if p.kind == "toy" else max_tokens
        params = replace(config.sampling, seed=sample_seed(seed, p.id, k),
                         max_tokens=max(1, min(cap, model.config.max_position_embeddings - len(prompt))))
        s = eng.add(prompt, params, mode=m)
        jobs[s.id] = (p, m, k)
        if s.done:  # rejected at once: recorded by the callback before jobs knew it
            finished(s)
    eng.run()
    if bar is not None:
        bar.close()
    return records


def summarize(records: list[dict], modes: list[str]) -> dict:
    """Per mode: problems, samples, pass@1 (mean over problems of the mean over samples) with
    its standard error across problems (§A.2.2), maj@k (the most frequent extracted answer per
    problem), mean tokens, blocks, block and memento length, peak KV and KV AUC (tokens and
    GB per shape), and per_problem (pass@1 and maj@k of each problem); and the full/memento
    and restart/memento ratios of the KV means when those modes are present."""
    out = {}
    for m in modes:
        rs = [r for r in records if r["mode"] == m]
        if not rs:
            continue
        by_p: dict[int, list[dict]] = {}
        for r in rs:
            by_p.setdefault(r["problem"], []).append(r)
        pass1 = [sum(r["correct"] for r in v) / len(v) for v in by_p.values()]
        maj = []
        for v in by_p.values():
            votes = Counter(r["extracted"] for r in v if r["extracted"] is not None)
            top = votes.most_common(1)[0][0] if votes else None
            maj.append(any(r["correct"] for r in v if top is not None and r["extracted"] == top))
        n = len(pass1)
        per_problem = [{"problem": p, "pass@1": a, "maj@k": b} for p, a, b in zip(by_p, pass1, maj)]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        row = {"problems": n, "samples": len(rs), "pass@1": sum(pass1) / n,
               "pass@1_se": statistics.stdev(pass1) / math.sqrt(n) if n > 1 else 0.0,
               "maj@k": sum(maj) / n, "k": max(len(v) for v in by_p.values()), "per_problem": per_problem}
        for key in ("tokens", "blocks", "mean_block_tokens", "mean_memento_tokens", "peak_kv_tokens", "kv_auc"):
            row[key] = mean(key)
        for key in rs[0]:
            if key.startswith(("peak_kv_gb@", "kv_auc_gb_ktok@")):
                row[key] = mean(key)
        out[m] = row
    if "memento" in out:
        for other in ("full", "restart"):
            if other in out:
                out[f"{other}/memento"] = {k: out[other][k] / out["memento"][k] if out["memento"][k] else float("nan")
                                           for k in ("peak_kv_tokens", "kv_auc")}
    return out


def markdown(summary: dict) -> str:
    """The summary as one Markdown table, a column per mode."""
    modes = [m for m in MODES if m in summary]
    shapes = list(dict.fromkeys(k.split("@")[1] for m in modes for k in summary[m] if k.startswith("peak_kv_gb@")))
    lines = ["| | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    rows = [("problems x samples", lambda r: f"{r['problems']} x {r['k']}"),
            ("pass@1 (%) ± s.e.", lambda r: f"{100 * r['pass@1']:.1f} ± {100 * r['pass@1_se']:.1f}"),
            ("maj@k (%)", lambda r: f"{100 * r['maj@k']:.1f}"),
            ("tokens per sample", lambda r: f"{r['tokens']:,.0f}"),
            ("blocks per sample", lambda r: f"{r['blocks']:.1f}"),
            ("block / memento tokens", lambda r: f"{r['mean_block_tokens']:.1f} / {r['mean_memento_tokens']:.1f}"),
            ("peak KV (tokens)", lambda r: f"{r['peak_kv_tokens']:,.0f}"),
            ("KV AUC (token·steps)", lambda r: f"{r['kv_auc']:,.0f}")]
    for s in shapes:
        rows.append((f"peak KV (GB, {s})", lambda r, s=s: f"{r[f'peak_kv_gb@{s}']:.4g}"))
        rows.append((f"KV AUC (GB·ktok, {s})", lambda r, s=s: f"{r[f'kv_auc_gb_ktok@{s}']:.4g}"))
    for name, f in rows:
        lines.append(f"| {name} | " + " | ".join(f(summary[m]) for m in modes) + " |")
    for other in ("full", "restart"):
        if f"{other}/memento" in summary:
            q = summary[f"{other}/memento"]
            lines.append(f"\n{other} / memento: peak KV {q['peak_kv_tokens']:.2f}x, KV AUC {q['kv_auc']:.2f}x")
    return "\n".join(lines)


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


def check_config(path: Path, config: dict, overwrite: bool) -> None:
    """Refuse to mix results of different settings in one file (one line naming the flags)."""
    if overwrite or not path.exists():
        return
    saved = json.loads(path.read_text())
    diff = [f"--{k.replace('_', '-')} (saved {saved.get(k)!r}, now {config[k]!r})"
            for k in RUN_DEFINING if saved.get(k) != config[k]]
    if diff:
        raise ValueError(f"results in this --out were made with other settings: {'; '.join(diff)}; "
                         "rerun with the saved values, or pass --overwrite or another --out")


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> dict:
    """Run the evaluation command; returns the summary dict."""
    from generate import load

    ap = ArgumentParser(prog="eval.py", description=__doc__)
    ap.add_argument("--checkpoint", default="out/stage2", help="checkpoint dir, training run dir or hub id")
    ap.add_argument("--data", default="toy", help="'toy', a .jsonl/.parquet file or a hub dataset id")
    ap.add_argument("--problem-key", default="problem", help="column holding the problem")
    ap.add_argument("--answer-key", default="answer", help="column holding the reference answer")
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
            problems, skipped = load_problems(args.data, args.problem_key, args.answer_key)
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
    model, tok = load(args.checkpoint, args.device, getattr(torch, args.dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=1) + "\n")

    wanted = {(p.id, m, k) for p in problems for m in modes for k in range(args.n_samples)}
    done = {(r["problem"], r["mode"], r["sample"]) for r in previous} & wanted
    engine = kv_cache_budget(ap, args, engine, model.config)
    print(f"eval.py: {len(problems)} problems x {args.n_samples} samples x {len(modes)} modes = {len(wanted)} samples, "
          f"{len(done)} already in {out}", file=sys.stderr)

    t0 = time.perf_counter()
    with out.open("a", encoding="utf-8") as f:
        def write(r: dict, _seq) -> None:
            f.write(json.dumps(r) + "\n")
            f.flush()

        new = run(model, tok, problems, modes, args.n_samples, seed=args.seed, config=engine,
                  shapes={s: kv_bytes_per_token(Qwen3Config.released(s), torch.bfloat16) for s in shapes}, done=done,
                  on_record=write, progress=not args.no_progress and sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    records = [r for r in previous if (r["problem"], r["mode"], r["sample"]) in wanted] + new
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
