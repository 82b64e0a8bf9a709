"""Evaluate a checkpoint: pass@1 with the paper's answer checking, and the KV figures of Table 1.

    python eval.py --checkpoint out/stage2 --data toy --n-samples 4           # the embedded task, CPU
    python eval.py --checkpoint DIR|hub-id --data aime.jsonl --n-samples 8 --kv-cache-gib 40

The command line over evaluation.py (modes memento / full / restart, seeds, records, summary,
answer checking: see there). Each finished sample is appended to --out at once, one JSON
line; rerunning the same command skips what is there, so a killed run continues where it
stopped, and a rerun with other run-defining flags, other weights or other data (the
--data file's SHA-256) is refused. --data is read and checked by data/records.py: a bad row
stops the run with one line, FILE:LINE: field: what is wrong (--bad-records skip: skipped and
counted). The summary per mode is printed as a Markdown table and written to --out with
.summary.json in place of .jsonl.

    torchrun --nproc_per_node 8 eval.py --checkpoint DIR --data aime.jsonl --n-samples 64   # data parallel

Under torchrun every process builds its engine on its own device and decodes its share of the
(problem, mode, sample) keys (sharding.share), each with the seed it has in one process, so
the records are a single process's whatever the number of processes. Process 0 checks the
settings and the results file before any work (the others wait), appends its records to
--out, the others to --out.rankR.part beside it, and it merges the parts into --out at the
end and computes the summary over all records; a rerun, with any number of processes, reads
--out and any leftover part, so it skips what any process finished.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from checkpoint import model_fingerprint, write_json
from cli import (DEFAULT_CHECKPOINT, ArgumentParser, add_bad_records_arg, add_generation_args, engine_config,
                 kv_cache_budget, load_or_exit, nonnegative_int, positive_int)
from data import records
from evaluation import MODES, load_problems, markdown, run, summarize, toy_problems
from kv_cache import kv_bytes_per_token
from model import QWEN3_SHAPES, Qwen3Config
from model_runner import local_config
from sharding import (DataParallel, close_data_parallel, exchange, post, setup_data_parallel, share,
                      tensor_parallel)

# Flags whose change makes earlier results incomparable: a rerun with another value is refused.
# The data's content hash (data_sha256) and the weights' (checkpoint_sha256) are compared too.
RUN_DEFINING = ("checkpoint", "data", "split", "config", "problem_key", "answer_key", "seed", "temperature",
                "top_p", "top_k", "min_p",
                "max_new_tokens", "max_block_tokens", "keep_last_n_blocks", "mask_delimiters",
                "keep_last_block_for_answer", "dtype")
NOT_OURS = "not results of eval.py: pass --overwrite or another --out"

# One results line (evaluation.record) as far as a rerun reads it back: the key of the sample
# and what summarize averages. Anything else in the line is kept as it is.
RESULT = {"problem": records.count, "mode": records.one_of(*MODES), "sample": records.count,
          "correct": records.nullable(records.boolean), "extracted": records.nullable(records.string),
          "kv_pool_cut": records.optional(records.boolean),
          **{k: records.number for k in ("tokens", "blocks", "mean_block_tokens", "mean_memento_tokens",
                                         "peak_kv_tokens", "kv_auc")}}


# ----------------------------------------------------------------------------- results file

def read_done(path: Path) -> list[dict]:
    """The records already in a results file, each checked against RESULT (a line that is
    valid JSON but not a results record is refused, naming its line and field). A last line
    cut by a kill (no newline) is cut off the file, so appending continues on a clean line.
    Raises ValueError (records.DataError, one line) for a file that is not eval.py's results."""
    if not path.exists():
        return []
    data = records.read_bytes(path)
    keep = data.rfind(b"\n") + 1
    report = records.Report(str(path), "error", hint=NOT_OURS)
    rows = records.validate([r for r in records.jsonl_rows(str(path), data[:keep], report) if r.data is not None],
                            RESULT, report)
    for r in rows:
        if r.data["correct"] is None and not r.data.get("kv_pool_cut"):
            report.reject(r.where, "correct: null in a sample the KV pool did not end")
        for k, v in r.data.items():
            if k.startswith(("peak_kv_gb@", "kv_auc_gb_ktok@")) and not records.is_number(v):
                report.reject(r.where, f"{k}: {records.kind(v)}, expected a number")
    if keep != len(data):
        os.truncate(path, keep)  # our own line, cut by a kill
    return [r.data for r in rows]


