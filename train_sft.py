"""Two-stage SFT (paper §4, §A.2.1).

    python train_sft.py --stage 1      # full causal attention: learn the format
    python train_sft.py --stage 2      # memento attention, initialized from stage 1

With no other argument this trains a tiny Qwen3 from scratch with the byte-level tokenizer on
the embedded running-sum task (data/toy_task.py), on whatever device is present, and writes
out/stage1 and out/stage2. For a real model:

    python train_sft.py --stage 1 --init-from Qwen/Qwen3-0.6B --data microsoft/OpenMementos
    torchrun --nproc_per_node 8 train_sft.py --stage 2 ...     # DDP, one code path

Stage 2 differs from stage 1 only in the attention mask (memento_attention.build_mask_from
with keep_last_n_blocks=0): same loss, same optimizer, same schedule.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import openmementos, toy_task
from memento_attention import MementoConfig, MementoTokens, build_mask_from
from model import Qwen3, Qwen3Config, add_memento_tokens, resolve_checkpoint
from tokenizer import Tokenizer

STATE_JSON, STATE_TENSORS = "training_state.json", "training_state.safetensors"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True)
    ap.add_argument("--init-from", default=None, help="checkpoint dir or hub id; default: scratch (stage 1), --out of stage 1 (stage 2)")
    ap.add_argument("--data", default="toy", help="'toy' (embedded task), a .jsonl/.parquet file, or a hub dataset id")
    ap.add_argument("--out", default=None, help="default out/stage{N}")
    ap.add_argument("--max-steps", type=int, default=None, help="default: 400 (stage 1) / 150 (stage 2) on the toy task, else from --epochs")
    ap.add_argument("--epochs", type=float, default=5.0, help="passes over a dataset (ignored on the toy task)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per process per micro-step (toy 32, else 1)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=None, help="peak lr, the same for both stages (toy task 2e-3; else the paper's 8e-5)")
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--max-seq-len", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--keep-last-n-blocks", type=int, default=None, help="stage 2 default 0; stage 1 is always -1")
    ap.add_argument("--mask-delimiters", action="store_true")
    ap.add_argument("--keep-last-block-for-answer", action="store_true")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between evals (toy task; 0 = only at the end)")
    ap.add_argument("--eval-samples", type=int, default=200, help="toy problems per eval (0 = no eval)")
    ap.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0 = only at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    # size of a model trained from scratch (the embedded default)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
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
            ap.error("--stage 1 trains with full attention; --keep-last-n-blocks applies to --stage 2")
        args.keep_last_n_blocks = -1
    elif args.keep_last_n_blocks is None:
        args.keep_last_n_blocks = 0
    try:
        args.memento = MementoConfig(args.keep_last_n_blocks, args.mask_delimiters, args.keep_last_block_for_answer)
    except ValueError as e:
        ap.error(str(e))
    return args


# ----------------------------------------------------------------------------- setup

def setup_distributed(device: str):
    """(rank, world, device). Under torchrun: gloo on CPU, nccl on CUDA (DDP, §A.2.1 scale-out)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device)


def build_model(args):
    """The model and tokenizer to train: from scratch (tiny, byte-level) or a checkpoint."""
    if args.init_from is None:
        tok = Tokenizer.byte_level()
        vocab = (tok.n_vocab + 15) // 16 * 16
        cfg = Qwen3Config(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                          max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=10000.0,
                          eos_token_id=tok.token_id("<|im_end|>"))
        torch.manual_seed(args.seed)
        return Qwen3(cfg).init_weights(seed=args.seed), tok
    if args.init_from == "out/stage1" and not Path(args.init_from).is_dir():
        sys.exit("train_sft.py: --stage 2 starts from out/stage1, which does not exist: "
                 "run `python train_sft.py --stage 1` first, or pass --init-from")
    try:
        path = resolve_checkpoint(args.init_from)
    except FileNotFoundError as e:
        sys.exit(f"train_sft.py: --init-from: {e}")
    model = Qwen3.from_pretrained(path)
    tok = Tokenizer.from_dir(path)
    add_memento_tokens(model, tok, seed=args.seed)  # no-op for tokens already present
    return model, tok


class Batches:
    """The global batch of every step, fixed by (seed, step): `--resume` and every process of a
    distributed run see the same data in the same order. Rank r trains on its contiguous slice."""

    def __init__(self, args, tok, rank: int, world: int):
        self.args, self.tok, self.rank, self.world = args, tok, rank, world
        self.global_batch = args.batch_size * args.grad_accum * world
        if args.data == "toy":
            self.examples, self.report = None, {"kept": "generated", "skipped": 0}
        else:
            try:
                records = openmementos.read_records(args.data)
            except (FileNotFoundError, ValueError, ImportError) as e:
                sys.exit(f"train_sft.py: {e}")
            self.examples, self.report = openmementos.tokenize(records, tok, args.max_seq_len)
            if not self.examples:
                sys.exit(f"train_sft.py: no usable trace in {args.data} ({self.report})")

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
        return micro, n_labels


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine decay to 0 (§A.2.1)."""
    warm = max(1, round(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(out: str, model: Qwen3, tok: Tokenizer, opt: torch.optim.Optimizer, step: int, args, log: list):
    """Model (HF layout), tokenizer and training state, swapped in atomically."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for i, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{i}.{k}"] = v
    meta = {"step": step, "param_groups": state["param_groups"], "scalars": scalars, "log": log,
            "args": {k: v for k, v in vars(args).items() if k != "memento"}}

    def extra(tmp: Path):
        tok.save(tmp)
        save_file(tensors, tmp / STATE_TENSORS)
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))

    model.save_pretrained(out, extra_files=extra)


