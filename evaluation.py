"""Evaluation (paper Table 1, §6.2.1, §A.2.2, §A.3.1): is a checkpoint still right, and how much
KV memory did it use, with and without compaction on the same weights.

Every problem x sample x mode is one request to one engine.Engine (continuous batching: the
modes share the batch), sampled with the paper's defaults (temperature 0.6, top-p 0.95,
top-k 20, 32K new tokens; §6.1). Modes (engine.Mode):

    memento   compaction on: a block is evicted when its memento ends (keep_last_n_blocks 0)
    full      no compaction: the vanilla full KV cache on the same weights
    restart   restart mode: each memento's K/V recomputed without its block

Sample k of problem p draws with seed sampling.request_seed(seed, p, k) in every mode, so the
modes are compared on the same prompts with the same random streams. Each finished sample is
one record (the verdict, the extracted answer, tokens, blocks, mean block and memento length,
peak KV tokens, KV AUC and both in GB by §A.3.1, the request's metrics); `summarize` gives per
mode pass@1 with its standard error across problems (§A.2.2), maj@k, the KV means and the
full/memento ratios. eval.py is the command line over it.

Answers are checked by data/grading.py: math (the last \\boxed{}, "Final Answer:", the last
$...$ or the raw text, then math-verify equivalence), multiple choice (the last A-D letter,
for a gold answer that is one letter) and the embedded task (data/toy_task.check_trace).
"""
from __future__ import annotations

import math
import multiprocessing
import random
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from blocks import MementoTokens, trace_stats
from data import benchmarks, grading, records, toy_task
from engine import Engine, EngineConfig, Mode, Sequence, check_mode
from kv_cache import curve_stats, kv_bytes_per_token
from sampling import request_seed

MODES = [m.value for m in Mode]  # memento, full, restart
# stop reasons of a sample the KV pool ended (Engine): not the model's doing, so not graded
POOL_CUT = ("KV pool full", "rejected")
GB = 1e9  # the paper's GB (§A.3.1)
@dataclass(frozen=True)
class Problem:
    """One evaluation problem. id: its index in the data (stable across runs); prompt: the
    problem as the data wrote it (tokenized as plain text: tokenizer.prompt_ids); kind:
    "math", "choice" or "toy" (data/grading.py); gold: the reference answer, or a tuple of
    acceptable answers (None for toy)."""

    id: int
    prompt: str
    gold: str | tuple[str, ...] | None
    kind: str


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


def load_problems(source: str, problem_key: str, answer_key: str, *, split: str | None = None,
                  config: str | None = None, seed: int = 0,
                  bad: str = "error") -> tuple[list[Problem], records.Report]:
    """Problems of a benchmark (paper §6.2): a local .jsonl/.json/.csv/.parquet file read by
    data/records.py (offline), or through data/benchmarks.load_rows a local directory split by
    file names or a hub dataset id with `split` / `config`. Each row is checked: the problem a
    non-empty string, the answer records.answer (a string, a number, or a list of acceptable
    answers, any one graded correct). GPQA's own rows (question, correct and incorrect
    answers) become lettered multiple-choice problems (benchmarks.letter_gpqa, shuffled by
    `seed`); problem_key/answer_key then do not apply. A Problem's id is its row's index in
    the data, which a skipped row does not shift.

    Returns (problems, report): report.data_hash names the data, report.skipped what `bad`
    ("skip") left out. Raises FileNotFoundError/ValueError (records.DataError) with one line:
    no such file or unreachable hub id, several splits and none named, neither column present
    (naming the columns found), or under bad="error" the first bad row (FILE:LINE: field: ...)."""
    path = Path(source)
    if not path.exists() and not records.looks_like_hub_id(source):  # never tried on the hub
        raise records.DataError(f"{source}: no such file or directory")
    if path.is_file():
        if split not in (None, "train"):
            raise ValueError(f"--split {split}: --data {source} is one file, with no splits")
        report = records.Report(str(path), bad)
        rows = records.read_files([path], report)
    else:
        rows, report = benchmarks.load_rows(source, split, config, bad)
    if benchmarks.is_gpqa([r.data for r in rows[:1]]):
        rows = [r._replace(data=benchmarks.letter_gpqa(r.data, r.n, seed))
                for r in records.validate(rows, benchmarks.GPQA_SCHEMA, report)]
        problem_key, answer_key = "problem", "answer"
    elif rows and not any(problem_key in r.data and answer_key in r.data for r in rows):
        found = sorted({k for r in rows for k in r.data})
        raise ValueError(f"--data {source}: no row has both {problem_key!r} and {answer_key!r}; columns found: "
                         f"{', '.join(map(str, found)) or 'none'} (use --problem-key / --answer-key)")
    rows = records.validate(rows, {problem_key: records.text, answer_key: records.answer}, report)
    return [Problem(r.n, r.data[problem_key], r.data[answer_key], grading.infer_kind(r.data[answer_key]))
            for r in rows], report


