"""The data-generation pipeline end to end, resumable (paper §3).

raw trace -> seed filter (§9.1) -> sentences (§9.2) -> boundary scores (§9.3) ->
blocks (§9.4) -> mementos (§9.5) -> one JSON line in the OpenMementos schema.

Input: read and checked by data/records.py before any request is made (INPUT; a repeated
task_id is reported with the line of the first; --bad-records decides whether a bad record
stops the run, the default, or is skipped and counted).

Resuming: every finished trace is appended to the output as one JSON line, flushed and
fsync'ed, and carries its key in pipeline.trace_id (task_id, else a hash of the cot). On
start the output is read back: finished keys are skipped, and a last line cut short by a
crash (no trailing newline) is truncated away. An output that is not this pipeline's (a line
without pipeline.trace_id) is refused, never truncated; --overwrite replaces it, writing the
new lines to a temp file renamed over it when the run ends. Lines are written in completion
order, which differs from input order when --workers > 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from data import records

from .format import build_response
from .llm import ChatClient, LLMError
from .memento import make_memento
from .score import score_boundaries, score_two_pass
from .seed import seed_reason, think_parts, trace_id
from .segment import segment
from .split import split_sentences
from .tokens import approx_tokens, make_token_counter

__all__ = ["Config", "process_trace", "read_done", "read_traces", "run_pipeline", "main"]


@dataclass
class Config:
    """Pipeline settings (defaults are the paper's, §3/§9). Token counts are in tokens."""

    min_trace_tokens: int = 1000   # §9.1: drop traces whose reasoning is shorter
    min_fragment_tokens: int = 5   # §9.2: merge shorter sentences
    window: int = 16               # §9.3: sentences per scoring request (single pass)
    two_pass: bool = False         # §9.3: windows 16 and 11, averaged
    min_block_tokens: int = 200    # §9.4
    lam: float = 0.5               # §9.4
    min_blocks: int = 1            # §9.4
    judge_threshold: int = 8       # §9.5
    max_refinements: int = 2       # §9.5


def process_trace(trace: dict, client: ChatClient, cfg: Config,
                  count_tokens: Callable[[str], int] = approx_tokens) -> dict:
    """Turn one raw trace (already past seed filtering) into an output record (§3).

    Returns the OpenMementos `default` fields (problem, response, domain, source,
    difficulty), the `full` fields (sentences, blocks, block_summaries) and `pipeline`
    (trace_id, boundary_scores, block_tokens, judge_scores per block per round, ...).
    `sentences` keep their trailing whitespace: "".join(sentences) is the reasoning text.
    Raises: LLMError when the endpoint keeps failing; ValueError on a malformed trace.
    """
    body, answer = think_parts(trace["cot"])
    sentences = split_sentences(body, count_tokens, cfg.min_fragment_tokens)
    lengths = [count_tokens(s) for s in sentences]
    if cfg.two_pass:
        scores = score_two_pass(client, sentences, (16, 11))
    else:
        scores = score_boundaries(client, sentences, cfg.window)
    blocks = segment(scores, lengths, cfg.min_block_tokens, cfg.lam, cfg.min_blocks)
    texts = ["".join(sentences[a:b + 1]).strip() for a, b in blocks]
    mementos, rounds = [], []
    for text in texts:
        r = make_memento(client, text, context="\n".join(mementos), threshold=cfg.judge_threshold,
                         max_refinements=cfg.max_refinements, count_tokens=count_tokens)
        mementos.append(r["memento"])
        rounds.append(r)
    return {
        "problem": trace.get("problem"),
        "response": build_response(texts, mementos, answer),
        "domain": trace.get("domain"),
        "source": trace.get("source"),
        "difficulty": trace.get("difficulty"),
        "sentences": sentences,
        "blocks": blocks,
        "block_summaries": mementos,
        "pipeline": {
            "trace_id": trace_id(trace),
            "boundary_scores": scores,
            "block_tokens": [sum(lengths[a:b + 1]) for a, b in blocks],
            "judge_scores": [r["scores"] for r in rounds],
            "judge_feedback": [r["feedback"] for r in rounds],
            "model": client.model,
            "config": asdict(cfg),
        },
    }


def _trace_id_field(v) -> dict:
    if not isinstance(v, dict) or not isinstance(v.get("trace_id"), str):
        raise records.Bad("not an object with a trace_id string")
    return v


OUTPUT = {"pipeline": _trace_id_field}  # what makes a line this pipeline's output
# A raw trace (§9.1): `cot` the text to segment (a blank one is filtered as no_cot); the rest
# is copied to the output as it is, `task_id` naming the trace (compared as text: 1 and "1"
# are one key).
INPUT = {"cot": records.string, "problem": records.optional(records.string), "task_id": records.optional(records.key)}
NOT_OURS = "pass --overwrite to replace it, or another --output"


def read_done(path: Path) -> set[str]:
    """Keys (pipeline.trace_id) of the traces already in the output file.

    The file must be this pipeline's output: every complete line an object with a
    pipeline.trace_id string. Bytes after the last newline are a line cut by a crash and are
    cut off the file, once its first line has shown that it is ours. Raises ValueError
    (records.DataError, one line) for a file that is not, or no longer, pipeline output: it is
    never truncated then.
    """
    if not path.exists():
        return set()
    data = records.read_bytes(path)
    keep = data.rfind(b"\n") + 1  # bytes after the last newline are a half-written line
    report = records.Report(str(path), "error", hint=f"this file was edited or is not this pipeline's output: {NOT_OURS}")
    rows = records.validate([r for r in records.jsonl_rows(str(path), data[:keep], report) if r.data is not None],
                            OUTPUT, report)
    if not rows and data.strip():  # only a fragment, or blank lines and no record: not ours to cut
        raise records.DataError(f"{path}: not this pipeline's output (no complete line with pipeline.trace_id); "
                                f"{NOT_OURS}")
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return {r.data["pipeline"]["trace_id"] for r in rows}


def read_traces(path: Path, bad: str = "error") -> tuple[list[records.Row], records.Report]:
    """The raw traces of --input (data/records.py's JSONL, each checked against INPUT), the
    second and later traces with one key (seed.trace_id) rejected as duplicates, naming the
    line of the first. Raises ValueError (records.DataError, one line) under bad="error"."""
    rows, report = records.load(str(path), INPUT, bad)
    first, kept = {}, []
    for r in rows:
        key = trace_id(r.data)
        if key in first:
            what = "task_id" if r.data.get("task_id") not in (None, "") else "cot (no task_id)"
            report.reject(r.where, f"{what}: a duplicate", f"the key {key!r} of line {first[key].split(':')[-1]}; "
                                                          "task ids compare as text: 1 and \"1\" are one")
            continue
        first[key] = r.where
        kept.append(r)
    report.kept = len(kept)
    return kept, report


def run_pipeline(input_path, output_path, client: ChatClient, cfg: Config | None = None,
                 workers: int = 1, limit: int | None = None,
                 count_tokens: Callable[[str], int] = approx_tokens, progress: bool = True,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                 bad: str = "error", overwrite: bool = False) -> dict:
    """Run the pipeline over a JSONL file of raw traces, resuming a previous run (§3/§9).

    Args: input_path: JSONL with cot (and problem, domain, source, task_id, difficulty);
        output_path: JSONL to append to; client: chat endpoint; cfg: settings; workers:
        traces processed concurrently; limit: only the first `limit` input traces are
        considered (finished ones included); progress: tqdm bar on stderr; bad: what an
        input record that fails INPUT, or repeats a key, does ("error": stop with one line;
        "skip": count it, logged by reason with its lines); overwrite: start a new output
        instead of resuming one (needed when output_path is not this pipeline's output): the
        new lines go to a temp file, renamed over output_path when the run ends, so the old
        file stays whole until then (and for good if the process is killed).
    Returns: counts {"input", "duplicates", "filtered": {reason: n}, "already_done",
        "written", "failed"}; a trace whose processing raises ValueError (unusable data) is
        logged, counted as failed and not written (a rerun tries it again).
    Raises: LLMError (after writing every trace that did finish) when the endpoint keeps
        failing; ValueError / FileNotFoundError on bad input or output files, before any
        request is made and before the output is touched.
    """

    cfg = cfg or Config()
    if workers < 1:
        raise ValueError(f"--workers {workers} must be >= 1")
    if cfg.window < 2 or cfg.min_block_tokens < 0 or cfg.min_blocks < 1 or cfg.lam < 0:
        raise ValueError(f"bad settings {cfg}: need window >= 2, min_block_tokens >= 0, "
                         f"min_blocks >= 1, lam >= 0")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit {limit} must be >= 0")
    input_path, output_path = Path(input_path), Path(output_path)
    rows, report = read_traces(input_path, bad)
    traces = [r.data for r in rows][:limit]
    if report.n_skipped:
        log(f"pipeline: {report.summary()}")
    done = set() if overwrite else read_done(output_path)
    stats = {"input": len(traces), "duplicates": sum(len(w) for r, w in report.skipped.items() if "duplicate" in r),
             "filtered": {}, "already_done": 0, "written": 0, "failed": 0}
    pending = []
    for t in traces:
        key = trace_id(t)
        reason = seed_reason(t, cfg.min_trace_tokens, count_tokens)
        if reason:
            stats["filtered"][reason] = stats["filtered"].get(reason, 0) + 1
        elif key in done:
            stats["already_done"] += 1
        else:
            pending.append(t)
    log(f"pipeline: {stats['input']} traces, filtered {stats['filtered'] or 'none'}, "
        f"{stats['already_done']} already done, {len(pending)} to process")

    error: BaseException | None = None
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # --overwrite: the new lines go to a temp file, renamed over the old output at the end
    target = output_path.with_name(f".{output_path.name}.overwrite-tmp") if overwrite else output_path
    if overwrite:
        target.unlink(missing_ok=True)  # a killed --overwrite run's: ours
    with open(target, "a", encoding="utf-8") as out, \
            ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(pending), disable=not progress, unit="trace") as bar:
        todo = iter(pending)
        running, futures = set(), {}
        while True:
            while error is None and len(running) < 2 * workers:
                t = next(todo, None)
                if t is None:
                    break
                fut = pool.submit(process_trace, t, client, cfg, count_tokens)
                futures[fut] = t
                running.add(fut)
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                t = futures.pop(fut)
                try:
                    rec = fut.result()
                except ValueError as e:  # this trace's data is unusable: skip it, keep going
                    stats["failed"] += 1
                    log(f"pipeline: skipped trace {trace_id(t)}: {e}")
                    continue
                except BaseException as e:  # stop feeding work; finish what is in flight
                    error = error or e
                    continue
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
                stats["written"] += 1
                bar.update(1)
    if overwrite:
        os.replace(target, output_path)
    log(f"pipeline: wrote {stats['written']} traces to {output_path}"
        + (f", skipped {stats['failed']} unusable (see above)" if stats["failed"] else ""))
    if error is not None:
        raise error
    return stats


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (`python -m data.pipeline --help`). Returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m data.pipeline",
                                description="Raw CoT traces -> OpenMementos blocks and mementos (MEMENTO §3).")
    p.add_argument("--input", required=True, help="JSONL of raw traces (cot, problem, domain, source, task_id)")
    p.add_argument("--output", required=True, help="JSONL to append results to (resumable)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output instead of resuming it (the old file stays until the new one is written)")
    p.add_argument("--bad-records", choices=records.BAD_RECORDS, default="error",
                   help="an input record that fails its check or repeats a task_id: 'error' stops with "
                        "FILE:LINE: field: what is wrong; 'skip' leaves it out and reports the skips")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="model name sent to the endpoint")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    p.add_argument("--workers", type=int, default=1, help="traces processed concurrently")
    p.add_argument("--limit", type=int, default=None, help="only the first N input traces")
    p.add_argument("--two-pass", action="store_true", help="score with windows 16 and 11, averaged")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer.json for exact token counts")
    p.add_argument("--min-trace-tokens", type=int, default=1000)
    p.add_argument("--min-block-tokens", type=int, default=200)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--min-blocks", type=int, default=1)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--judge-threshold", type=int, default=8)
    p.add_argument("--max-refinements", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=5, help="extra attempts per request")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds (doubles)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens per reply")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    api_key = None
    if a.api_key_env:
        api_key = os.environ.get(a.api_key_env)
        if not api_key:
            return fail(f"--api-key-env {a.api_key_env}: that environment variable is empty; export the key")
    cfg = Config(min_trace_tokens=a.min_trace_tokens, window=a.window, two_pass=a.two_pass,
                 min_block_tokens=a.min_block_tokens, lam=a.lam, min_blocks=a.min_blocks,
                 judge_threshold=a.judge_threshold, max_refinements=a.max_refinements)
    client = ChatClient(a.base_url, a.model, api_key=api_key, timeout=a.timeout, max_retries=a.retries,
                        backoff=a.backoff, temperature=a.temperature, max_tokens=a.max_tokens)
    try:
        count = make_token_counter(a.tokenizer)
        run_pipeline(a.input, a.output, client, cfg, workers=a.workers, limit=a.limit,
                     count_tokens=count, progress=not a.no_progress, bad=a.bad_records, overwrite=a.overwrite)
    except LLMError as e:
        return fail(f"{e} (finished traces are saved in {a.output}; rerun the same command to resume)")
    except (ValueError, OSError, ImportError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        if a.overwrite:
            return fail(f"interrupted; {a.output} was left as it was (--overwrite replaces it only when a run ends)")
        return fail(f"interrupted; finished traces are saved in {a.output}; rerun the same command to resume")
    return 0
