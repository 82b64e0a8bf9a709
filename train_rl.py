"""Reinforcement learning with block masking: CISPO with a KL penalty (paper §5, §A.2.3).

    python train_rl.py --init-from out/stage1 --data toy --out out/rl      # the embedded task, CPU

Each step samples P prompts and G rollouts per prompt through the serving engine, exactly as
the model is used: compaction on (keep_last_n_blocks 0), --max-block-tokens, temperature 1.
A rollout's reward is 1 if data/grading.py accepts its answer, else 0; its advantage is its
reward minus its group's mean, divided by the standard deviation of all advantages of the
step (batch-level normalization, §A.2.3). The policy's log-probs of the sampled tokens come
from ONE training forward over prompt + response under the stage-2 mask built from the
rollout's own tokens (blocks.build_mask_from): what the policy saw while
generating, so the gradient matches generation (tests/test_rl.py checks that these log-probs
equal the engine's sampling log-probs). The loss per token t of rollout i (CISPO, with r the
ratio of the current to the sampling policy's probability):

    l_it = - sg(clip(r_it, 1 - eps_low, 1 + eps_high)) * A_i * log pi(o_it)  +  beta * k3_it
    (no lower bound by default, as MiniMax-M1's CISPO: --eps-low sets one)
    k3_it = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1     (>= 0; E_pi[k3] = KL(pi || pi_ref))

summed over each group's tokens and divided by the group's total response tokens, then
averaged over the groups of a minibatch. Unlike PPO's clipped objective, a token whose ratio
leaves the clip range keeps its gradient (only the weight is clipped). pi_ref is the frozen
--init-from model. Each step's rollouts are split into --minibatches optimizer steps (the
first on-policy, r = 1; later ones off by the earlier updates).

Memory is bounded at every scale (bench/memory.py --rl has the arithmetic): under torchrun each
process generates its share of the step's groups and the rollouts are exchanged
(sharded_rollouts); the engine's KV pool has a budget (--kv-cache-gib, else the engine's
default) in the compute dtype (bf16 on CUDA, where rollouts and training forwards run under
bf16 autocast with the LM head in fp32); with --fsdp the policy decodes through an unsharded
copy in the compute dtype, refreshed from the shards before each step's rollouts
(sharding.generation_copy), and the frozen reference is sharded like the policy (else held in the
compute dtype); the reference's forward runs without autograd; the training forward takes
--micro-batch-size rollouts at a time, gradients accumulating over a minibatch.
Each process trains on its share of the groups.

Checkpoints, --resume, --overwrite and signals are training.py's, as for train_sft.py (the
same run directory layout and atomic HF checkpoints).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from blocks import MementoConfig, MementoTokens, build_mask_from, trace_stats
from checkpoint import resolve_checkpoint
from cli import ArgumentParser, add_bad_records_arg, nonnegative_int, positive_float, positive_int, probability
from data import grading
from engine import Engine, EngineConfig
from evaluation import Problem, load_problems, toy_max_new_tokens, toy_problems
from kv_cache import curve_stats, kv_bytes_per_token
from model import IGNORE_INDEX, Qwen3
from sampling import SamplingParams, request_seed
from sharding import (generation_copy, grad_sync, load_optimizer_state, parallelize, refresh_generation_copy,
                      total_norm)
from tokenizer import Tokenizer
from training import (StopRequest, TrainingError, add_optimizer_args, add_run_args, check_resume_args, check_run_args,
                      clear_run, compute_autocast, evaluate_toy, load_training_state, lr_at, metrics_file, save_if_due,
                      start_run)

RUN_DEFINING = ("init_from", "data", "data_sha256", "split", "config", "problem_key", "answer_key", "seed",
                "prompts_per_step", "group_size", "minibatches", "max_steps", "lr", "warmup_frac", "eps_low", "eps_high", "beta", "temperature",
                "max_new_tokens", "max_block_tokens", "world_size")


def parse_args(argv=None):
    """The command line (defaults: the toy run from out/stage1). One line and exit 2 for a
    group of 1, more minibatches than prompts, or --fsdp without torchrun."""
    ap = ArgumentParser(prog="train_rl.py", description=__doc__)
    ap.add_argument("--init-from", default="out/stage1", help="checkpoint, training run or hub id (policy and reference)")
    # problems
    ap.add_argument("--data", default="toy", help="'toy', or a .jsonl/.parquet file or hub id with problems and answers")
    ap.add_argument("--problem-key", default="problem", help="column holding the problem")
    ap.add_argument("--answer-key", default="answer",
                    help="column holding the reference answer: a string, a number, or a list of acceptable answers")
    add_bad_records_arg(ap, "skip")
    ap.add_argument("--split", default=None, help="the dataset split (required when it has several, e.g. test)")
    ap.add_argument("--config", default=None, help="the hub dataset's config (subset), e.g. gpqa_diamond")
    # steps: P prompts x G rollouts, then --minibatches optimizer steps
    ap.add_argument("--max-steps", type=positive_int, default=60, help="RL steps (each: rollouts, then updates)")
    ap.add_argument("--prompts-per-step", type=positive_int, default=16, help="P prompts per step (paper: 240)")
    ap.add_argument("--group-size", type=positive_int, default=8, help="G rollouts per prompt (paper: 8)")
    ap.add_argument("--minibatches", type=positive_int, default=2, help="optimizer steps per RL step")
    ap.add_argument("--micro-batch-size", type=positive_int, default=64,
                    help="rollouts per training forward (gradients accumulate over a minibatch; paper scale: 1)")
    add_optimizer_args(ap, lr=2e-4, lr_help="peak learning rate (paper: 1e-6 for Qwen3-8B)")
    # the objective (CISPO + k3 KL)
    ap.add_argument("--eps-low", type=positive_float, default=None,
                    help="CISPO: ratio weight clipped below 1 - eps_low (default: no lower bound, as MiniMax-M1's CISPO)")
    ap.add_argument("--eps-high", type=positive_float, default=0.2, help="CISPO: ratio weight clipped above 1 + eps_high")
    ap.add_argument("--beta", type=float, default=0.001, help="KL(pi || pi_ref) coefficient (k3 estimator)")
    # rollouts
    ap.add_argument("--temperature", type=positive_float, default=1.0, help="rollout sampling temperature")
    ap.add_argument("--max-new-tokens", type=positive_int, default=31744, help="response tokens per rollout (toy: capped)")
    ap.add_argument("--max-block-tokens", type=positive_int, default=7168, help="force <|block_end|> at this block length")
    ap.add_argument("--max-num-seqs", type=positive_int, default=256, help="rollouts decoded together")
    ap.add_argument("--kv-cache-gib", type=positive_float, default=None,
                    help="rollout KV pool per process, GiB (default: the engine's, --gpu-memory-utilization on CUDA)")
    ap.add_argument("--gpu-memory-utilization", type=probability, default=0.9,
                    help="share of the GPU the rollout engine may fill, weights and training state included")
    ap.add_argument("--seed", type=int, default=0, help="prompts and rollout sampling")
    ap.add_argument("--eval-every", type=nonnegative_int, default=20, help="steps between held-out evals (0 = end only)")
    ap.add_argument("--eval-samples", type=nonnegative_int, default=100, help="held-out toy problems per eval (0 = none)")
    add_run_args(ap, out="out/rl", save_every=20)
    args = ap.parse_args(argv)
    check_run_args(ap, args)
    if args.group_size < 2:
        ap.error("--group-size 1 gives every rollout an advantage of 0 (reward minus its own mean): use 2 or more")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; each process trains on its share of the groups
    share = args.prompts_per_step // world
    if args.minibatches > share:
        ap.error(f"--minibatches {args.minibatches} exceeds the {share} groups each of {world} process(es) trains on "
                 f"(--prompts-per-step {args.prompts_per_step} / {world}; groups are not split): lower --minibatches "
                 "or raise --prompts-per-step")
    if args.temperature != 1.0:
        ap.error(f"--temperature {args.temperature:g}: RL samples at temperature 1, where the recorded and the training "
                 "log-probs are of the distribution actually sampled (CISPO's ratio would be biased otherwise)")
    return args


# ----------------------------------------------------------------------------- the objective

def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] rewards -> [P, G] advantages: reward minus its group's mean, divided by the
    standard deviation of all the step's advantages (batch-level normalization, §A.2.3; 1 if
    they are all 0). A group whose rewards are all equal gets 0 everywhere."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    std = adv.std() if adv.numel() > 1 else adv.new_zeros(())
    return adv / std if std > 0 else adv


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020):
    exp(ref - logp) - (ref - logp) - 1, >= 0, and 0 where the two agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def group_norms(group: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[N] float32: each rollout's weight in its minibatch's loss, 1 / (its group's sampled
    tokens (at least 1) x the number of groups), so that summing rollouts' token losses times
    these is the mean over groups of each group's token mean (§A.2.3). group: [N] int ids;
    tokens: [N] sampled tokens per rollout."""
    ids, inverse = torch.unique(group, return_inverse=True)
    per_group = torch.zeros(len(ids), dtype=torch.float32, device=tokens.device).index_add_(0, inverse, tokens.float())
    return 1.0 / (per_group.clamp(min=1)[inverse] * len(ids))