def read_config(path: Path) -> dict | None:
    """The settings saved beside a results file (None if there are none). Raises ValueError
    (one line naming the file) when it is not a JSON object."""
    if not path.exists():
        return None
    data = records.read_bytes(path)
    try:
        saved = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a results config ({str(e).splitlines()[0]}); pass --overwrite or another "
                         "--out") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a results config ({records.kind(saved)}, expected an object); pass "
                         "--overwrite or another --out")
    return saved


def check_config(path: Path, config: dict, overwrite: bool, keys=RUN_DEFINING) -> None:
    """Refuse to mix results of different settings in one file (one line naming the flags);
    `keys`: the entries compared (the flags and the data's content hash, or the checkpoint's
    fingerprint once it is loaded: a checkpoint retrained in the same directory is another
    checkpoint). A key the saved config lacks is not compared. Raises ValueError."""
    if overwrite:
        return
    saved = read_config(path) or {}
    diff = []
    for k in keys:
        if k not in saved or saved[k] == config[k]:
            continue
        if k == "data_sha256":
            diff.append(f"--data {config['data']} holds other data (saved {saved[k]}, now {config[k]})")
        else:
            diff.append(f"--{k.replace('_', '-')} (saved {saved[k]!r}, now {config[k]!r})")
    if diff:
        raise ValueError(f"results in this --out were made with other settings: {'; '.join(diff)}; "
                         "rerun with the saved values, or pass --overwrite or another --out")


def part_path(out: Path, rank: int) -> Path:
    """Where data-parallel process `rank` (>= 1) appends its records (Table 1 results lines)
    during a run: OUT.rankR.part beside --out (process 0 appends to --out itself). Raises
    nothing."""
    return out.with_name(f"{out.name}.rank{rank}.part")


def part_files(out: Path) -> list[Path]:
    """The part files beside --out (part_path), by rank: this run's, or a killed run's (Table 1
    results lines, read back by read_done). Raises OSError when the folder cannot be listed."""
    found = []
    for p in out.parent.glob(f"{glob.escape(out.name)}.rank*.part"):
        r = p.name[len(out.name) + len(".rank"):-len(".part")]
        if r.isdigit():
            found.append((int(r), p))
    return [p for _, p in sorted(found)]


def merge_parts(out: Path, parts: list[Path]) -> None:
    """Append to --out every complete line of the part files (in rank order) that --out does
    not already hold, then delete the parts. Only process 0 writes --out, so lines never
    interleave; a merge killed midway leaves a cut last line (which read_done drops) and the
    parts in place, and the next merge skips the lines already copied (a line is a sample's
    record with its timings: two runs never write the same line). Table 1's results, one
    file. Raises OSError, or records.DataError (a ValueError) for a part that cannot be read."""
    have = records.read_bytes(out) if out.exists() else b""
    seen = {hashlib.sha256(line).digest() for line in have.splitlines()}
    with out.open("ab") as f:
        for part in parts:
            data = records.read_bytes(part)
            for line in data[:data.rfind(b"\n") + 1].splitlines():
                digest = hashlib.sha256(line).digest()
                if line.strip() and digest not in seen:
                    f.write(line + b"\n")
                    seen.add(digest)
        f.flush()
        os.fsync(f.fileno())
    for part in parts:
        part.unlink()


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> dict:
    """Run the evaluation command (paper Table 1, §A.2.2); returns the summary dict (under
    torchrun on process 0; None on the others). A problem the user can fix (bad data, a
    results file that is not ours, other settings) exits with one line, on every process;
    nothing in --out changes before every input was checked."""
    ap = ArgumentParser(prog="eval.py", description=__doc__)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint dir, training run dir or hub id")
    ap.add_argument("--data", default="toy", help="'toy', a .jsonl/.parquet file or a hub dataset id")
    ap.add_argument("--problem-key", default="problem", help="column holding the problem")
    ap.add_argument("--answer-key", default="answer",
                    help="column holding the reference answer: a string, a number, or a list of acceptable answers")
    add_bad_records_arg(ap, "error")
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
    try:
        dp = setup_data_parallel(args.device, args.tensor_parallel_size)
    except ValueError as e:
        sys.exit(f"eval.py: {e}")
    args.device = str(dp.device)
    try:
        return evaluate(ap, args, modes, shapes, engine, dp)
    finally:  # an error path: leave without a barrier (a clean run has left already)
        close_data_parallel(dp, clean=False)