def load_training_state(out: str, opt: torch.optim.Optimizer) -> tuple[int, list]:
    """Restore the optimizer from --out; returns (next step, log). Safetensors + JSON only."""
    meta = json.loads((Path(out) / STATE_JSON).read_text())
    tensors = load_file(Path(out) / STATE_TENSORS)
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["log"]


# ----------------------------------------------------------------------------- eval

@torch.no_grad()
def evaluate_toy(model: Qwen3, tok: Tokenizer, n: int, seed: int, cfg: MementoConfig, restart: bool = False,
                 compaction: bool = True, batch: int = 256) -> dict:
    """Exact-match accuracy of generated traces on n held-out toy problems (checker of
    data/toy_task.py), generated with the paper's sampling and a compacting cache."""
    from generate import generate

    rng = random.Random(f"eval:{seed}")
    problems = [toy_task.sample_problem(rng) for _ in range(n)]
    was_training = model.training
    model.eval()
    correct, reasons = 0, {}
    for i in range(0, n, batch):
        chunk = problems[i:i + batch]
        prompts = [tok.encode(tok.chat_prompt(p.prompt)) for p in chunk]
        seqs, _ = generate(model, tok, prompts, cfg, compaction=compaction, restart=restart, max_new_tokens=320, seed=seed + i)
        for p, s in zip(chunk, seqs):
            v = toy_task.check_trace(p, tok.decode(s.tokens))
            correct += v["correct"]
            key = v["reason"].split(":")[0].split(" ")[0] if not v["correct"] else "ok"
            reasons[key] = reasons.get(key, 0) + 1
    model.train(was_training)
    return {"accuracy": correct / n, "n": n, "reasons": reasons}


# ----------------------------------------------------------------------------- training

def stage_mask(ids: torch.Tensor, tokens: MementoTokens, cfg: MementoConfig) -> torch.Tensor | None:
    """The attention mask of a stage for a batch [B, T]: None (plain causal) for stage 1
    (keep_last_n_blocks=-1), else mask_from [B, T] (§4; stage 2)."""
    return None if cfg.keep_last_n_blocks < 0 else build_mask_from(ids, tokens, cfg)


def train(args) -> dict:
    """Run one stage; returns the final metrics (also written to the training state)."""
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    model, tok = build_model(args)
    model.to(device).train()
    model.gradient_checkpointing = args.gradient_checkpointing
    tokens = MementoTokens.from_tokenizer(tok)
    batches = Batches(args, tok, rank, world)
    total = args.max_steps or batches.steps_for(args.epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    start, log = 0, []
    if args.resume:
        if not (Path(args.out) / STATE_JSON).exists():
            sys.exit(f"train_sft.py: --resume: no {STATE_JSON} in {args.out}")
        model = Qwen3.from_pretrained(args.out).to(device).train()
        model.gradient_checkpointing = args.gradient_checkpointing
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
        start, log = load_training_state(args.out, opt)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if rank == 0:
        print(f"stage {args.stage}: {sum(p.numel() for p in model.parameters()):,} parameters, {total} steps, "
              f"global batch {batches.global_batch}, lr {args.lr}, keep_last_n_blocks={args.keep_last_n_blocks}, "
              f"data {args.data} ({batches.report}), device {device}, {world} process(es)", flush=True)
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0 or args.no_progress, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    metrics = {}
    for step in bar:
        micro, n_labels = batches.step(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr, args.warmup_frac)
        loss_sum = torch.zeros((), device=device)
        for j, (ids, labels) in enumerate(micro):
            ids, labels = ids.to(device), labels.to(device)
            mask_from = stage_mask(ids, tokens, args.memento)
            sync = nullcontext() if (world == 1 or j == len(micro) - 1) else ddp.no_sync()
            with sync, autocast:
                # The loss inside the forward: chunked, so [T, vocab] logits never exist.
                # Sum over tokens / labelled tokens of the GLOBAL batch: every process and
                # micro-step weighs each token the same; DDP averages over processes, so * world
                ce = ddp(ids, mask_from=mask_from, labels=labels).sum()
                (ce * world / n_labels).backward()
            loss_sum += ce.detach()
            seen += int((ids != tok.token_id("<|endoftext|>")).sum()) * world
        if world > 1:
            dist.all_reduce(loss_sum)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss_sum.item() / n_labels
        entry = {"step": step + 1, "loss": loss, "lr": opt.param_groups[0]["lr"]}
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{seen / (time.perf_counter() - t0):,.0f}")
        last = step + 1 == total
        want_eval = (args.eval_every and (step + 1) % args.eval_every == 0) or last
        if rank == 0 and args.data == "toy" and args.eval_samples > 0 and want_eval:
            ev = evaluate_toy(model, tok, args.eval_samples, args.seed, MementoConfig(0))
            entry["eval_accuracy_compaction"] = ev["accuracy"]
            tqdm.write(f"step {step + 1}: loss {loss:.4f}, accuracy with compaction {ev['accuracy']:.3f} {ev['reasons']}")
        log.append(entry)
        if rank == 0 and (last or (args.save_every and (step + 1) % args.save_every == 0)):
            save_checkpoint(args.out, model, tok, opt, step + 1, args, log)
        if world > 1:
            dist.barrier()
    metrics = {"final_loss": log[-1]["loss"] if log else None, "steps": total,
               "seconds": time.perf_counter() - t0, "log": log}
    if rank == 0:
        print(f"stage {args.stage} done in {metrics['seconds']:.0f} s; final loss {metrics['final_loss']:.4f}; wrote {args.out}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return metrics


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