def cispo_loss(logp, old_logp, ref_logp, adv, mask, group=None, eps_low: float | None = None, eps_high: float = 0.2,
               beta: float = 0.001, norm: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """CISPO with a k3 KL penalty, normalized per group (paper §A.2.3; module docstring).

    Args:
        logp: [N, T] log pi(token) of the current policy (differentiable).
        old_logp: [N, T] the sampling policy's log-probs; ref_logp: [N, T] the reference's.
        adv: [N] advantage per rollout. mask: [N, T] bool, the sampled response tokens.
        group: [N] int group id per rollout (used when norm is None).
        norm: [N] each rollout's weight (group_norms of the whole minibatch), so that a
            minibatch split into micro-batches sums to the loss of the whole; None:
            group_norms(group, mask.sum(1)) of these rows.
    Returns:
        (scalar loss: sum over rows of norm x the row's token losses, i.e. for a whole
         minibatch the mean over groups of (sum of token losses / group's tokens),
         {"kl": mean k3 per token, "clip_frac": share of tokens whose ratio was clipped,
          "tokens": sampled tokens}).
    Raises ValueError when neither group nor norm is given.
    """
    if norm is None:
        if group is None:
            raise ValueError("cispo_loss: give each rollout's group (or its norm)")
        norm = group_norms(group, mask.sum(1))
    m = mask.float()
    ratio = torch.exp(logp.detach() - old_logp)
    low = None if eps_low is None else 1 - eps_low  # None: no lower bound (MiniMax-M1)
    weight = ratio.clamp(low, 1 + eps_high)
    k3 = kl_k3(logp, ref_logp)
    per_token = (-(weight * adv[:, None] * logp) + beta * k3) * m
    loss = (per_token.sum(1) * norm).sum()
    n = m.sum().clamp(min=1)
    clipped = ((ratio < (low if low is not None else float("-inf"))) | (ratio > 1 + eps_high)).float()
    return loss, {"kl": float((k3.detach() * m).sum() / n), "clip_frac": float((clipped * m).sum() / n),
                  "tokens": int(m.sum())}


def token_logprobs(model, ids: torch.Tensor, labels: torch.Tensor, fmt: MementoTokens) -> torch.Tensor:
    """[N, T-1] log-probs of ids[:, 1:] under the memento mask of the rows' own tokens (the
    stage-2 mask, §4), from one forward (the chunked next-token loss; 0 where labels[:, 1:] is
    IGNORE_INDEX). `model` may be wrapped (DDP/FSDP)."""
    return -model(ids, mask_from=build_mask_from(ids, fmt, MementoConfig(0)), labels=labels)


# ----------------------------------------------------------------------------- rollouts

def rollout_engine_config(model, args, kv_cache_dtype: torch.dtype | None = None) -> EngineConfig:
    """The rollouts' EngineConfig (§A.2.3): compaction on (keep_last_n_blocks 0), the block cap,
    a KV pool of args.kv_cache_gib GiB (None: the engine's default budget; getattr so callers
    may omit the budget flags) in kv_cache_dtype (None: the parameters' dtype)."""
    gib = getattr(args, "kv_cache_gib", None)
    dtype = kv_cache_dtype or next(model.parameters()).dtype
    tokens = None if gib is None else max(1, int(gib * 2**30) // kv_bytes_per_token(model.config, dtype))
    return EngineConfig(MementoConfig(0), max_block_tokens=args.max_block_tokens, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=max(2048, args.max_num_seqs), kv_cache_dtype=kv_cache_dtype,
                        kv_cache_tokens=tokens, gpu_memory_utilization=getattr(args, "gpu_memory_utilization", 0.9))


def rollouts(model, tok, problems: list[Problem], args, step_seed: int) -> list[dict]:
    """G rollouts of each problem through one Engine with compaction, the sampling log-probs
    recorded; rollout k of problem p samples with seed request_seed(step_seed, p.id, k), so a
    problem's rollouts do not depend on which process generates them or what runs beside it.
    Under autocast the KV pool is in autocast's dtype (bf16 on CUDA). Returns one dict per
    rollout, problem-major: prompt/response ids, old log-probs, reward, group (= p.id), and
    the trace's KV and block figures. Raises ValueError when the budget holds no page. Paper §A.2.3."""
    fmt = MementoTokens.from_tokenizer(tok)
    device = next(model.parameters()).device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    eng = Engine(model, tok, rollout_engine_config(model, args, dtype))
    toy_cap = toy_max_new_tokens(tok)
    seqs = []
    for p in problems:
        prompt = tok.prompt_ids(p.prompt)
        cap = min(args.max_new_tokens, toy_cap) if p.kind == "toy" else args.max_new_tokens
        cap = max(1, min(cap, model.config.max_position_embeddings - len(prompt)))
        for k in range(args.group_size):  # full distribution, no top-k/top-p: the log-probs are the policy's
            params = SamplingParams(args.temperature, 1.0, 0, max_tokens=cap, seed=request_seed(step_seed, p.id, k),
                                    logprobs=0)
            seqs.append((p, eng.add(prompt, params)))
    eng.run()
    out = []
    for p, s in seqs:
        verdict = grading.grade(tok.decode(s.tokens), p.gold, p.kind, prompt=p.prompt)
        out.append({"prompt": s.prompt, "response": s.tokens, "old_logp": s.logprobs, "group": p.id,
                    "reward": float(verdict["correct"]), "peak_kv": curve_stats(s.curve, 0)["peak_kv_tokens"],
                    **trace_stats(s.tokens, fmt)})
    return out


def sharded_rollouts(model, tok, problems: list[Problem], args, step_seed: int, rank: int, world: int) -> list[dict]:
    """The step's rollouts, each process generating its share (problems rank, rank + world, ...)
    and all of them exchanged, so that rewards and advantages are computed over the whole step
    (paper §A.2.3). Equal to rollouts() of every problem in one process, since a rollout's seed
    is its problem's and sampling does not depend on the batch. `model` is unsharded (with
    --fsdp the generation copy), so the processes decode independently."""
    if world == 1:
        return rollouts(model, tok, problems, args, step_seed)
    mine = rollouts(model, tok, problems[rank::world], args, step_seed)
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    by_problem = {}
    for share in shares:
        for r in share:
            by_problem.setdefault(r["group"], []).append(r)
    return [r for p in problems for r in by_problem[p.id]]


def distribute(model: Qwen3, ref: Qwen3, world: int, device: torch.device, fsdp: bool, cpu_offload: bool = False):
    """(what the loop trains, the generation copy or None, the reference) for `world`
    processes (sharding.parallelize): under fsdp the policy and the frozen reference are both
    sharded with FSDP2 and rollouts decode through generation_copy (in the reference's dtype,
    the compute dtype), made here before sharding. Raises RuntimeError (one line) for fsdp
    without torch.distributed. Paper §A.2.3."""
    gen = generation_copy(model, next(ref.parameters()).dtype) if fsdp else None
    wrapped = parallelize(model, world, device, fsdp, cpu_offload)
    if fsdp:
        ref = parallelize(ref, world, device, True, cpu_offload)
    return wrapped, gen, ref


def collate(rows: list[dict], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [N, T], labels [N, T] (IGNORE_INDEX but on sampled response tokens), old log-probs
    [N, T-1] aligned with the forward's output, mask [N, T-1] of the sampled tokens)."""
    T = max(len(r["prompt"]) + len(r["response"]) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.int64)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.int64)
    old = torch.zeros(len(rows), T - 1)
    for n, r in enumerate(rows):
        a, seq = len(r["prompt"]), r["prompt"] + r["response"]
        ids[n, :len(seq)] = torch.tensor(seq)
        lp = torch.tensor(r["old_logp"], dtype=torch.float32)
        sampled = ~torch.isnan(lp)  # tokens the engine forced are not the policy's actions
        labels[n, a:len(seq)] = torch.where(sampled, torch.tensor(r["response"]), IGNORE_INDEX)
        old[n, a - 1:len(seq) - 1] = torch.nan_to_num(lp)
    mask = labels[:, 1:] != IGNORE_INDEX
    return ids, labels, old, mask


# ----------------------------------------------------------------------------- training

def train(args) -> dict:
    """Run RL; returns the final metrics (also written to metrics.jsonl and checkpoints).
    Raises TrainingError (one line) for a run that cannot start or resume."""
    rank, world, device, run, resume_from = start_run(args)
    if args.prompts_per_step % world:
        raise TrainingError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes")
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32  # compute_autocast's dtype
    try:
        init = resolve_checkpoint(args.init_from)
        # the frozen reference: never trained, so no fp32 master copy; sharded below under --fsdp
        ref = Qwen3.from_pretrained(init, dtype=compute).to(device).eval().requires_grad_(False)
        model = Qwen3.from_pretrained(resume_from or init).to(device)
        tok = Tokenizer.from_dir(resume_from or init)
        fmt = MementoTokens.from_tokenizer(tok)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise TrainingError(f"cannot load --init-from {args.init_from}: {e}") from None
    model.fp32_lm_head = ref.fp32_lm_head = True  # sampler and trainer log-probs from one fp32 head
    args.data_sha256, skipped = None, ""
    pool = None
    if args.data != "toy":
        try:
            pool, report = load_problems(args.data, args.problem_key, args.answer_key, split=args.split,
                                         config=args.config, seed=args.seed, bad=args.bad_records)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise TrainingError(str(e)) from None
        if not pool:
            raise TrainingError(f"--data {args.data}: no row with a problem and an answer")
        args.data_sha256 = report.data_hash  # compared by --resume: other data is another run
        skipped = f" ({report.summary()})" if report.n_skipped else ""
    start, log, opt_state = 0, [], None
    if resume_from is not None:
        start, log, saved, opt_state = load_training_state(resume_from, model)
        check_resume_args(args, world, saved, RUN_DEFINING)
    try:
        wrapped, gen, ref = distribute(model, ref, world, device, args.fsdp, args.cpu_offload)
    except RuntimeError as e:
        raise TrainingError(str(e)) from None
    autocast = lambda: compute_autocast(device)  # noqa: E731 (a fresh context each time)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    if opt_state is not None:
        load_optimizer_state(model, opt, opt_state)
    pad = tok.token_id("<|endoftext|>")
    if rank == 0:
        print(f"RL: {sum(p.numel() for p in model.parameters()):,} parameters, {args.max_steps} steps of "
              f"{args.prompts_per_step} prompts x {args.group_size} rollouts, data {args.data}{skipped}, "
              f"{world} process(es), run {run}", flush=True)
    if args.overwrite and rank == 0:  # every input checked: now the old run may go
        clear_run(run)
    metrics_out = metrics_file(run, start) if rank == 0 else None
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, dynamic_ncols=True,
               disable=rank != 0 or args.no_progress)
    t0 = time.perf_counter()
    with StopRequest() as stop:
        for step in bar:
            rng = random.Random(f"rl:{args.seed}:{step}")
            problems = ([Problem(i, p.prompt, None, "toy") for i, p in enumerate(toy_problems(args.prompts_per_step,
                                                                                           rng.randrange(2**31)))]
                        if pool is None else [Problem(i, p.prompt, p.gold, p.kind)
                                              for i, p in enumerate(rng.sample(pool, min(len(pool), args.prompts_per_step)))])
            model.eval()
            if gen is not None:
                refresh_generation_copy(gen, model)
            with autocast():
                rows = sharded_rollouts(gen or model, tok, problems, args, request_seed(args.seed, step), rank, world)
            model.train()
            rewards = torch.tensor([r["reward"] for r in rows]).view(len(problems), args.group_size)
            adv = group_advantages(rewards).flatten()
            lr = lr_at(step, args.max_steps, args.lr, args.warmup_frac)
            for g in opt.param_groups:
                g["lr"] = lr
            mine = list(range(len(problems)))[rank::world]  # this process's groups
            stats = {"kl": 0.0, "clip_frac": 0.0, "loss": 0.0}
            for mb in range(args.minibatches):
                groups = mine[mb::args.minibatches]
                idx = [g * args.group_size + k for g in groups for k in range(args.group_size)]
                norm = group_norms(torch.tensor([rows[i]["group"] for i in idx]),
                                   torch.tensor([sum(not math.isnan(x) for x in rows[i]["old_logp"]) for i in idx]))
                micro = [list(range(j, min(j + args.micro_batch_size, len(idx))))
                         for j in range(0, len(idx), args.micro_batch_size)]
                mb_stats, mb_loss = {"kl": 0.0, "clip_frac": 0.0, "tokens": 0}, 0.0
                for u, part in enumerate(micro):
                    ids, labels, old, mask = collate([rows[idx[j]] for j in part], pad)
                    ids, labels, old, mask = ids.to(device), labels.to(device), old.to(device), mask.to(device)
                    with torch.no_grad(), autocast():
                        ref_logp = token_logprobs(ref, ids, labels, fmt)
                    with grad_sync(wrapped, args.fsdp, world, last=u == len(micro) - 1), autocast():
                        logp = token_logprobs(wrapped, ids, labels, fmt)
                        loss, st = cispo_loss(logp, old, ref_logp, adv[[idx[j] for j in part]].to(device), mask,
                                              eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                                              norm=norm[part].to(device))
                        loss.backward()
                    mb_loss += float(loss.detach())
                    for k in ("kl", "clip_frac"):
                        mb_stats[k] += st[k] * st["tokens"]
                    mb_stats["tokens"] += st["tokens"]
                grad_norm = total_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
                opt.step()
                opt.zero_grad(set_to_none=True)
                for k in ("kl", "clip_frac"):
                    stats[k] += mb_stats[k] / max(1, mb_stats["tokens"]) / args.minibatches
                stats["loss"] += mb_loss / args.minibatches
            n = len(rows)
            entry = {"step": step + 1, "reward": sum(r["reward"] for r in rows) / n, "lr": lr, "grad_norm": grad_norm,
                     "response_tokens": sum(len(r["response"]) for r in rows) / n,
                     "blocks": sum(r["blocks"] for r in rows) / n,
                     "block_tokens": sum(r["mean_block_tokens"] for r in rows) / n,
                     "peak_kv_tokens": sum(r["peak_kv"] for r in rows) / n, **stats,
                     "seconds": time.perf_counter() - t0}
            entry["accuracy"] = entry["reward"]  # the reward is 1 exactly when the answer is right
            bar.set_postfix(reward=f"{entry['reward']:.3f}", kl=f"{entry['kl']:.4f}", blocks=f"{entry['blocks']:.1f}")
            last = step + 1 == args.max_steps
            if args.eval_samples and args.data == "toy" and (last or (args.eval_every and (step + 1) % args.eval_every == 0)):
                # each process decodes its share; under --fsdp through the copy, refreshed
                # from the shards (the policy changed since the step's rollouts)
                ev = evaluate_toy(model, tok, args.eval_samples, args.seed + 10_000, args.max_num_seqs, rank=rank,
                                  world=world, generation=gen)
                entry["eval_accuracy"] = ev["accuracy"]
                if rank == 0:
                    tqdm.write(f"step {step + 1}: reward {entry['reward']:.3f}, held-out accuracy with compaction "
                               f"{entry['eval_accuracy']:.3f} ({ev['n']} prompts)")
            log.append(entry)
            if metrics_out:
                metrics_out.write(json.dumps(entry) + "\n")
            stopping, _, _ = save_if_due(stop, step, args.max_steps, args, model, opt, tok, log, None, rank, world, device)
            if stopping:
                break
    if metrics_out:
        metrics_out.close()
    if world > 1:
        dist.barrier()  # leave together: a gloo rank torn down while its peer still sends can abort
        dist.destroy_process_group()
    return {"log": log, "seconds": time.perf_counter() - t0, "stopped": stop.name}


def main(argv=None):
    """Parse the command line and run RL (train); a problem the user can fix ends the run with
    one line (`train_rl.py: ...`, exit 1)."""
    try:
        train(parse_args(argv))
    except TrainingError as e:
        sys.exit(f"train_rl.py: {e}")


if __name__ == "__main__":
    main()
