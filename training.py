"""What every training script shares (paper §A.2.1): run directories, checkpoints and exact
resume, signals, the learning-rate schedule, metrics, the distributed start, and their flags.

A run directory (--out) holds complete checkpoints step-NNNNNN/ (HF layout, tokenizer and
generation config included, plus the training state: optimizer, step, log, arguments, and
fp32 master weights when the saved weights are not fp32), a `latest` link to the newest, and
metrics.jsonl (one line per step). Ctrl-C or SIGTERM finishes the current step, saves and
exits 0; the same command with --resume then continues exactly as if nothing had happened.
train_sft.py (sft.py) and train_rl.py are built from these pieces; a problem a user can fix
raises TrainingError with one line, which the scripts print as `prog: message`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from checkpoint import LATEST, publish, run_checkpoints, step_dir_name, write_json, write_model
from cli import ArgumentParser, check_device, fraction, nonnegative_int, positive_float, positive_int
from engine import EngineConfig
from evaluation import run as evaluate, toy_max_new_tokens, toy_problems
from model import Qwen3
from sampling import generation_config
from sharding import full_state, refresh_generation_copy, setup_distributed, share
from tokenizer import Tokenizer

STATE_JSON, STATE_TENSORS, METRICS = "training_state.json", "training_state.safetensors", "metrics.jsonl"


class TrainingError(Exception):
    """A problem the user can fix (a run directory in the way, a checkpoint that cannot be
    resumed, data with nothing usable): one line, printed by the script without a traceback."""


# ----------------------------------------------------------------------------- flags


def add_run_args(ap: ArgumentParser, *, out: str | None, save_every: int) -> None:
    """The flags of a training run every script has: --out, --overwrite, --resume,
    --resume-anyway, --save-every, --keep-checkpoints, --save-dtype, --device, --fsdp,
    --cpu-offload, --no-progress. Check them with `check_run_args`."""
    ap.add_argument("--out", default=out, help="run directory")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over in --out: its checkpoints and metrics are deleted once the new run's inputs are checked")
    ap.add_argument("--resume", nargs="?", const="required", choices=("required", "auto"), default=None,
                    help="continue the run in --out from its newest complete checkpoint ('auto': start fresh if none)")
    ap.add_argument("--resume-anyway", action="store_true",
                    help="resume even when flags that change the data stream or the model differ from the saved run")
    ap.add_argument("--save-every", type=nonnegative_int, default=save_every,
                    help="steps between checkpoints (0 = only at the end and on Ctrl-C / SIGTERM)")
    ap.add_argument("--keep-checkpoints", type=positive_int, default=2, help="newest step checkpoints kept in --out")
    ap.add_argument("--save-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="dtype of saved weights; auto = the dtype they came in (float32 from scratch); "
                         "fp32 master weights go into the training state either way")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--fsdp", action="store_true",
                    help="under torchrun: shard weights, gradients and AdamW states with FSDP2 (default: DDP)")
    ap.add_argument("--cpu-offload", action="store_true", help="with --fsdp: keep the shards in host memory")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_optimizer_args(ap: ArgumentParser, *, lr: float | None, lr_help: str) -> None:
    """AdamW's schedule flags (§A.2.1: cosine with warmup, gradient clipping at 1.0): --lr,
    --warmup-frac, --grad-clip."""
    ap.add_argument("--lr", type=positive_float, default=lr, help=lr_help)
    ap.add_argument("--warmup-frac", type=fraction, default=0.05, help="linear warmup share of the steps, then cosine")
    ap.add_argument("--grad-clip", type=positive_float, default=1.0, help="max global gradient norm")


def check_run_args(ap: ArgumentParser, args) -> None:
    """ap.error (one line, exit 2) for contradicting run flags; checks --device."""
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        ap.error(f"--fsdp shards over processes: launch with torchrun, e.g. "
                 f"`torchrun --nproc_per_node 8 {ap.prog} ... --fsdp`")
    if args.cpu_offload and not args.fsdp:
        ap.error("--cpu-offload offloads FSDP shards: add --fsdp")
    if args.resume and args.overwrite:
        ap.error("--resume and --overwrite: choose one")
    args.device = check_device(ap, args.device)


# ----------------------------------------------------------------------------- schedule


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine decay to 0 (§A.2.1)."""
    warm = max(1, round(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def compute_autocast(device: torch.device):
    """The mixed precision of training (§A.2.1): bf16 autocast over fp32 master weights on CUDA
    (a fresh context manager each call); on the CPU none (fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# ----------------------------------------------------------------------------- runs and checkpoints


def start_run(args) -> tuple[int, int, torch.device, Path, Path | None]:
    """Set the processes up (sharding.setup_distributed) and decide, on rank 0, where the run
    starts (prepare_run); every process gets rank 0's answer. Returns (rank, world size,
    device, run directory, checkpoint to resume from or None). Raises TrainingError."""
    rank, world, device = setup_distributed(args.device)
    run = Path(args.out)
    resume_from = prepare_run(args, run) if rank == 0 else None
    if world > 1:  # every process resumes from the checkpoint rank 0 chose
        box = [str(resume_from) if resume_from else None]
        dist.broadcast_object_list(box)
        resume_from = Path(box[0]) if box[0] else None
    return rank, world, device, run, resume_from


def prepare_run(args, run: Path) -> Path | None:
    """Decide where training starts: the checkpoint to resume from, or None for a fresh run.

    A fresh run refuses a --out that already holds checkpoints unless --overwrite; nothing is
    deleted here: the old run stays until every input of the new one was read and checked
    (clear_run, called by the script just before its first step). --resume takes the newest
    complete checkpoint; a missing one is an error, or a fresh start with --resume auto.
    Raises TrainingError on a conflict."""
    if (run / "config.json").exists():
        raise TrainingError(f"--out {run} is a checkpoint directory, not a training run; pass another --out "
                            "(or remove it)")
    existing = run_checkpoints(run)
    if args.overwrite:
        return None
    if args.resume is None:
        if existing:
            raise TrainingError(f"--out {run} already holds a run (newest checkpoint {existing[-1].name}): add "
                                "--resume to continue it, --overwrite to start over, or pass another --out")
        return None
    if not existing:
        if args.resume == "auto":
            return None
        raise TrainingError(f"--resume: no complete checkpoint in {run} to resume from (start without --resume, "
                            "or --resume auto)")
    return existing[-1]


def clear_run(run: Path) -> None:
    """--overwrite, once the new run is known to start (its data, model and flags all read and
    checked): delete the old run's checkpoints, `latest` and metrics. Only the files a run
    writes are touched. Raises nothing for a run directory that does not exist."""
    for d in run_checkpoints(run):
        shutil.rmtree(d)
    for f in (run / LATEST, run / METRICS):
        f.unlink(missing_ok=True)


def check_resume_args(args, world: int, saved: dict, run_defining: tuple[str, ...]) -> None:
    """Refuse (TrainingError, one line) to resume with flags that change the data stream or the
    model, naming each one with its saved and current value, and with data whose content
    changed (a `*_sha256` key: the saved and the current hash; data/records.py); --resume-anyway
    goes on regardless. A hash missing from a run saved before hashes were kept is not compared."""
    now = {**{k: v for k, v in vars(args).items() if k != "memento"}, "world_size": world}
    diff = []
    for k in run_defining:
        if k.endswith("_sha256") and k not in saved:
            continue
        if saved.get(k) == now.get(k):
            continue
        if k.endswith("_sha256"):
            flag = k.removesuffix("_sha256")
            diff.append(f"--{flag.replace('_', '-')} {now.get(flag)} holds other data (saved {saved.get(k)}, now {now.get(k)})")
        else:
            diff.append(f"--{k.replace('_', '-')} (saved {saved.get(k)!r}, now {now.get(k)!r})")
    if diff and not args.resume_anyway:
        raise TrainingError(f"--resume: this run was started with other settings: {', '.join(diff)}; rerun with the "
                            "saved values, or add --resume-anyway")


def save_checkpoint(out: str, model: Qwen3, tok: Tokenizer, weights: dict, opt_state: dict, step: int, args, log: list,
                    generation: dict | None = None, world: int = 1) -> Path:
    """Publish checkpoint step-NNNNNN in run directory `out` (checkpoint.publish: atomic, the
    newest --keep-checkpoints kept): weights in --save-dtype, config.json, tokenizer.json and
    tokenizer_config.json (eos as config.json says), generation_config.json with the paper's
    sampling defaults, and the training state (optimizer, step, log, arguments, and fp32
    master weights when the saved weights are not fp32). `weights` and `opt_state` are the
    full (unsharded) state dicts of sharding.full_state, keyed by parameter name; `model`
    gives the config. Returns the checkpoint path."""
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
        write_model(model, tmp, dtype=save_dtype, state=weights)
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
            raise TrainingError(f"--resume: {ckpt} holds optimizer state for {name!r}, not a parameter of this model "
                                "(a checkpoint written before sharding support keys it by index); start a new run "
                                "from it with --init-from instead")
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


def save_if_due(stop: StopRequest, step: int, total: int, args, model, opt, tok, log: list, generation: dict | None,
                rank: int, world: int, device) -> tuple[bool, bool, Path | None]:
    """The end of every training step: checkpoint when it is the last step, a stop was
    requested on any process, or --save-every says so (full state gathered on all processes,
    written by rank 0). Returns (stop requested, saved, the checkpoint rank 0 wrote or None)."""
    stopping = stop.requested(world, device)
    due = step + 1 == total or stopping or bool(args.save_every and (step + 1) % args.save_every == 0)
    ckpt = None
    if due:
        weights, opt_state = full_state(model, opt)  # a collective under FSDP
        if rank == 0:
            ckpt = save_checkpoint(args.out, model, tok, weights, opt_state, step + 1, args, log, generation, world)
        if world > 1:
            dist.barrier()
    return stopping, due, ckpt


def metrics_file(run: Path, start: int):
    """metrics.jsonl of the run opened for appending, keeping only the lines of steps already
    checkpointed (a resumed run rewrites what came after its checkpoint)."""
    f = run / METRICS
    kept = []
    if start and f.exists():
        kept = [l for l in f.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= start]
    run.mkdir(parents=True, exist_ok=True)
    f.write_text("".join(l + "\n" for l in kept))
    return open(f, "a", buffering=1)


# ----------------------------------------------------------------------------- the embedded task


@torch.no_grad()
def evaluate_toy(model, tok, n: int, seed: int, max_num_seqs: int = 256, *, rank: int = 0, world: int = 1,
                 generation=None) -> dict:
    """Accuracy of sampled traces on n toy problems with compaction on (keep_last_n_blocks 0),
    checked by data/toy_task.check_trace: evaluation.run (as `eval.py --data toy --n-samples 1
    --modes memento`), up to max_num_seqs problems at once, each response capped at the
    longest trace the task can have (paper §6.2, Table 1 at toy scale).

    model: a model.Qwen3 (in training mode or not; restored), replicated or FSDP-sharded;
    tok: its tokenizer.Tokenizer. rank, world: with world > 1 (torch.distributed
    initialized; every process calls this, a collective) each process decodes its share of
    the problems (sharding.share: rank, rank + world, ...) and the verdicts are exchanged,
    so every process returns the accuracy of all n, equal to one process's (a problem's
    sample has its own seed, request_seed(seed, problem, 0)). generation: for a sharded
    model, its unsharded copy (sharding.generation_copy), refreshed from the shards here (a
    collective) and decoded through, so that the processes decode independently instead of
    gathering every layer in lockstep. Returns {"accuracy", "n", "reasons": {first word of
    the reason: count}, "per_problem": [{"problem", "correct", "tokens"}] by problem}.
    Raises ValueError from refresh_generation_copy for a copy of another model."""
    if generation is not None:
        refresh_generation_copy(generation, model)
    decoder = generation if generation is not None else model
    was_training = decoder.training
    decoder.eval()
    mine = share(toy_problems(n, seed), rank, world)
    # a pool for all of this process's traces at their longest: no preemption, and no probe of
    # the device's memory in the middle of training
    room = EngineConfig(kv_cache_tokens=max(1, len(mine)) * (toy_max_new_tokens(tok) + 64), max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max(2048, max_num_seqs))
    recs = evaluate(decoder, tok, mine, ["memento"], 1, seed=seed, config=room) if mine else []
    decoder.train(was_training)
    rows = [(r["problem"], r["correct"], "ok" if r["correct"] else r["reason"].split(":")[0].split(" ")[0], r["tokens"])
            for r in recs]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, rows)
        rows = [row for part in everyone for row in part]
    rows.sort()
    return {"accuracy": sum(c for _, c, _, _ in rows) / n, "n": n, "reasons": dict(Counter(why for _, _, why, _ in rows)),
            "per_problem": [{"problem": p, "correct": c, "tokens": t} for p, c, _, t in rows]}