def record(p: Problem, mode: str, k: int, seed: int, s: Sequence, tok, fmt: MementoTokens,
           bytes_per_token: dict[str, int], verdict: dict | None = None) -> dict:
    """One sample's results line (a JSON-ready dict): verdict and extracted answer (§A.2.2),
    token and block counts, peak KV in tokens and KV AUC in token·steps (the sequence's curve,
    §A.3.1), and for each name in bytes_per_token (bytes per KV token) peak KV in GB (1e9 B)
    and KV AUC in GB·ktok. verdict: grading.grade's result when it was graded elsewhere (a
    worker process), else it is graded here. Raises ValueError from grading for a toy problem
    without its prompt."""
    text = tok.decode(s.tokens)
    cut = s.stop_reason.startswith(POOL_CUT)
    if cut:
        verdict = {"correct": None, "extracted": None}
    elif verdict is None:
        verdict = grading.grade(text, p.gold, p.kind, prompt=p.prompt)
    kv = curve_stats(s.curve, 0)
    peak, auc = kv["peak_kv_tokens"], kv["kv_auc"]
    out = {"problem": p.id, "mode": mode, "sample": k, "seed": seed, "kind": p.kind,
           "correct": None if cut else bool(verdict["correct"]), "kv_pool_cut": cut,
           "extracted": verdict.get("extracted"), "gold": p.gold, "tokens": len(s.tokens),
           "stop_reason": s.stop_reason, **trace_stats(s.tokens, fmt), "peak_kv_tokens": peak, "kv_auc": auc,
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
        done: set | frozenset = frozenset(), on_record=None, progress: bool = False,
        grading_workers: int = 1, keys: list[tuple[int, str, int]] | None = None) -> list[dict]:
    """Generate and grade every (problem, mode, sample) not in `done` through one Engine.

    Args:
        model, tok: a model.Qwen3 (eval) and its tokenizer.Tokenizer with the memento tokens.
        problems: the Problems; modes: names from MODES; n_samples: samples per problem and mode.
        seed: base of sample_seed. config: the engine's options; its sampling holds the
            sampling parameters (max_tokens None: the paper's 32,768, within
            max_position_embeddings; a toy problem is capped at toy_max_new_tokens).
        shapes: {name: KV bytes per token} reported beside this model's own figures ("model").
        done: (problem id, mode, sample) keys to skip. on_record: callback(record, Sequence)
            per graded sample, in the order grading finished.
        keys: the (problem id, mode, sample) keys to generate, in this order (a data-parallel
            process's share, sharding.share; ids of `problems`, modes of `modes`); None:
            every key of problems x modes x n_samples not in `done`, problem-major.
        grading_workers: worker processes grading math and multiple-choice answers (each
            with math-verify's own timeouts in its main thread), so that a slow grade never
            stalls decoding; 0 grades in this thread. The embedded task is always graded here
            (a string check).
    Returns:
        the new records, in the order grading finished.
    Raises:
        ValueError for an unknown mode or restart with masking options it does not define.
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    for m in modes:
        check_mode(m, config.masking)  # restart where it is undefined: one line, before any work
    fmt = MementoTokens.from_tokenizer(tok)
    per_token = {"model": kv_bytes_per_token(model.config, next(model.parameters()).dtype), **(shapes or {})}
    toy_cap = toy_max_new_tokens(tok)
    jobs, records = {}, []

    bar = None
    if keys is None:
        todo = [(p, m, k) for p in problems for m in modes for k in range(n_samples) if (p.id, m, k) not in done]
        total = len(problems) * len(modes) * n_samples
    else:
        by_id = {p.id: p for p in problems}
        todo = [(by_id[i], m, k) for i, m, k in keys if (i, m, k) not in done]
        total = len(keys)
    if progress and todo:
        bar = tqdm(total=total, initial=total - len(todo), desc="samples", dynamic_ncols=True)

    pool = None
    if grading_workers > 0 and any(p.kind != "toy" for p, _, _ in todo):
        pool = ProcessPoolExecutor(grading_workers, mp_context=multiprocessing.get_context("spawn"))
    grading_now: dict = {}  # future -> (problem, mode, sample, Sequence)

    def emit(p, m, k, s, verdict=None) -> None:
        r = record(p, m, k, request_seed(seed, p.id, k), s, tok, fmt, per_token, verdict)
        records.append(r)
        if on_record:
            on_record(r, s)
        if bar is not None:
            bar.update(1)

    def harvest(wait: bool = False) -> None:
        for fut in [f for f in grading_now if wait or f.done()]:
            p, m, k, s = grading_now.pop(fut)
            emit(p, m, k, s, fut.result())

    def finished(s: Sequence) -> None:
        if s.id not in jobs:  # rejected inside Engine.add: reported below, once jobs knows it
            return
        p, m, k = jobs[s.id]
        if pool is None or p.kind == "toy" or s.stop_reason.startswith(POOL_CUT):
            emit(p, m, k, s)
        else:
            grading_now[pool.submit(grading.grade, tok.decode(s.tokens), p.gold, p.kind, p.prompt)] = (p, m, k, s)
        harvest()

    eng = Engine(model, tok, config, on_finish=finished)
    max_tokens = config.sampling.max_tokens or 32768
    for p, m, k in todo:
        prompt = tok.prompt_ids(p.prompt)
        cap = min(max_tokens, toy_cap) if p.kind == "toy" else max_tokens
        params = replace(config.sampling, seed=request_seed(seed, p.id, k),
                         max_tokens=max(1, min(cap, model.config.max_position_embeddings - len(prompt))))
        s = eng.add(prompt, params, mode=m)
        jobs[s.id] = (p, m, k)
        if s.done:  # rejected at once: recorded by the callback before jobs knew it
            finished(s)
    try:
        eng.run()
        harvest(wait=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if bar is not None:
        bar.close()
    return records


def summarize(records: list[dict], modes: list[str]) -> dict:
    """Per mode: problems, samples, pass@1 (mean over problems of the mean over samples) with
    its standard error across problems (§A.2.2), maj@k (grading.majority: the answer most
    samples give, equivalent spellings voting together, ties to the earliest sample), mean tokens, blocks, block and memento length, peak KV and KV AUC (tokens and
    GB per shape), and per_problem (pass@1 and maj@k of each problem); and the full/memento
    and restart/memento ratios of the KV means when those modes are present."""
    out = {}
    for m in modes:
        cut = sum(1 for r in records if r["mode"] == m and r.get("kv_pool_cut"))
        rs = [r for r in records if r["mode"] == m and not r.get("kv_pool_cut")]
        if not rs:
            continue
        by_p: dict[int, list[dict]] = {}
        for r in rs:
            by_p.setdefault(r["problem"], []).append(r)
        pass1 = [sum(r["correct"] for r in v) / len(v) for v in by_p.values()]
        maj = []
        for v in by_p.values():
            v = sorted(v, key=lambda r: r["sample"])  # sample order, not the order they finished in
            kind = v[0].get("kind") or grading.infer_kind(str(v[0].get("gold", "")))
            top = grading.majority([r["extracted"] for r in v], kind)
            maj.append(top is not None and v[top]["correct"])
        n = len(pass1)
        per_problem = [{"problem": p, "pass@1": a, "maj@k": b} for p, a, b in zip(by_p, pass1, maj)]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        row = {"problems": n, "samples": len(rs), "pass@1": sum(pass1) / n,
               "pass@1_se": statistics.stdev(pass1) / math.sqrt(n) if n > 1 else 0.0,
               "maj@k": sum(maj) / n, "k": max(len(v) for v in by_p.values()), "per_problem": per_problem,
               "kv_pool_cut": cut}
        for key in ("tokens", "blocks", "mean_block_tokens", "mean_memento_tokens", "peak_kv_tokens", "kv_auc"):
            row[key] = mean(key)
        shared = set.intersection(*(set(r) for r in rs))  # a rerun with other --kv-shapes reports fewer
        for key in rs[0]:
            if key.startswith(("peak_kv_gb@", "kv_auc_gb_ktok@")) and key in shared:
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
