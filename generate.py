"""Generate with block masking and a compacting KV cache (paper §6.1, §6.2.1, §A.3).

    python generate.py --prompt "..." [--checkpoint DIR|hub-id]
    python generate.py --prompts-file prompts.txt --num-samples 4 --max-num-seqs 64 --json
    python generate.py --replay traces.jsonl --json

Everything runs through engine.Engine: requests are admitted as the KV pool allows, decoded
together, and each token the block tracker reads as a mask start evicts what it masks before
it is fed (as the official engine does when <|summary_end|> is sampled). --restart also
recomputes each memento's K/V without its block (the implicit-channel ablation, §6.2.1);
--no-compaction keeps every token (the full-cache baseline). With one prompt the trace is
streamed, with its KV summary; with many, a progress bar, then one summary (or JSON line) each.

    torchrun --nproc_per_node 8 generate.py --prompts-file prompts.txt --num-samples 64 --json

Under torchrun (data parallel) every process builds its engine on its own device and
generates its share of the requests (sharding.share: request i is prompt i // num-samples;
replayed traces are dealt by length), request i with the seed it has in one process;
process 0 prints everything, in request order, as one process would.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys

import torch
import torch.distributed as dist

from cli import (DEFAULT_CHECKPOINT, ArgumentParser, add_bad_records_arg, add_generation_args, engine_config,
                 kv_cache_budget, load_or_exit, positive_int)
from data import records
from data.toy_task import check_trace, parse_prompt
from engine import Mode, Sequence, generate
from kv_cache import curve_stats
from sampling import request_seed
from model_runner import local_config
from sharding import (DataParallel, close_data_parallel, exchange, post, setup_data_parallel, share,
                      tensor_parallel)


def kv_summary(seq: Sequence, bytes_per_token: int) -> dict:
    """The §A.3.1 figures for one sequence (kv_cache.curve_stats of its curve, a full cache's
    beside them), with its token counts, stop reason and metrics."""
    curve = seq.curve
    return {
        "tokens": len(seq.tokens),
        "prompt_tokens": len(seq.prompt),
        "blocks_completed": seq.blocks_completed,
        **curve_stats(curve, bytes_per_token),
        "bytes_per_token": bytes_per_token,
        "preemptions": seq.preemptions,
        "stop_reason": seq.stop_reason,
        "metrics": seq.metrics(),
        "kv_curve": curve,
    }


# ----------------------------------------------------------------------------- command line

STYLE = {"block": "\033[2m", "memento": "\033[1;36m", "delimiter": "\033[33m", "text": ""}
RESET = "\033[0m"


def read_inputs(args, quiet: bool = False) -> tuple[list[records.Row], records.Report | None]:
    """The prompts or traces of --prompts-file / --replay, read and checked by data/records.py
    (--replay: records.TRACE, a non-empty `problem` and a well-formed memento `response`;
    --prompts-file: records.read_prompts); [] and None for --prompt. A bad record stops the
    run (one line: FILE:LINE: field: what is wrong) or, with --bad-records skip, is skipped
    and the skips are reported on stderr (quiet: not; the other processes of a data-parallel
    run). Exits with one line when the file cannot be read or nothing usable is left."""
    if args.prompt is not None:
        return [], None
    flag, path = ("--replay", args.replay) if args.replay else ("--prompts-file", args.prompts_file)
    try:
        if args.replay:
            rows, report = records.load(path, records.TRACE, args.bad_records)
        else:
            rows, report = records.read_prompts(path, args.bad_records)
    except (ValueError, ImportError) as e:
        sys.exit(f"generate.py: {flag} {e}")
    if report.n_skipped and not quiet:
        print(f"generate.py: {report.summary()}", file=sys.stderr)
    if not rows:
        sys.exit(f"generate.py: {flag} {path}: no usable {'trace' if args.replay else 'prompt'}")
    return rows, report


def plot_curves(path: str, curves: list[tuple[str, list[int]]]) -> None:
    """Write the sawtooth: KV tokens per step, memento vs full cache. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("generate.py: --plot needs matplotlib (pip install matplotlib)")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for label, c in curves:
        ax.plot(range(1, len(c) + 1), c, label=label, lw=1)
    ax.set_xlabel("tokens in the sequence (prompt + response)")
    ax.set_ylabel("tokens in the KV cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    """Run the generation command (paper §6.1, §A.3): prompts, samples or replayed traces
    through the engine, then the KV summary. A bad flag or input file exits with one line."""
    ap = ArgumentParser(prog="generate.py", description=__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the user message (ChatML is applied); the embedded task's prompts are "
                                      "'sum N blocks from S' with N 3-6 and S 0-9")
    src.add_argument("--prompts-file", metavar="FILE", help="one prompt per line (plain text, or JSON with 'problem')")
    src.add_argument("--replay", metavar="FILE.jsonl", help="teacher-force OpenMementos traces (problem, response)")
    add_bad_records_arg(ap, "error")
    ap.add_argument("--num-samples", type=positive_int, default=1, help="samples per prompt (each with its own seed)")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint dir, training run dir or hub id")
    ap.add_argument("--restart", action="store_true", help="restart mode: recompute mementos without their block")
    ap.add_argument("--no-compaction", action="store_true", help="full KV cache (baseline)")
    add_generation_args(ap, max_new_tokens=2048)
    ap.add_argument("--replay-chunk", type=positive_int, default=256,
                    help="teacher-forced tokens per forward in --replay (exact; memory vs speed)")
    ap.add_argument("--json", action="store_true", help="one JSON object per sequence on stdout")
    ap.add_argument("--plot", metavar="FILE.png", help="write the KV sawtooth (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.prompt is None and args.replay is None and args.prompts_file is None:
        ap.error("give --prompt TEXT, --prompts-file FILE or --replay FILE.jsonl")
    if args.restart and args.no_compaction:
        ap.error("--restart needs compaction (it recomputes mementos after their block is evicted); drop --no-compaction")
    mode = Mode.FULL if args.no_compaction else Mode.RESTART if args.restart else Mode.MEMENTO
    config = engine_config(ap, args, mode, replay_chunk=args.replay_chunk)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the engine's one line on its KV budget
    try:
        dp = setup_data_parallel(args.device, args.tensor_parallel_size)
    except ValueError as e:
        sys.exit(f"generate.py: {e}")
    args.device = str(dp.device)
    try:
        run(ap, args, config, dp)
    finally:  # an error path: leave without a barrier (a clean run has left already)
        close_data_parallel(dp, clean=False)


def run(ap: ArgumentParser, args, config, dp: DataParallel) -> None:
    """Generation of main's checked flags in this process (paper §6.1, §A.3): its share of the
    requests, then on process 0 (dp.lead) every request's output in request order. Exits with
    one line for a bad input file or request."""
    rows, _ = read_inputs(args, quiet=not dp.lead)  # before the model: a bad file costs no load
    model, tok = load_or_exit("generate.py", args.checkpoint, args.device, getattr(torch, args.dtype))
    if dp.tp is not None:
        try:
            tensor_parallel(model, dp.tp)
        except ValueError as e:
            sys.exit(f"generate.py: {e}")
    config = kv_cache_budget(ap, args, config, local_config(model))  # --kv-cache-gib is per process

    # (name, prompt ids, forced response ids or None). A problem is plain text (prompt_ids: a
    # control token written in it stays text); a replayed response keeps its special tokens.
    if args.replay:
        jobs = [(r.where, tok.prompt_ids(r.data["problem"]), tok.encode(r.data["response"])) for r in rows]
    else:
        texts = [("prompt", args.prompt)] if args.prompt is not None else [(r.where, r.data["problem"]) for r in rows]
        jobs = [(f"{name}#{k}" if args.num_samples > 1 else name, tok.prompt_ids(text), None)
                for name, text in texts for k in range(args.num_samples)]
    max_pos = model.config.max_position_embeddings
    for i, (name, prompt, forced) in enumerate(jobs):
        if forced is not None and len(prompt) + len(forced) > max_pos:
            over = len(prompt) + len(forced) - max_pos
            if dp.lead:
                print(f"{name}: trace is {over} tokens longer than max_position_embeddings; truncated", file=sys.stderr)
            jobs[i] = (name, prompt, forced[:len(forced) - over])
    # a sampled response stops where positions end (too long a prompt: engine.add says so);
    # request i samples with request_seed(--seed, i) in whichever process generates it
    params = [dataclasses.replace(config.sampling, max_tokens=max(1, min(config.sampling.max_tokens, max_pos - len(p))),
                                  seed=request_seed(args.seed, i))
              for i, (_, p, _) in enumerate(jobs)]
    # a replay's work is known (its tokens): dealt by length; samples are dealt in turn
    mine = share(list(range(len(jobs))), dp.rank, dp.size,
                 [len(p) + len(f) for _, p, f in jobs] if args.replay else None)
    stream = not args.json and len(jobs) == 1 and jobs[0][2] is None
    color = stream and sys.stdout.isatty()

    def show(seq_id, t, kind):
        piece = tok.decode_bytes([t]).decode("utf-8", errors="replace")
        sys.stdout.write(f"{STYLE[kind]}{piece}{RESET}" if color and STYLE[kind] else piece)
        sys.stdout.flush()

    outputs, error = {}, None
    if mine:
        try:
            seqs, eng = generate(model, tok, [jobs[i][1] for i in mine], config, [params[i] for i in mine],
                                 forced=None if args.replay is None else [jobs[i][2] for i in mine],
                                 on_token=show if stream and dp.lead else None,
                                 progress=dp.lead and len(jobs) > 1 and sys.stderr.isatty())
        except ValueError as e:
            error = str(e)
        except BaseException as e:  # the others learn it at "done" instead of waiting; the traceback follows
            post(dp, "done", f"process {dp.process} failed ({type(e).__name__}: {e})")
            raise
        else:
            outputs = {i: {"summary": kv_summary(s, eng.cache.bytes_per_token), "token_ids": s.prompt + s.tokens,
                           "text": s.text} for i, s in zip(mine, seqs)}
    if any(exchange(dp, "done", error)):
        sys.exit(f"generate.py: {error}" if error else 1)
    if dp.processes > 1:  # every process is here: the outputs go to process 0
        gathered = [None] * dp.processes if dp.lead else None
        dist.gather_object(outputs, gathered, dst=0)
        outputs = {i: o for part in gathered or [] for i, o in part.items()}
    close_data_parallel(dp)
    if not dp.lead:
        return
    if dp.size > 1:  # (a tensor-parallel group's processes hold the same outputs: counted once)
        per_engine = gathered[::dp.processes // dp.size]
        print(f"generate.py: {len(jobs)} request{'s' * (len(jobs) != 1)} on {dp.size} engines (data parallel): "
              f"{' + '.join(str(len(part)) for part in per_engine)}", file=sys.stderr)

    curves = []
    for i, (name, _, _) in enumerate(jobs):
        summary, text = outputs[i]["summary"], outputs[i]["text"]
        if summary["stop_reason"].startswith(("rejected", "KV pool full")):
            print(f"generate.py: {name}: {summary['stop_reason']}", file=sys.stderr)
        curves.append((name, summary["kv_curve"]))
        verdict = _task_verdict(args.prompt, text) if args.prompt else None
        if args.json:
            out = {"name": name, **summary, "token_ids": outputs[i]["token_ids"],
                   "special_token_ids": dict(tok.special_ids), "restart": args.restart,
                   "compaction": not args.no_compaction}
            if args.replay is None:
                out["text"] = text
            if verdict is not None:
                out["task_check"] = verdict
            print(json.dumps(out))
        else:
            if stream:
                print()
            elif args.replay is None:
                print(f"\n=== {name} ===\n{text}")
            if verdict is not None:
                print(f"\ntask check: {verdict}")
            print_summary(name, summary, args)
    if args.plot:
        plot_curves(args.plot, [(f"{n} (memento)", c) for n, c in curves] +
                    [("full cache", list(range(1, max(len(c) for _, c in curves) + 1)))])


def print_summary(name: str, s: dict, args) -> None:
    """The human-readable KV summary printed after a generation or replay."""
    mb = 1 / 2**20
    mode = "full cache (--no-compaction)" if args.no_compaction else ("restart mode" if args.restart else "memento compaction")
    print(f"\n--- KV summary [{name}] ({mode}) ---")
    print(f"tokens generated      {s['tokens']:>10,}   (prompt {s['prompt_tokens']:,})")
    print(f"blocks completed      {s['blocks_completed']:>10,}")
    print(f"peak KV tokens        {s['peak_kv_tokens']:>10,}   full cache {s['full_cache_peak_kv_tokens']:,}"
          f"   ({s['full_cache_peak_kv_tokens'] / max(1, s['peak_kv_tokens']):.2f}x)")
    print(f"KV AUC (token·steps)  {s['kv_auc']:>10,}   full cache {s['full_cache_kv_auc']:,}"
          f"   ({s['full_cache_kv_auc'] / max(1, s['kv_auc']):.2f}x)")
    print(f"peak KV bytes         {s['peak_kv_bytes'] * mb:>10.2f} MiB   full cache {s['full_cache_peak_kv_bytes'] * mb:.2f} MiB"
          f"   ({s['bytes_per_token']:,} B/token for this model and dtype)")


def _task_verdict(prompt: str, text: str):
    """The embedded task's checker, when the prompt is one of its problems (else None)."""
    spec = parse_prompt(prompt)
    return None if spec is None else check_trace(spec, text)


if __name__ == "__main__":
    main()
