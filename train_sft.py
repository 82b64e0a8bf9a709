"""Two-stage SFT (paper §4, §A.2.1).

    python train_sft.py --stage 1      # full causal attention: learn the format
    python train_sft.py --stage 2      # memento attention, initialized from stage 1

With no other argument this trains a tiny Qwen3 from scratch with the byte-level tokenizer on
the embedded running-sum task (data/toy_task.py: "sum N blocks from S", N from 3 to 6, S from
0 to 9), on whatever device is present, and writes the runs out/stage1 and out/stage2. For a
real model:

    python train_sft.py --stage 1 --init-from Qwen/Qwen3-0.6B --data microsoft/OpenMementos --val-frac 0.01
    torchrun --nproc_per_node 8 train_sft.py --stage 2 ...          # DDP: every GPU holds everything
    torchrun --nproc_per_node 8 train_sft.py --stage 2 ... --fsdp   # FSDP2: weights, grads, AdamW sharded

One training loop for all three (sharding.py sets the processes up).

A run directory (--out) holds complete checkpoints step-NNNNNN/ (HF layout, tokenizer and
generation config included, plus the training state), a `latest` link to the newest, and
metrics.jsonl (one line per step). Anything that takes a checkpoint also takes the run
directory. Ctrl-C or SIGTERM finishes the current step, saves and exits 0; the same command
with --resume then continues exactly as if nothing had happened.

Stage 2 differs from stage 1 only in the attention mask (memento_attention.build_mask_from
with keep_last_n_blocks=0): same loss, same optimizer, same schedule.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from checkpoint import LATEST, publish, resolve_checkpoint, run_checkpoints, step_dir_name, write_json
from cli import ArgumentParser, check_device, fraction, nonnegative_int, positive_float, positive_int
from data import openmementos, toy_task
from memento_attention import MementoConfig, MementoTokens, build_mask_from
from model import Qwen3, Qwen3Config, add_memento_tokens
from sharding import full_state, grad_sync, load_optimizer_state, local_bytes, parallelize, setup_distributed, total_norm
from tokenizer import Tokenizer

STATE_JSON, STATE_TENSORS, METRICS = "training_state.json", "training_state.safetensors", "metrics.jsonl"
# Flags whose change would make a resumed run differ from an uninterrupted one.
RUN_DEFINING = ("stage", "data", "val_data", "val_frac", "init_from", "seed", "batch_size", "grad_accum", "world_size",
                "max_seq_len", "max_steps", "epochs", "lr", "warmup_frac", "grad_clip", "keep_last_n_blocks",
                "mask_delimiters", "keep_last_block_for_answer", "layers", "hidden", "heads", "kv_heads")


def parse_args(argv=None):
    """Parse and check every flag up front; a bad one exits with one line (cli.ArgumentParser)."""
    ap = ArgumentParser(prog="train_sft.py", description=__doc__)
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: full attention; 2: memento attention")
    ap.add_argument("--init-from", default=None,
                    help="checkpoint dir, training run or hub id; default: scratch (stage 1), out/stage1 (stage 2)")
    ap.add_argument("--data", default="toy", help="'toy' (the embedded task: 'sum N blocks from S', N 3-6, S 0-9), "
                                                  "a .jsonl/.parquet file or folder, or a hub dataset id")
    ap.add_argument("--val-data", default=None, help="held-out .jsonl/.parquet (or hub id) for the validation loss")
    ap.add_argument("--val-frac", type=fraction, default=0.0, help="hold out this fraction of --data instead")
    ap.add_argument("--val-every", type=nonnegative_int, default=100, help="steps between validation losses (0 = end only)")
    ap.add_argument("--out", default=None, help="run directory (default out/stage{N})")
    ap.add_argument("--overwrite", action="store_true", help="delete the checkpoints and metrics in --out and start over")
    ap.add_argument("--resume", nargs="?", const="required", choices=("required", "auto"), default=None,
                    help="continue the run in --out from its newest complete checkpoint ('auto': start fresh if none)")
    ap.add_argument("--resume-anyway", action="store_true",
                    help="resume even when flags that change the data stream or the model differ from the saved run")
    ap.add_argument("--max-steps", type=positive_int, default=None,
                    help="optimizer steps; default 400 (stage 1) / 150 (stage 2) on the toy task, else from --epochs")
    ap.add_argument("--epochs", type=positive_float, default=5.0, help="passes over a dataset (not used on the toy task)")
    ap.add_argument("--batch-size", type=positive_int, default=None, help="examples per process per micro-step (toy 32, else 1)")
    ap.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    ap.add_argument("--lr", type=positive_float, default=None,
                    help="peak learning rate, the same for both stages (toy task 2e-3; else the paper's 8e-5)")
    ap.add_argument("--warmup-frac", type=fraction, default=0.05, help="linear warmup share of the steps, then cosine")
    ap.add_argument("--grad-clip", type=positive_float, default=1.0, help="max global gradient norm")
    ap.add_argument("--max-seq-len", type=positive_int, default=32768,
                    help="tokens per example: longer ones are cut at the end; one whose prompt leaves no room is skipped")
    ap.add_argument("--seed", type=int, default=42, help="data order, initialization and evaluation prompts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    ap.add_argument("--fsdp", action="store_true",
                    help="under torchrun: shard weights, gradients and AdamW states with FSDP2 (default: DDP)")
    ap.add_argument("--cpu-offload", action="store_true", help="with --fsdp: keep the shards in host memory")
    ap.add_argument("--keep-last-n-blocks", type=int, default=None, help="stage 2 default 0; stage 1 is always -1")
    ap.add_argument("--mask-delimiters", action="store_true", help="also hide a masked block's delimiters")
    ap.add_argument("--keep-last-block-for-answer", action="store_true", help="the last block stays visible to the answer")
    ap.add_argument("--eval-every", type=nonnegative_int, default=200, help="steps between toy evals (0 = only at the end)")
    ap.add_argument("--eval-samples", type=nonnegative_int, default=200, help="toy problems per eval (0 = no eval)")
    ap.add_argument("--save-every", type=nonnegative_int, default=100,
                    help="steps between checkpoints (0 = only at the end and on Ctrl-C / SIGTERM)")
    ap.add_argument("--keep-checkpoints", type=positive_int, default=2, help="newest step checkpoints kept in --out")
    ap.add_argument("--save-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="dtype of saved weights; auto = the dtype they came in (float32 from scratch); "
                         "fp32 master weights go into the training state either way")
    # size of a model trained from scratch (the embedded default)
    ap.add_argument("--layers", type=positive_int, default=3, help="from scratch: decoder layers")
    ap.add_argument("--hidden", type=positive_int, default=128, help="from scratch: hidden size")
    ap.add_argument("--heads", type=positive_int, default=4, help="from scratch: query heads")
    ap.add_argument("--kv-heads", type=positive_int, default=2, help="from scratch: key/value heads (GQA)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        ap.error("--fsdp shards over processes: launch with torchrun, e.g. "
                 "`torchrun --nproc_per_node 8 train_sft.py ... --fsdp`")
    if args.cpu_offload and not args.fsdp:
        ap.error("--cpu-offload offloads FSDP shards: add --fsdp")
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
    if args.resume and args.overwrite:
        ap.error("--resume and --overwrite: choose one")
    args.device = check_device(ap, args.device)
    return args


# ----------------------------------------------------------------------------- setup

PROG = "train_sft.py"  # train_rl.py, which reuses the run handling below, names itself here


def _fail(msg: str):
    sys.exit(f"{PROG}: {msg}")


def build_model(args, resume_from: Path | None):
    """(model, tokenizer, generation config dict) to train: from scratch (tiny, byte-level), a
    checkpoint, or the run's checkpoint being resumed. Exits with one line if it cannot load."""
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
        _fail("--stage 2 starts from out/stage1, which does not exist: run `python train_sft.py --stage 1` first, "
              "or pass --init-from")
    try:
        path = resolve_checkpoint(source)
        model = Qwen3.from_pretrained(path)
        tok = Tokenizer.from_dir(path)
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
        _fail(f"cannot load --init-from: {str(e).strip(chr(34))}")
    if resume_from is None:
        add_memento_tokens(model, tok, seed=args.seed)  # no-op for tokens already present
    return model, tok, gen