def _agree(dp: DataParallel, name: str, error: str | None, **payload) -> list[dict]:
    """exchange {"error", **payload} among the processes; when any posted an error every
    process exits (status 1), the one whose error it is printing it: one line."""
    got = exchange(dp, name, {"error": error, **payload})
    if any(g["error"] for g in got):
        close_data_parallel(dp)  # every process saw it here and leaves: together
        sys.exit(f"eval.py: {error}" if error else 1)
    return got


def _key(r: dict) -> tuple[int, str, int]:
    return r["problem"], r["mode"], r["sample"]


def evaluate(ap: ArgumentParser, args, modes: list[str], shapes: list[str], engine, dp: DataParallel) -> dict | None:
    """The evaluation of main's checked flags in this process (paper Table 1, §A.2.2,
    §A.3.1): its share of the samples, and on process 0 (dp.lead) the checks before any
    work, the merge and the summary, which it returns (the other processes: None). Exits
    with one line for a problem the user can fix."""
    if args.data == "toy":  # generated from --seed: no file to hash
        problems, report = toy_problems(args.toy_problems, args.seed), None
    else:
        try:
            problems, report = load_problems(args.data, args.problem_key, args.answer_key, split=args.split,
                                             config=args.config, seed=args.seed, bad=args.bad_records)
        except (FileNotFoundError, ValueError, ImportError) as e:
            sys.exit(f"eval.py: {e}")
        if report.n_skipped and dp.lead:
            print(f"eval.py: {report.summary()}", file=sys.stderr)
        if not problems:
            sys.exit(f"eval.py: --data {args.data}: no usable problem")
    problems = problems[:args.limit]

    # Every input is checked before anything in --out changes: the data above, then the
    # results already there (their settings, data and lines, a killed data-parallel run's
    # parts included), then the checkpoint. Process 0 checks; the others wait for its word.
    out = Path(args.out)
    config_path = out.with_name(out.name.removesuffix(".jsonl") + ".config.json")
    summary_path = out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
    config = {**{k: getattr(args, k) for k in RUN_DEFINING}, "data_sha256": report and report.data_hash}
    previous, parts, error = [], part_files(out) if dp.lead else [], None
    if dp.lead and not args.overwrite:
        if (out.exists() or parts) and not config_path.exists():
            error = f"--out {out} exists without {config_path.name}, so it is {NOT_OURS}"
        else:
            try:
                check_config(config_path, config, False, (*RUN_DEFINING, "data_sha256"))
                previous = read_done(out) + [r for part in parts for r in read_done(part)]
            except ValueError as e:
                error = str(e)
    _agree(dp, "results", error)
    model, tok = load_or_exit("eval.py", args.checkpoint, args.device, getattr(torch, args.dtype))
    fingerprint = model_fingerprint(model) if dp.lead else None  # of the whole model, whatever the split
    if dp.tp is not None:
        try:
            tensor_parallel(model, dp.tp)
        except ValueError as e:
            sys.exit(f"eval.py: {e}")
    engine = kv_cache_budget(ap, args, engine, local_config(model))  # --kv-cache-gib is per process

    # problem-major, as one process adds them: the order the share rule deals from
    wanted = [(p.id, m, k) for p in problems for m in modes for k in range(args.n_samples)]
    done, todo = set(), None
    if dp.lead:
        config["checkpoint_sha256"] = fingerprint
        try:
            check_config(config_path, config, args.overwrite, ("checkpoint_sha256",))
        except ValueError as e:
            error = str(e)
        if error is None:
            out.parent.mkdir(parents=True, exist_ok=True)
            if args.overwrite:  # the new run is known to start: the old results go
                for f in (out, *parts):
                    f.unlink(missing_ok=True)
            write_json(config_path, config)
            if parts and not args.overwrite:  # a killed run's records join --out before any new one
                try:
                    merge_parts(out, parts)
                except (ValueError, OSError) as e:  # one line; the others are told, not left waiting
                    error = f"cannot merge {', '.join(p.name for p in parts)} into {out}: {e}"
        if error is None:
            latest = {_key(r): r for r in previous}  # a retried sample's last line counts
            previous = list(latest.values())
            cut = {key for key, r in latest.items() if r.get("kv_pool_cut")} & set(wanted)  # retried now
            done = set(latest) & set(wanted) - cut
            todo = [key for key in wanted if key not in done]
            print(f"eval.py: {len(problems)} problems x {args.n_samples} samples x {len(modes)} modes = {len(wanted)} "
                  f"samples, {len(done)} already in {out}" + (f", {len(cut)} ended by the KV pool retried" if cut else "")
                  + (f"; {len(todo)} to generate on {dp.size} processes (data parallel)" if dp.size > 1 else ""),
                  file=sys.stderr)
    todo = [tuple(key) for key in _agree(dp, "start", error, todo=todo)[0]["todo"]]
    mine = share(todo, dp.rank, dp.size)

    # Process 0 appends to --out, the other engines each to its own part: no two writers in a
    # file (the other processes of a tensor-parallel group run the same samples and write none).
    target, sink = (out if dp.lead else part_path(out, dp.rank)), None

    def write(r: dict, _seq) -> None:
        nonlocal sink
        if not dp.writer:
            return
        if sink is None:
            sink = target.open("a", encoding="utf-8")
        sink.write(json.dumps(r) + "\n")
        sink.flush()

    t0 = time.perf_counter()
    try:
        new = run(model, tok, problems, modes, args.n_samples, seed=args.seed, config=engine,
                  shapes={s: kv_bytes_per_token(Qwen3Config.released(s), torch.bfloat16) for s in shapes}, keys=mine,
                  on_record=write, progress=dp.lead and not args.no_progress and sys.stderr.isatty(),
                  grading_workers=args.grading_workers)
    except BaseException as e:  # the others learn it at "done" instead of waiting; the traceback follows
        post(dp, "done", {"error": f"process {dp.process} failed ({type(e).__name__}: {e})", "samples": 0, "tokens": 0})
        raise
    finally:
        if sink is not None:
            sink.close()
    ran = exchange(dp, "done", {"error": None, "samples": len(new) if dp.writer else 0,
                                "tokens": sum(r["tokens"] for r in new) if dp.writer else 0})
    seconds = time.perf_counter() - t0
    failed = [r["error"] for r in ran if r["error"]]
    if failed:
        sys.exit(f"eval.py: {failed[0]}; the finished samples are kept: rerun the same command to continue"
                 if dp.lead else 1)
    close_data_parallel(dp)  # every process is here: leave together
    if not dp.lead:
        return None

    parts = part_files(out)
    try:
        new += [r for part in parts for r in read_done(part)]
        merge_parts(out, parts)
    except (ValueError, OSError) as e:
        sys.exit(f"eval.py: {e}")
    missing = set(todo) - {_key(r) for r in new}
    if missing:  # a part written where process 0 cannot see it
        sys.exit(f"eval.py: {len(missing)} samples the other processes finished are not in {out.name}.rankR.part "
                 f"beside {out}: give every process an --out on a filesystem they all see")
    # one order whatever the number of processes and the order samples finished in
    finished = sorted([r for r in previous if _key(r) in done] + new,
                      key=lambda r: (r["problem"], MODES.index(r["mode"]), r["sample"]))
    summary = summarize(finished, modes)
    new_tokens = sum(r["tokens"] for r in ran)
    result = {"summary": summary, "config": {**config, "modes": modes, "n_samples": args.n_samples,
                                             "problems": len(problems),
                                             "skipped_rows": report.skipped if report else {}},
              "generated": {"samples": len(new), "tokens": new_tokens, "seconds": seconds,
                            "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0,
                            "data_parallel_size": dp.size, "tensor_parallel_size": args.tensor_parallel_size,
                            "samples_per_process": [r["samples"] for r in ran]}}
    write_json(summary_path, result)
    print(markdown(summary))
    print(f"\n{len(new)} samples generated in {seconds:.1f} s ({result['generated']['tokens_per_s']:.0f} tokens/s"
          + (f" on {dp.size} processes" if dp.size > 1 else "") + f"); results in {out}, summary in {summary_path}",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
