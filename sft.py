"""Two-stage SFT (paper §4, §A.2.1): the data of every step, the stage's mask, the training loop.

Stage 1 trains with full causal attention (keep_last_n_blocks=-1) to learn the format; stage
2 with memento attention (blocks.build_mask_from with keep_last_n_blocks=0), initialized from
stage 1: same loss (every response token, prompt labelled -100), same optimizer (AdamW, no
weight decay), same schedule (cosine with warmup). One loop for one process, DDP and FSDP2
(sharding.py); runs, checkpoints, resume and signals are training.py's. train_sft.py is its
command line; `train(parse_args(argv))` is the same run from Python (the experiments do so).

With no other argument this trains a tiny Qwen3 from scratch with the byte-level tokenizer on
the embedded running-sum task (data/toy_task.py: "sum N blocks from S", N from 3 to 6, S from
0 to 9), and writes the runs out/stage1 and out/stage2.
"""
from __future__ import annotations

import json
import math
import random
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from blocks import MementoConfig, MementoTokens, build_mask_from
from checkpoint import add_memento_tokens, resolve_checkpoint
from cli import ArgumentParser, add_bad_records_arg, fraction, nonnegative_int, positive_float, positive_int
from data import openmementos, records, toy_task
from model import Qwen3, Qwen3Config
from sharding import generation_copy, grad_sync, load_optimizer_state, local_bytes, parallelize, total_norm
from tokenizer import Tokenizer
from training import (StopRequest, TrainingError, add_optimizer_args, add_run_args, check_resume_args, check_run_args,
                      clear_run, compute_autocast, evaluate_toy, load_training_state, lr_at, metrics_file, save_if_due, start_run)

# Flags whose change would make a resumed run differ from an uninterrupted one.
RUN_DEFINING = ("stage", "data", "data_sha256", "val_data", "val_data_sha256", "val_frac", "init_from", "seed",
                "batch_size", "grad_accum", "world_size", "max_seq_len", "max_steps", "epochs", "lr", "warmup_frac",
                "grad_clip", "keep_last_n_blocks", "mask_delimiters", "keep_last_block_for_answer", "layers", "hidden",
                "heads", "kv_heads")