class Batches:
    """The global batch of every step, fixed by (seed, step): `--resume` and every process of a
    distributed run see the same data in the same order. Rank r trains on its contiguous slice.
    Also the held-out examples for the validation loss (`val`)."""

    def __init__(self, args, tok, rank: int, world: int):
        self.args, self.tok, self.rank, self.world = args, tok, rank, world
        self.global_batch = args.batch_size * args.grad_accum * world
        self.val: list[openmementos.Example] = []
        if args.data == "toy":
            self.examples, self.report = None, {"kept": "generated", "skipped": 0}
            return
        records = self._read(args.data, "--data")
        val_records = self._read(args.val_data, "--val-data") if args.val_data else []
        if args.val_frac:
            order = list(range(len(records)))
            random.Random(f"val:{args.seed}").shuffle(order)
            held = set(order[:max(1, round(args.val_frac * len(records)))])
            val_records = [r for i, r in enumerate(records) if i in held]
            records = [r for i, r in enumerate(records) if i not in held]
        self.examples, self.report = openmementos.tokenize(records, tok, args.max_seq_len)
        if not self.examples:
            _fail(f"no usable trace in {args.data} ({self.report})")
        if val_records:
            self.val, self.val_report = openmementos.tokenize(val_records, tok, args.max_seq_len)
            self.report["validation"] = len(self.val)

    @staticmethod
    def _read(source: str, flag: str):
        try:
            return openmementos.read_records(source)
        except (FileNotFoundError, ValueError, ImportError, OSError) as e:
            _fail(f"{flag}: {e}")

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


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine decay to 0 (§A.2.1)."""
    warm = max(1, round(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# ----------------------------------------------------------------------------- checkpoints

def prepare_run(args, run: Path) -> Path | None:
    """Decide where training starts: the checkpoint to resume from, or None for a fresh run.

    A fresh run refuses a --out that already holds checkpoints (unless --overwrite, which
    deletes them and the metrics). --resume takes the newest complete checkpoint; a missing
    one is an error, or a fresh start with --resume auto. Exits with one line on a conflict."""
    if (run / "config.json").exists():
        _fail(f"--out {run} is a checkpoint directory, not a training run; pass another --out (or remove it)")
    existing = run_checkpoints(run)
    if args.overwrite:
        for d in existing:
            shutil.rmtree(d)
        for f in (run / LATEST, run / METRICS):
            f.unlink(missing_ok=True)
        return None
    if args.resume is None:
        if existing:
            _fail(f"--out {run} already holds a run (newest checkpoint {existing[-1].name}): add --resume to continue "
                  "it, --overwrite to start over, or pass another --out")
        return None
    if not existing:
        if args.resume == "auto":
            return None
        _fail(f"--resume: no complete checkpoint in {run} to resume from (start without --resume, or --resume auto)")
    return existing[-1]


def check_resume_args(args, world: int, saved: dict, run_defining: tuple = RUN_DEFINING) -> None:
    """Refuse (one line) to resume with flags that change the data stream or the model, naming
    each one with its saved and current value; --resume-anyway goes on regardless."""
    now = {**{k: v for k, v in vars(args).items() if k != "memento"}, "world_size": world}
    diff = [f"--{k.replace('_', '-')} (saved {saved.get(k)!r}, now {now.get(k)!r})"
            for k in run_defining if saved.get(k) != now.get(k)]
    if diff and not args.resume_anyway:
        _fail(f"--resume: this run was started with other settings: {', '.join(diff)}; rerun with the saved values, "
              "or add --resume-anyway")


def save_checkpoint(out: str, model: Qwen3, tok: Tokenizer, weights: dict, opt_state: dict, step: int, args, log: list,
                    generation: dict | None = None, world: int = 1) -> Path:
    """Publish checkpoint step-NNNNNN in run directory `out` (checkpoint.publish: atomic, the
    newest --keep-checkpoints kept): weights in --save-dtype, config.json, tokenizer.json and
    tokenizer_config.json (eos as config.json says), generation_config.json with the paper's
    sampling defaults, and the training state (optimizer, step, log, arguments, and fp32
    master weights when the saved weights are not fp32). `weights` and `opt_state` are the
    full (unsharded) state dicts of sharding.full_state, keyed by parameter name; `model`
    gives the config. Returns the checkpoint path."""
    from generate import generation_config

    state = opt_state
    tensors, scalars = {}, {}
    for name, st in state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{name}.{k}"] = v
    save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    meta = {"step": step, "param_groups": state["param_groups"], "scalars": scalars, "log": log,
            "args": {**{k: v for k, v in vars(args).items() if k != "memento"}, "world_size": world}}
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    eos_name = tok.id_to_special.get(eos, "<|im_end|>") if eos is not None else "<|im_end|>"

    def write(tmp: Path):
        model.write_files(tmp, dtype=save_dtype, state=weights)
        stored = getattr(torch, model.config.torch_dtype)
        for name, p in weights.items():
            if p.dtype != stored:  # the saved weights are rounded: keep the exact ones for --resume
                tensors[f"master.{name}"] = p.detach().contiguous().cpu()
        tok.save(tmp, eos_token=eos_name)
        write_json(tmp / "generation_config.json", generation_config(tok, model.config, generation or {}))
        save_file(tensors, tmp / STATE_TENSORS)
        write_json(tmp / STATE_JSON, meta)

    return publish(Path(out), step_dir_name(step), write, keep=args.keep_checkpoints)


def load_training_state(ckpt: Path, model: Qwen3) -> tuple[int, list, dict, dict]:
    """Restore the fp32 master weights of a checkpoint into the (unsharded) model and read its
    optimizer state; returns (next step, log, saved arguments, full optimizer state keyed by
    parameter name, for sharding.load_optimizer_state). Safetensors + JSON only."""
    meta = json.loads((ckpt / STATE_JSON).read_text())
    tensors = load_file(ckpt / STATE_TENSORS)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in [k for k in tensors if k.startswith("master.")]:
            params[key.removeprefix("master.")].copy_(tensors.pop(key))
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        name, k = key.rsplit(".", 1)
        if name not in params:
            _fail(f"--resume: {ckpt} holds optimizer state for {name!r}, not a parameter of this model "
                  "(a checkpoint written before sharding support keys it by index); start a new run from it "
                  "with --init-from instead")
        state.setdefault(name, {})[k] = v
    return meta["step"], meta["log"], meta.get("args", {}), {"state": state, "param_groups": meta["param_groups"]}


class StopRequest:
    """Ctrl-C / SIGTERM between steps: the loop finishes its step, saves and exits 0. A second
    signal acts at once (the handlers are restored after the first)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.name = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        for s, h in self.previous.items():
            signal.signal(s, h)

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        return False

    def requested(self, world: int, device) -> bool:
        """True when any process got a signal (all processes agree, so they stop together)."""
        flag = self.name is not None
        if world > 1:
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


# ----------------------------------------------------------------------------- eval

@torch.no_grad()
def evaluate_toy(model: Qwen3, tok: Tokenizer, n: int, seed: int) -> dict:
    """Accuracy of sampled traces on n toy problems with compaction on (keep_last_n_blocks 0),
    checked by data/toy_task.check_trace: eval.py's code (eval.run, `--data toy --n-samples 1
    --modes memento`), all problems in one batch, each response capped at the longest trace
    the task can have. Returns {"accuracy", "n", "reasons": {first word of the reason: count}}."""
    from engine import EngineConfig
    from eval import run, toy_max_new_tokens, toy_problems

    was_training = model.training
    model.eval()
    # a pool for all n traces at their longest: no preemption, and no probe of the device's
    # memory in the middle of training
    room = EngineConfig(kv_cache_tokens=n * (toy_max_new_tokens(tok) + 64))
    recs = run(model, tok, toy_problems(n, seed), ["memento"], 1, seed=seed, config=room)
    model.train(was_training)
    reasons = Counter("ok" if r["correct"] else r["reason"].split(":")[0].split(" ")[0] for r in recs)
    return {"accuracy": sum(r["correct"] for r in recs) / n, "n": n, "reasons": dict(reasons)}


@torch.no_grad()
def validation_loss(model, batches: Batches, tokens: MementoTokens, args, device, autocast, world: int) -> float:
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
            losses = model(ids, mask_from=stage_mask(ids, tokens, args.memento), labels=labels)
        total += weight * torch.stack([losses.sum().double(), (labels[:, 1:] != openmementos.IGNORE).sum().double()])
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------- training