def parse_args(argv=None, description: str | None = None):
    """train_sft.py's flags, every one checked up front; a bad one exits with one line
    (cli.ArgumentParser, exit 2). description: the --help text (the script's docstring)."""
    ap = ArgumentParser(prog="train_sft.py", description=description)
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: full attention; 2: memento attention")
    ap.add_argument("--init-from", default=None,
                    help="checkpoint dir, training run or hub id; default: scratch (stage 1), out/stage1 (stage 2)")
    # data
    ap.add_argument("--data", default="toy", help="'toy' (the embedded task: 'sum N blocks from S', N 3-6, S 0-9), "
                                                  "a .jsonl/.parquet file or folder, or a hub dataset id")
    ap.add_argument("--val-data", default=None, help="held-out .jsonl/.parquet (or hub id) for the validation loss")
    add_bad_records_arg(ap, "skip")
    ap.add_argument("--val-frac", type=fraction, default=0.0, help="hold out this fraction of --data instead")
    ap.add_argument("--val-every", type=nonnegative_int, default=100, help="steps between validation losses (0 = end only)")
    ap.add_argument("--max-seq-len", type=positive_int, default=32768,
                    help="tokens per example: longer ones are cut at the end; one whose prompt leaves no room is skipped")
    ap.add_argument("--seed", type=int, default=42, help="data order, initialization and evaluation prompts")
    # steps and batches
    ap.add_argument("--max-steps", type=positive_int, default=None,
                    help="optimizer steps; default 400 (stage 1) / 150 (stage 2) on the toy task, else from --epochs")
    ap.add_argument("--epochs", type=positive_float, default=5.0, help="passes over a dataset (not used on the toy task)")
    ap.add_argument("--batch-size", type=positive_int, default=None, help="examples per process per micro-step (toy 32, else 1)")
    ap.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    add_optimizer_args(ap, lr=None, lr_help="peak learning rate, the same for both stages (toy task 2e-3; else the paper's 8e-5)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    # masking (stage 2; the official engine's names)
    ap.add_argument("--keep-last-n-blocks", type=int, default=None, help="stage 2 default 0; stage 1 is always -1")
    ap.add_argument("--mask-delimiters", action="store_true", help="also hide a masked block's delimiters")
    ap.add_argument("--keep-last-block-for-answer", action="store_true", help="the last block stays visible to the answer")
    # the embedded task's evaluation
    ap.add_argument("--eval-every", type=nonnegative_int, default=200, help="steps between toy evals (0 = only at the end)")
    ap.add_argument("--eval-samples", type=nonnegative_int, default=200, help="toy problems per eval (0 = no eval)")
    # size of a model trained from scratch (the embedded default)
    ap.add_argument("--layers", type=positive_int, default=3, help="from scratch: decoder layers")
    ap.add_argument("--hidden", type=positive_int, default=128, help="from scratch: hidden size")
    ap.add_argument("--heads", type=positive_int, default=4, help="from scratch: query heads")
    ap.add_argument("--kv-heads", type=positive_int, default=2, help="from scratch: key/value heads (GQA)")
    add_run_args(ap, out=None, save_every=100)  # --out default: out/stage{N}
    args = ap.parse_args(argv)
    check_run_args(ap, args)
    toy = args.data == "toy"
    args.out = args.out or f"out/stage{args.stage}"
    if args.init_from is None and args.stage == 2:
        args.init_from = "out/stage1"
    # The toy defaults train a tiny model from scratch; a pretrained model wants the paper's lr.
    args.lr = args.lr if args.lr is not None else (2e-3 if toy else 8e-5)
    args.batch_size = args.batch_size or (32 if toy else 1)
    if toy and args.max_steps is None:
        args.max_steps = 400 if args.stage == 1 else 150
    if args.stage == 1:
        if args.keep_last_n_blocks not in (None, -1):
            ap.error("--keep-last-n-blocks: stage 1 trains with full attention; it applies to --stage 2")
        args.keep_last_n_blocks = -1
    elif args.keep_last_n_blocks is None:
        args.keep_last_n_blocks = 0
    try:
        args.memento = MementoConfig(args.keep_last_n_blocks, args.mask_delimiters, args.keep_last_block_for_answer)
    except ValueError as e:
        ap.error(f"--keep-last-n-blocks: {e}")
    if args.hidden % args.heads or args.heads % args.kv_heads or (args.hidden // args.heads) % 2:
        ap.error(f"--hidden {args.hidden} / --heads {args.heads} / --kv-heads {args.kv_heads}: hidden must be a multiple "
                 "of heads with an even head size, and heads a multiple of kv-heads")
    if args.max_seq_len < 8:
        ap.error(f"--max-seq-len {args.max_seq_len}: too short to hold a prompt and a response; use >= 8")
    if args.val_data and args.val_frac:
        ap.error("--val-data and --val-frac: give one of them")
    if toy and (args.val_data or args.val_frac):
        ap.error("--val-data/--val-frac: the toy task has no held-out file; its check is --eval-samples")
    return args


# ----------------------------------------------------------------------------- setup

def build_model(args, resume_from: Path | None):
    """(model, tokenizer, generation config dict) to train: from scratch (tiny, byte-level), a
    checkpoint, or the run's checkpoint being resumed. Raises TrainingError if it cannot load."""
    if resume_from is None and args.init_from is None:
        tok = Tokenizer.byte_level()
        vocab = (tok.n_vocab + 15) // 16 * 16
        cfg = Qwen3Config(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                          max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=10000.0,
                          eos_token_id=tok.token_id("<|im_end|>"))
        torch.manual_seed(args.seed)
        return Qwen3(cfg).init_weights(seed=args.seed), tok, {}
    source = resume_from if resume_from is not None else args.init_from
    if source == "out/stage1" and not Path(source).is_dir():
        raise TrainingError("--stage 2 starts from out/stage1, which does not exist: run `python train_sft.py --stage 1` "
                            "first, or pass --init-from")
    try:
        path = resolve_checkpoint(source)
        model = Qwen3.from_pretrained(path)
        tok = Tokenizer.from_dir(path)
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise TrainingError(f"cannot load --init-from: {str(e).strip(chr(34))}")
    if resume_from is None:
        add_memento_tokens(model, tok, seed=args.seed)  # no-op for tokens already present
    return model, tok, gen


class Batches:
    """The global batch of every step, fixed by (seed, step): `--resume` and every process of a
    distributed run see the same data in the same order. Rank r trains on its contiguous slice.
    Also the held-out examples for the validation loss (`val`). Reading the data (records.py)
    sets args.data_sha256 and args.val_data_sha256, the content hashes --resume compares.
    Raises TrainingError (one line) for data that cannot be read or holds no usable trace."""

    def __init__(self, args, tok, rank: int, world: int):
        self.args, self.tok, self.rank, self.world = args, tok, rank, world
        self.global_batch = args.batch_size * args.grad_accum * world
        self.val: list[openmementos.Example] = []
        args.data_sha256 = args.val_data_sha256 = None
        if args.data == "toy":
            self.examples, self.report = None, "generated"
            return
        rows, report = self._read(args.data, "--data")
        args.data_sha256 = report.data_hash
        val_rows, val_report = [], records.Report(args.data, "skip")
        if args.val_data:
            val_rows, val_report = self._read(args.val_data, "--val-data")
            args.val_data_sha256 = val_report.data_hash
        elif args.val_frac:
            order = list(range(len(rows)))
            random.Random(f"val:{args.seed}").shuffle(order)
            held = set(order[:max(1, round(args.val_frac * len(rows)))])
            val_rows = [r for i, r in enumerate(rows) if i in held]
            rows = [r for i, r in enumerate(rows) if i not in held]
        self.examples, self.report = self._tokenize(rows, report)
        if not self.examples:
            raise TrainingError(f"--data {args.data}: no usable trace ({self.report})")
        if args.val_data or args.val_frac:
            self.val, val_text = self._tokenize(val_rows, val_report)
            if not self.val:  # asked for a validation loss: never silently without one
                flag = f"--val-data {args.val_data}" if args.val_data else f"--val-frac {args.val_frac}"
                raise TrainingError(f"{flag}: no usable held-out trace ({val_text})")
            self.report += f"; validation: {val_text}"

    def _read(self, source: str, flag: str):
        try:
            return openmementos.read_records(source, self.args.bad_records)
        except (FileNotFoundError, ValueError, ImportError, OSError) as e:
            raise TrainingError(f"{flag}: {e}") from None

    def _tokenize(self, rows, report) -> tuple[list[openmementos.Example], str]:
        """The examples of checked rows, and one line on what was kept, cut and skipped (a
        prompt that fills --max-seq-len is counted in `report` with its place)."""
        examples, stats = openmementos.tokenize([r.data for r in rows], self.tok, self.args.max_seq_len)
        for why, where in stats["reasons"].items():
            for i in where:
                report.count(rows[i].where, why)
        text = f"{len(examples)} examples, {stats['truncated']} cut at --max-seq-len"
        return examples, text + (f"; {report.summary()}" if report.n_skipped else "")

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(len(self.examples) * epochs / self.global_batch))

    def example(self, i: int) -> openmementos.Example:
        if self.examples is None:
            rec = toy_task.example(self.args.seed, i)
            return openmementos.tokenize([rec], self.tok, self.args.max_seq_len)[0][0]
        n = len(self.examples)
        return self.examples[openmementos.epoch_order(n, i // n, self.args.seed)[i % n]]

    def step(self, step: int):
        """(micro-batches of this rank as (ids, labels), labelled tokens in the global batch)."""
        base = step * self.global_batch
        everyone = [self.example(base + k) for k in range(self.global_batch)]
        n_labels = sum(sum(1 for l in e.labels[1:] if l != openmementos.IGNORE) for e in everyone)
        per_rank = self.args.batch_size * self.args.grad_accum
        mine = everyone[self.rank * per_rank:(self.rank + 1) * per_rank]
        pad = self.tok.token_id("<|endoftext|>")
        micro = [openmementos.collate(mine[i:i + self.args.batch_size], pad) for i in range(0, per_rank, self.args.batch_size)]
        # tokenize() keeps only examples with a labelled token, so n_labels >= 1; the max is a guard
        return micro, max(1, n_labels)


# ----------------------------------------------------------------------------- eval

@torch.no_grad()
def validation_loss(model, batches: Batches, fmt: MementoTokens, args, device, autocast, world: int) -> float:
    """Mean next-token loss per labelled token over the held-out examples, under the stage's
    mask (§4), each process taking every world-th example. Every process runs the same number
    of forwards (a sharded model gathers its weights in each one, with all processes taking
    part): a process short of examples repeats its first one and counts it with weight 0."""
    mine = batches.val[batches.rank::world]
    n_forwards = math.ceil(math.ceil(len(batches.val) / world) / args.batch_size)
    pad = batches.tok.token_id("<|endoftext|>")
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for i in range(n_forwards):
        chunk = mine[i * args.batch_size:(i + 1) * args.batch_size]
        weight = 1.0 if chunk else 0.0
        ids, labels = openmementos.collate(chunk or batches.val[:1], pad)
        ids, labels = ids.to(device), labels.to(device)
        with autocast:
            losses = model(ids, mask_from=stage_mask(ids, fmt, args.memento), labels=labels)
        total += weight * torch.stack([losses.sum().double(), (labels[:, 1:] != openmementos.IGNORE).sum().double()])
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------- training

def stage_mask(ids: torch.Tensor, fmt: MementoTokens, cfg: MementoConfig) -> torch.Tensor | None:
    """The attention mask of a stage for a batch [B, T]: None (plain causal) for stage 1
    (keep_last_n_blocks=-1), else mask_from [B, T] (§4; stage 2)."""
    return None if cfg.keep_last_n_blocks < 0 else build_mask_from(ids, fmt, cfg)


def train(args) -> dict:
    """Run one stage (paper §4, §A.2.1) with the arguments of parse_args; returns the final
    metrics (also written to the training state). Raises TrainingError (one line) for a run
    that cannot start or resume."""
    rank, world, device, run, resume_from = start_run(args)
    torch.manual_seed(args.seed)
    model, tok, generation = build_model(args, resume_from)
    model.to(device).train()
    model.gradient_checkpointing = args.gradient_checkpointing
    fmt = MementoTokens.from_tokenizer(tok)
    batches = Batches(args, tok, rank, world)
    total = args.max_steps or batches.steps_for(args.epochs)
    start, log, opt_state = 0, [], None
    if resume_from is not None:
        start, log, saved, opt_state = load_training_state(resume_from, model)
        check_resume_args(args, world, saved, RUN_DEFINING)
    evaluating = args.data == "toy" and args.eval_samples > 0
    # Under --fsdp the toy evaluation decodes through an unsharded copy (made before sharding,
    # refreshed from the shards at each evaluation), each process its share of the problems;
    # in the parameters' dtype, as one process decodes. Only for the toy task, whose models are tiny.
    generation_model = generation_copy(model, next(model.parameters()).dtype) if args.fsdp and evaluating else None
    try:
        wrapped = parallelize(model, world, device, args.fsdp, args.cpu_offload)
    except RuntimeError as e:
        raise TrainingError(str(e)) from None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    if opt_state is not None:
        load_optimizer_state(model, opt, opt_state)
    autocast = compute_autocast(device)
    if args.overwrite and rank == 0:  # every input checked: now the old run may go
        clear_run(run)
    metrics_out = metrics_file(run, start) if rank == 0 else None
    if rank == 0:
        print(f"stage {args.stage}: {sum(p.numel() for p in model.parameters()):,} parameters, {total} steps"
              f"{f' (resuming after step {start})' if start else ''}, global batch {batches.global_batch}, lr {args.lr}, "
              f"keep_last_n_blocks={args.keep_last_n_blocks}, data {args.data} ({batches.report}), device {device}, "
              f"{world} process(es){' sharded with FSDP2' if args.fsdp else ''}, run {run}", flush=True)
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0 or args.no_progress, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    saved_at = start
    with StopRequest() as stop:
        for step in bar:
            micro, n_labels = batches.step(step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, args.lr, args.warmup_frac)
            loss_sum = torch.zeros((), device=device)
            for j, (ids, labels) in enumerate(micro):
                ids, labels = ids.to(device), labels.to(device)
                mask_from = stage_mask(ids, fmt, args.memento)
                with grad_sync(wrapped, args.fsdp, world, last=j == len(micro) - 1), autocast:
                    # The loss inside the forward: chunked, so [T, vocab] logits never exist.
                    # Sum over tokens / labelled tokens of the GLOBAL batch: every process and
                    # micro-step weighs each token the same; DDP and FSDP average over processes, so * world
                    ce = wrapped(ids, mask_from=mask_from, labels=labels).sum()
                    (ce * world / n_labels).backward()
                loss_sum += ce.detach()
                seen += int((ids != tok.token_id("<|endoftext|>")).sum()) * world
            if world > 1:
                dist.all_reduce(loss_sum)
            grad_norm = total_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = loss_sum.item() / n_labels
            entry = {"step": step + 1, "loss": loss, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm,
                     "tokens_per_s": seen / (time.perf_counter() - t0)}
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{entry['tokens_per_s']:,.0f}")
            last = step + 1 == total
            if batches.val and ((args.val_every and (step + 1) % args.val_every == 0) or last):
                entry["val_loss"] = validation_loss(model, batches, fmt, args, device, autocast, world)
                if rank == 0:
                    tqdm.write(f"step {step + 1}: loss {loss:.4f}, validation loss {entry['val_loss']:.4f}")
            want_eval = (args.eval_every and (step + 1) % args.eval_every == 0) or last
            if evaluating and want_eval:  # every process decodes its share (a collective)
                ev = evaluate_toy(model, tok, args.eval_samples, args.seed, rank=rank, world=world,
                                  generation=generation_model)
                entry["eval_accuracy_compaction"] = ev["accuracy"]
                if rank == 0:
                    tqdm.write(f"step {step + 1}: loss {loss:.4f}, accuracy with compaction {ev['accuracy']:.3f} {ev['reasons']}")
            log.append(entry)
            if metrics_out:
                metrics_out.write(json.dumps(entry) + "\n")
            stopping, saved, ckpt = save_if_due(stop, step, total, args, model, opt, tok, log, generation, rank, world,
                                                device)
            if saved:
                saved_at = step + 1
            if stopping:
                bar.close()
                if rank == 0:
                    print(f"train_sft.py: stopped by {stop.name} after step {step + 1} of {total}; saved {ckpt}; "
                          "continue with the same command plus --resume", flush=True)
                break
    if metrics_out:
        metrics_out.close()
    param_bytes, state_bytes = local_bytes(model, opt)
    metrics = {"final_loss": log[-1]["loss"] if log else None, "steps": saved_at, "total_steps": total,
               "seconds": time.perf_counter() - t0, "log": log, "stopped": stop.name,
               "local_param_bytes": param_bytes, "local_optimizer_bytes": state_bytes}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"rank {rank}: holds {param_bytes:,} bytes of parameters and {state_bytes:,} bytes of optimizer state"
          f"{' (its shards)' if args.fsdp else ''}; peak RSS {peak_rss / 2**20:,.0f} MiB; "
          f"{metrics['seconds'] / max(1, saved_at - start):.3f} s per step", flush=True)
    if rank == 0 and stop.name is None:
        final = metrics["final_loss"]
        print(f"stage {args.stage} done in {metrics['seconds']:.0f} s; final loss "
              f"{'n/a' if final is None else f'{final:.4f}'}; wrote {run}", flush=True)
    if world > 1:
        dist.barrier()  # leave together: a gloo rank torn down while its peer still sends can abort
        dist.destroy_process_group()
    return metrics