def stage_mask(ids: torch.Tensor, tokens: MementoTokens, cfg: MementoConfig) -> torch.Tensor | None:
    """The attention mask of a stage for a batch [B, T]: None (plain causal) for stage 1
    (keep_last_n_blocks=-1), else mask_from [B, T] (§4; stage 2)."""
    return None if cfg.keep_last_n_blocks < 0 else build_mask_from(ids, tokens, cfg)


def _metrics_file(run: Path, start: int):
    """metrics.jsonl of the run, keeping only the lines of steps already checkpointed."""
    f = run / METRICS
    kept = []
    if start and f.exists():
        kept = [l for l in f.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= start]
    run.mkdir(parents=True, exist_ok=True)
    f.write_text("".join(l + "\n" for l in kept))
    return open(f, "a", buffering=1)


def train(args) -> dict:
    """Run one stage; returns the final metrics (also written to the training state)."""
    rank, world, device = setup_distributed(args.device)
    run = Path(args.out)
    resume_from = prepare_run(args, run) if rank == 0 else None
    if world > 1:  # every process resumes from the checkpoint rank 0 chose
        box = [str(resume_from) if resume_from else None]
        dist.broadcast_object_list(box)
        resume_from = Path(box[0]) if box[0] else None
    torch.manual_seed(args.seed)
    model, tok, generation = build_model(args, resume_from)
    model.to(device).train()
    model.gradient_checkpointing = args.gradient_checkpointing
    tokens = MementoTokens.from_tokenizer(tok)
    batches = Batches(args, tok, rank, world)
    total = args.max_steps or batches.steps_for(args.epochs)
    start, log, opt_state = 0, [], None
    if resume_from is not None:
        start, log, saved, opt_state = load_training_state(resume_from, model)
        check_resume_args(args, world, saved)
    try:
        wrapped = parallelize(model, world, device, args.fsdp, args.cpu_offload)
    except RuntimeError as e:
        _fail(str(e))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    if opt_state is not None:
        load_optimizer_state(model, opt, opt_state)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    metrics_out = _metrics_file(run, start) if rank == 0 else None
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
                mask_from = stage_mask(ids, tokens, args.memento)
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
                entry["val_loss"] = validation_loss(model, batches, tokens, args, device, autocast, world)
                if rank == 0:
                    tqdm.write(f"step {step + 1}: loss {loss:.4f}, validation loss {entry['val_loss']:.4f}")
            want_eval = (args.eval_every and (step + 1) % args.eval_every == 0) or last
            # a sharded model generates only with every process taking part
            if (rank == 0 or args.fsdp) and args.data == "toy" and args.eval_samples > 0 and want_eval:
                ev = evaluate_toy(model, tok, args.eval_samples, args.seed)
                if rank == 0:
                    entry["eval_accuracy_compaction"] = ev["accuracy"]
                    tqdm.write(f"step {step + 1}: loss {loss:.4f}, accuracy with compaction {ev['accuracy']:.3f} {ev['reasons']}")
            log.append(entry)
            if metrics_out:
                metrics_out.write(json.dumps(entry) + "\n")
            stopping = stop.requested(world, device)
            if last or stopping or (args.save_every and (step + 1) % args.save_every == 0):
                weights, opt_state = full_state(model, opt)  # a collective under FSDP
                if rank == 0:
                    ckpt = save_checkpoint(args.out, model, tok, weights, opt_state, step + 1, args, log, generation, world)
                saved_at = step + 1
                if world > 1:
                    dist.barrier()
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
        dist.destroy_process_group()
    return metrics


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
