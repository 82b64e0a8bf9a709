"""Probing the implicit channel: is a passcode in block T2 readable from memento K/V?
(paper §6.2 probing experiment.)

    python experiments/probe_kv.py [--json] [--n 4000] [--work-dir /tmp/memento_probe]
    python experiments/probe_kv.py --design cumulative      # mementos that must read each other

1. Data: experiments/digits.py traces, 10 blocks of 5 random digits with running-sum
   mementos "b{i}={sum}", in the OpenMementos schema (a .jsonl under --work-dir); with
   --design cumulative, blocks with local partial sums and mementos holding the three-digit
   sum of all digits so far (results in probe_kv_cumulative.json, no plots by default).
2. Toy model: a 4-layer Qwen3, hidden 128, 4 query heads, 2 KV heads (head dim 32), byte-level
   tokenizer, trained from scratch with train_sft.py: stage 1 (full causal attention) then
   stage 2 (memento attention, keep_last_n_blocks=0), with a stage-2 checkpoint every
   --snapshot-every steps (train_sft.py's own step checkpoints, all kept). Checkpoints stay
   under --work-dir (outside the repository); --reuse skips a stage whose final checkpoint is
   already there from the same data and arguments. The cumulative design trains far longer
   (DEFAULTS: 5,000 + 450 steps on 40,000 traces): with the restate recipe it never solved
   its task.
3. Features: each probe sequence is teacher-forced through engine.generate(forced=...) with
   compaction on (normal mode) and again with restart=True (restart mode). After the trace the
   cache holds exactly the non-evicted tokens: prompt, delimiters and mementos. The feature of
   memento Mi at layer l is K and V (all KV heads, flattened; 2 x 2 x 32 = 128 numbers per
   token) at the memento's token positions, concatenated: with --features memento (default)
   its last 6 tokens up to and including <|summary_end|>, which for M1..M9 ("b{i}={sum}") is
   every token from <|summary_start|> to <|summary_end|> (paper §6.2: "K and V at memento
   positions"); with --features last-text only the token right before <|summary_end|> (the
   running-sum digit). In normal mode <|summary_start|> .. the last text token attend to
   their block directly and <|summary_end|> no longer does (the block is masked from it on),
   so the memento's features hold both the direct and the implicit route; in layer 0 every
   token's K/V are a function of the token and its position only, i.e. a text-only
   reference built into every table.
4. Probes: an MLP in -> 512 -> 256 -> 128 -> 5 x 10 logits (the paper's 512-256 with a 128
   bottleneck), Adam, early stopping on a validation split, per layer and on all layers
   concatenated. Splits are label-unique: the passcodes (5-digit combinations) are divided
   70/15/15 into train / validation (early stopping) / test (reported), so no combination is
   in two splits. Reported accuracy = test accuracy averaged over the 5 digits; chance 10%.
   Probed mementos: M1 (before T2: causal control), M2 (saw T2: direct), M3 (never saw T2),
   and M(2+k) for k = 1..7 (distance).
5. Text channel: the memento text states the running sum, so M2/M3 text reveals the passcode's
   digit sum mod 10. `digits.text_only_digit_accuracy` enumerates all passcodes: the
   Bayes-optimal per-digit accuracy from that sum is exactly 10%. Restart mode keeps the text
   and removes the K/V channel, so its probe accuracy is the measured text-only level.
6. Leakage across checkpoints: for the stage-1 model and each stage-2 snapshot, probe accuracy
   at M2 and M3 (all layers, normal mode) next to task accuracy (sampled generation, checked
   by digits.check_trace) and teacher-forced memento accuracy (argmax of the memento's sum
   digit, compaction on).

JSON (--json prints it; always written to --out):
    config, machine, wall_seconds, train {stage1, stage2: steps, seconds, final_loss},
    text_only_bayes_digit_accuracy,
    probes: list of {mode: normal|restart, memento: i (Mi), k: i - 2, layer: 0..L-1|"all",
        test_acc, test_ci95, val_acc, train_acc, epochs, n_train, n_val, n_test},
    checkpoints: list of {name, step, task_accuracy, task_n, memento_sum_accuracy,
        probe_M2_all, probe_M3_all}
Plots: probe_layers.png (per layer, M1/M2/M3, normal vs restart), probe_distance.png
(per k, normal vs restart), probe_checkpoints.png.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402
from common import REPO, RESULTS, load_checkpoint, machine_info, pyplot, wilson  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import model as model_module  # noqa: E402  (attention_mass patches its attention)
import sft  # noqa: E402
from blocks import EMPTY, NEVER, BlockTracker, MementoConfig, MementoTokens, build_mask_from  # noqa: E402
from checkpoint import run_checkpoints, step_dir_name  # noqa: E402
from engine import EngineConfig, generate  # noqa: E402
from kv_cache import PagedKVCache  # noqa: E402
from memento_attention import visible_mask  # noqa: E402
from sampling import SamplingParams  # noqa: E402

PASSCODE_BLOCK = 2  # T2


# ----------------------------------------------------------------------------- features

FEATURE_TOKENS = {"memento": 6, "last-text": 1}  # "block": every content token of the block (design-dependent)


def feature_positions(ids: list[int], tokens: MementoTokens, features: str = "memento") -> list[list[int]]:
    """Positions whose K/V form each completed memento's probe feature, in block order.

    features: "memento" = the memento's last 6 tokens ending at <|summary_end|> (the whole
    memento for "b{i}={sum}", i < 10); "last-text" = the token before <|summary_end|>;
    "block" = the block's own content tokens (between <|block_start|> and <|block_end|>: the
    direct probe, an upper bound on what the model holds about the block).
    Returns one list of ints per memento. Raises KeyError for another `features` value.
    """
    if features == "last-text":
        return [[p] for p in memento_positions(ids, tokens)]
    if features == "block":
        tr = BlockTracker(tokens, MementoConfig(0))
        for t in ids:
            tr.step(t)
        return [list(range(b.start + 1, b.end)) for b in tr.completed]
    n = FEATURE_TOKENS[features]
    tr = BlockTracker(tokens, MementoConfig(0))
    for t in ids:
        tr.step(t)
    return [list(range(b.summary_end - n + 1, b.summary_end + 1)) for b in tr.completed]


def memento_positions(ids: list[int], tokens: MementoTokens) -> list[int]:
    """Logical position of the feature token of each completed memento, in block order:
    the token right before <|summary_end|> (see the module docstring for why).

    ids: the whole sequence (prompt + response). Returns a list of ints (one per memento).
    """
    tr = BlockTracker(tokens, MementoConfig(0))
    for t in ids:
        tr.step(t)
    return [b.summary_end - 1 for b in tr.completed]


def restart_mask_from(ids: torch.Tensor, tokens: MementoTokens) -> torch.Tensor:
    """mask_from [B, T] (int64) whose one causal forward reproduces restart mode (§6.2.1).

    Restart mode evicts a block WITH its delimiters once its memento completes and recomputes
    the memento's tokens (<|summary_start|> .. last text token) without it; every later token
    then sees the recomputed K/V. As a visibility rule: the keys of block b (<|block_start|> ..
    <|block_end|>) are visible to queries up to its <|block_end|> and hidden from the next
    position on, so the memento tokens, <|summary_end|> and everything after never see it,
    while the block's own tokens were computed with it (as when they were decoded).
    tests/test_experiments.py checks this against generate(..., restart=True).
    """
    _, trackers = build_mask_from(ids, tokens, MementoConfig(0), return_trackers=True)
    mf = torch.full(ids.shape, NEVER, dtype=torch.int64)
    for r, tr in enumerate(trackers):
        for b in tr.completed:
            mf[r, b.start:b.end + 1] = b.end + 1
    return mf


@torch.no_grad()
def memento_kv(model, tok, prompts: list[str], responses: list[str], *, restart: bool,
               batch: int = 250, features: str = "memento") -> np.ndarray:
    """K/V features of every memento of teacher-forced traces (§6.2.1 probing protocol).

    Each batch is one prefill of the whole sequences (prompt + response) into a fresh
    PagedKVCache with the memento mask (normal mode: build_mask_from, keep_last_n_blocks=0) or
    the restart-mode mask (`restart_mask_from`). The K/V a prefill writes for a token equal
    the ones token-by-token decoding with compaction leaves in the cache (tested against
    generate(forced=..., restart=...) in tests/test_experiments.py); one prefill is simply
    cheaper than decoding 3,000 traces token by token.

    Args:
        model: model.Qwen3 (eval). tok: its tokenizer. prompts: user messages (ChatML is
            applied). responses: response texts, all with the same number of mementos.
        restart: False = normal memento attention; True = restart mode.
        batch: sequences per forward (right-padded; padding is visible to no query).
        features: which memento tokens, see `feature_positions`.
    Returns:
        float32 array [N, M, L, 2 * n * Hkv * D]: sequence, memento (M1 first), layer, then
        K of the n feature tokens (token, head, head_dim; after q/k-norm and RoPE) followed
        by their V.
    Raises:
        ValueError if a trace has a different memento count than the first.
    """
    fmt = MementoTokens.from_tokenizer(tok)
    out, n_mem = [], None
    for i in range(0, len(prompts), batch):
        seqs = [tok.prompt_ids(p) + tok.encode(r) for p, r in zip(prompts[i:i + batch], responses[i:i + batch])]
        B, S = len(seqs), max(map(len, seqs))
        ids = torch.zeros(B, S, dtype=torch.int64)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
        mf = restart_mask_from(ids, fmt) if restart else build_mask_from(ids, fmt, MementoConfig(0))
        for r, s in enumerate(seqs):
            mf[r, len(s):] = EMPTY
        cache = PagedKVCache(model.config, torch.float32, "cpu")
        for r in range(B):
            cache.add(r)
        model.hidden_states(ids, torch.arange(S).expand(B, S), mf, cache.batch(list(range(B))))
        for r, s in enumerate(seqs):
            pos = torch.tensor(feature_positions(s, fmt, features))  # [M, n]
            n_mem = n_mem if n_mem is not None else len(pos)
            if len(pos) != n_mem:
                raise ValueError(f"trace {i + r} has {len(pos)} mementos, expected {n_mem}")
            # index == position: nothing is evicted from a prefill; k, v [L, S, Hkv, D] -> [M, n*Hkv*D] per layer
            _, k, v, _ = cache.read(r)
            feats = [torch.cat([k[l][pos].flatten(1), v[l][pos].flatten(1)], -1) for l in range(k.shape[0])]
            out.append(torch.stack(feats, 1).numpy())  # [M, L, F]
    return np.stack(out).astype(np.float32)


@torch.no_grad()
def attention_mass(model, tok, prompts: list[str], responses: list[str], *, src: int = 3, dst: int = 2,
                   cfg: MementoConfig = MementoConfig(0)) -> list[float]:
    """Mean attention probability that memento M{src}'s tokens put on memento M{dst}'s tokens
    (<|summary_start|> .. <|summary_end|>), per layer, under the memento mask (normal mode),
    averaged over query heads, M{src}'s tokens and the sequences: how much a memento reads an
    earlier one. One full forward per sequence with the attention probabilities recomputed
    from the q, k the model's layers produce (cfg: the mask; tests compare keep_last_n_blocks
    -1 with transformers' attention probabilities). Returns [L] floats in [0, 1]."""
    fmt = MementoTokens.from_tokenizer(tok)
    orig, seen = model_module.attention, []

    def record(q, k, v, mask_from=None, **kw):
        seen.append((q, k, mask_from))
        return orig(q, k, v, mask_from, **kw)

    total = None
    model_module.attention = record
    try:
        for p, r in zip(prompts, responses):
            ids_list = tok.prompt_ids(p) + tok.encode(r)
            tr = BlockTracker(fmt, MementoConfig(0))
            for t in ids_list:
                tr.step(t)
            b_src, b_dst = tr.completed[src - 1], tr.completed[dst - 1]
            qs, ks = list(range(b_src.end + 1, b_src.summary_end + 1)), list(range(b_dst.end + 1, b_dst.summary_end + 1))
            ids = torch.tensor([ids_list])
            seen.clear()
            model(ids, mask_from=build_mask_from(ids, fmt, cfg))
            masses = []
            for q, k, mf in seen:
                pos = torch.arange(ids.shape[1])[None]
                vis = visible_mask(pos, pos, mf)[:, None]  # [1, 1, T, T]
                rep = q.shape[1] // k.shape[1]
                scores = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) / q.shape[-1] ** 0.5
                probs = torch.softmax(scores.masked_fill(~vis, float("-inf")), -1)  # [1, H, T, T]
                masses.append(float(probs[0][:, qs][:, :, ks].sum(-1).mean()))
            total = masses if total is None else [a + b for a, b in zip(total, masses)]
    finally:
        model_module.attention = orig
    return [m / len(prompts) for m in total]


# ----------------------------------------------------------------------------- probes

def label_unique_split(labels: np.ndarray, fractions=(0.7, 0.15, 0.15), seed: int = 0):
    """Split indices so that no label combination (row of labels) is in two splits.

    Args:
        labels: [N, K] int array (the passcodes). fractions: of the distinct combinations.
    Returns:
        (train, val, test) int64 index arrays, disjoint, covering 0..N-1.
    """
    keys = [tuple(r) for r in labels.tolist()]
    uniq = sorted(set(keys))
    random.Random(seed).shuffle(uniq)
    n1 = int(round(fractions[0] * len(uniq)))
    n2 = n1 + int(round(fractions[1] * len(uniq)))
    where = {k: (0 if j < n1 else 1 if j < n2 else 2) for j, k in enumerate(uniq)}
    split = np.array([where[k] for k in keys])
    return tuple(np.nonzero(split == s)[0] for s in range(3))


class Probe(nn.Module):
    """MLP probe: in -> 512 -> 256 -> 128 -> n_digits x 10 logits (paper: 512-256 with a
    128 bottleneck). forward: [B, in] float32 -> [B, n_digits, 10]."""

    def __init__(self, d_in: int, n_digits: int = digits.DIGITS_PER_BLOCK):
        super().__init__()
        self.n = n_digits
        self.net = nn.Sequential(nn.Linear(d_in, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, n_digits * 10))

    def forward(self, x):
        return self.net(x).view(-1, self.n, 10)


def train_probe(X: np.ndarray, Y: np.ndarray, split, *, epochs: int = 60, patience: int = 6,
                lr: float = 1e-3, batch: int = 128, seed: int = 0) -> dict:
    """Train one probe with early stopping on validation loss; score on the test split.

    Args:
        X: [N, F] float features. Y: [N, 5] int digits. split: (train, val, test) indices
            from label_unique_split.
    Returns:
        {test_acc, test_ci95 ([low, high], Wilson over the n_test x 5 digit predictions),
        val_acc, train_acc (per-digit accuracy, averaged over digits, of the best-validation
        epoch), epochs (trained), n_train, n_val, n_test}.
    """
    tr, va, te = split
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6  # standardize with train statistics only
    Xt = torch.tensor((X - mu) / sd, dtype=torch.float32)
    Yt = torch.tensor(Y, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = Probe(X.shape[1], Y.shape[1])
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
    lossf = nn.CrossEntropyLoss()

    def evaluate(idx):
        with torch.no_grad():
            lo = probe(Xt[idx])
            return lossf(lo.flatten(0, 1), Yt[idx].flatten()).item(), (lo.argmax(-1) == Yt[idx]).float().mean().item()

    best, best_state, bad, ep = float("inf"), None, 0, 0
    tr_t = torch.tensor(tr)
    for ep in range(1, epochs + 1):
        probe.train()
        idx = tr_t[torch.randperm(len(tr), generator=g)]
        for j in range(0, len(tr), batch):
            b = idx[j:j + batch]
            loss = lossf(probe(Xt[b]).flatten(0, 1), Yt[b].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        probe.eval()
        vl, _ = evaluate(va)
        if vl < best - 1e-4:
            best, bad = vl, 0
            best_state = {k: v.clone() for k, v in probe.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    probe.load_state_dict(best_state)
    probe.eval()
    test_acc = evaluate(te)[1]
    # Wilson interval over the n_test x 5 digit predictions, treating them as independent
    # (they are not quite: the 5 digits of one sequence share features), so a rough guide.
    lo, hi = wilson(round(test_acc * len(te) * Y.shape[1]), len(te) * Y.shape[1])
    return {"test_acc": test_acc, "test_ci95": [lo, hi], "val_acc": evaluate(va)[1], "train_acc": evaluate(tr)[1],
            "epochs": ep, "n_train": len(tr), "n_val": len(va), "n_test": len(te)}


# ----------------------------------------------------------------------------- toy model

def stage_argv(args, work: Path) -> dict:
    """train_sft.py's arguments for each stage of the toy model (paper §4's two stages, on the
    toy of §6.2): {"stage1": [str, ...], "stage2": [str, ...]}, from args (parse_args) and the
    work directory. The stage-2 run keeps every snapshot: the checkpoint series reads them all.
    Raises nothing; sft.parse_args checks the values."""
    common = ["--data", str(work / "data.jsonl"), "--batch-size", str(args.train_batch), "--no-progress",
              "--seed", str(args.seed), "--eval-samples", "0", "--overwrite"]
    size = ["--layers", "4", "--hidden", "128", "--heads", "4", "--kv-heads", "2"]
    return {"stage1": ["--stage", "1", "--out", str(work / "stage1"), "--max-steps", str(args.stage1_steps),
                       "--lr", "2e-3", *size, *common],
            # the leakage-vs-training analysis reads every stage-2 step checkpoint, so keep them all
            "stage2": ["--stage", "2", "--init-from", str(work / "stage1"), "--out", str(work / "stage2"),
                       "--max-steps", str(args.stage2_steps), "--lr", str(args.stage2_lr),
                       "--save-every", str(args.snapshot_every), "--keep-checkpoints", str(args.stage2_steps), *common]}


def train_toy(args, work: Path) -> dict:
    """Train the 4-layer toy model with train_sft.py (stage 1, then stage 2 with snapshots).

    Writes work/data.jsonl and the runs work/stage1, work/stage2 (stage2/step-NNNNNN every
    --snapshot-every steps) and work/train_meta.json. With --reuse, a stage whose final step
    checkpoint is already there (from the same data and arguments: train_meta.json records
    them) is not trained again, so an interrupted run only repeats the stage it was in.
    Returns {"stage1": {...}, "stage2": {...}, "total_seconds"}.
    """
    argv = stage_argv(args, work)
    data_key = {"design": args.design, "train_examples": args.train_examples, "seed": args.seed}
    meta_path = work / "train_meta.json"
    meta = json.loads(meta_path.read_text()) if args.reuse and meta_path.is_file() else {}
    if meta.get("data") != data_key:
        meta = {"data": data_key}
        digits.write_jsonl(work / "data.jsonl", args.train_examples, args.seed, design=args.design)
    t0 = time.perf_counter()
    for stage, steps in (("stage1", args.stage1_steps), ("stage2", args.stage2_steps)):
        done = meta.get(stage, {}).get("argv") == argv[stage] and (work / stage / step_dir_name(steps)).is_dir()
        if not done:
            m = sft.train(sft.parse_args(argv[stage]))
            meta[stage] = {"steps": m["steps"], "seconds": m["seconds"], "final_loss": m["final_loss"], "argv": argv[stage]}
            if stage == "stage1":
                meta.pop("stage2", None)  # a new stage 1 invalidates stage 2
            meta_path.write_text(json.dumps(meta, indent=1))
    return {**{k: {f: v for f, v in meta[k].items() if f != "argv"} for k in ("stage1", "stage2")},
            "total_seconds": time.perf_counter() - t0}


@torch.no_grad()
def task_metrics(model, tok, n: int, seed: int, design: str = "restate") -> dict:
    """Task accuracy (sampled generation, paper sampling, compaction on, digits.check_trace)
    and teacher-forced memento accuracy (a memento is right when the argmax at every digit of
    its sum is: one digit in the restate design, three in the cumulative; compaction on) on n
    fresh problems. Returns {task_accuracy, task_n, memento_sum_accuracy}."""
    rng = random.Random(f"task:{seed}")
    samples = [digits.sample(rng, design=design) for _ in range(n)]
    prompts = [tok.prompt_ids(p.prompt) for p, _, _ in samples]
    ok = 0
    for i in range(0, n, 100):  # generate's eviction costs O(batch) per block; 100 is a middle ground
        seqs, _ = generate(model, tok, prompts[i:i + 100], EngineConfig(MementoConfig(0)),
                           SamplingParams(max_tokens=400 if design == "restate" else 600), seed=seed + i)
        ok += sum(digits.check_trace(p, tok.decode(s.tokens))["correct"] for (p, _, _), s in zip(samples[i:i + 100], seqs))
    fmt = MementoTokens.from_tokenizer(tok)
    hit, tot, width = 0, 0, 3 if design == "cumulative" else 1  # digits in a memento's sum
    for (p, r, _) in samples:  # one prefill per trace under the stage-2 mask (= compaction)
        full = tok.prompt_ids(p.prompt) + tok.encode(r)
        ids = torch.tensor([full])
        logits = model(ids, mask_from=build_mask_from(ids, fmt, MementoConfig(0)))[0]
        pred = logits.argmax(-1)
        for q in memento_positions(full, fmt):  # a memento counts if every digit of its sum is right
            hit += all(int(pred[j - 1]) == full[j] for j in range(q - width + 1, q + 1))
            tot += 1
    return {"task_accuracy": ok / n, "task_n": n, "memento_sum_accuracy": hit / max(1, tot)}


# ----------------------------------------------------------------------------- main

# Per design: the cumulative task (a 3-digit addition that reads the previous memento) needs
# far more training than the restate task before the 4-layer model solves it: with the restate
# recipe (400 + 300 steps) it wrote no correct trace.
DEFAULTS = {"restate": {"train_examples": 4000, "stage1_steps": 400, "stage2_steps": 300, "snapshot_every": 150, "n": 3000},
            "cumulative": {"train_examples": 40000, "stage1_steps": 5000, "stage2_steps": 450, "snapshot_every": 150,
                           "n": 6000}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--design", choices=digits.DESIGNS, default="restate",
                    help="restate: each block restates the running sum (mementos never need each other); "
                         "cumulative: mementos state the sum of all digits so far (each needs the previous one)")
    ap.add_argument("--work-dir", default=None, help="data and checkpoints (outside the repo; default /tmp/memento_probe[_DESIGN])")
    ap.add_argument("--reuse", action="store_true", help="skip each training stage whose final checkpoint in --work-dir came from the same data and arguments")
    ap.add_argument("--train-examples", type=int, default=None, help="training traces (default: see DEFAULTS)")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--stage1-steps", type=int, default=None)
    ap.add_argument("--stage2-steps", type=int, default=None)
    ap.add_argument("--stage2-lr", type=float, default=1e-3)
    ap.add_argument("--snapshot-every", type=int, default=None, help="steps between stage-2 snapshots")
    ap.add_argument("--n", type=int, default=None, help="probe sequences (fresh random passcodes)")
    ap.add_argument("--features", choices=sorted(FEATURE_TOKENS), default="memento",
                    help="memento tokens whose K/V are probed (see the module docstring)")
    ap.add_argument("--max-k", type=int, default=7, help="largest distance k for M(2+k)")
    ap.add_argument("--attention-n", type=int, default=200, help="sequences for the M3 -> M2 attention mass")
    ap.add_argument("--task-n", type=int, default=100, help="problems per checkpoint for task accuracy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON results (default experiments/results/probe_kv[_DESIGN].json)")
    ap.add_argument("--plots", default=None, help="directory for the PNGs ('' = none; default: results, restate design only)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for k, v in DEFAULTS[args.design].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    suffix = "" if args.design == "restate" else f"_{args.design}"
    args.work_dir = args.work_dir or f"/tmp/memento_probe{suffix}"
    args.out = str(RESULTS / f"probe_kv{suffix}.json") if args.out is None else args.out
    args.plots = (str(RESULTS) if args.design == "restate" else "") if args.plots is None else args.plots
    return args


def main(argv=None) -> dict:
    """Run the whole protocol; returns the JSON dict (also written to --out)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_info = train_toy(args, work)
    log = lambda *a: print(f"[{time.perf_counter() - t0:6.0f} s]", *a, file=sys.stderr, flush=True)  # noqa: E731
    log("trained", train_info)
    rng = random.Random(f"probe:{args.seed}")
    samples = [digits.sample(rng, design=args.design) for _ in range(args.n)]
    prompts = [p.prompt for p, _, _ in samples]
    responses = [r for _, r, _ in samples]
    Y = np.array([d[PASSCODE_BLOCK - 1] for _, _, d in samples])
    split = label_unique_split(Y, seed=args.seed)
    M = [1, 2] + [2 + k for k in range(1, args.max_k + 1)]

    model, tok = load_checkpoint(str(work / "stage2"), "stage2", "probe_kv.py")
    L = model.config.num_hidden_layers
    probes = []
    final_normal = None
    for mode in ("normal", "restart"):
        F = memento_kv(model, tok, prompts, responses, restart=mode == "restart", features=args.features)
        final_normal = F if mode == "normal" else final_normal
        log(f"features {mode}: {F.shape}")
        for m in M:
            layers = list(range(L)) + ["all"] if m <= 3 else [L - 1, "all"]
            for l in layers:
                X = F[:, m - 1].reshape(len(F), -1) if l == "all" else F[:, m - 1, l]
                r = train_probe(X, Y, split, seed=args.seed)
                probes.append({"mode": mode, "memento": m, "k": m - 2, "layer": l, **r})
                log(f"{mode} M{m} layer {l}: test {r['test_acc']:.3f} (val {r['val_acc']:.3f}, {r['epochs']} ep)")

    # the direct probe: T2's own tokens (their K/V are the same in both modes: the block's
    # tokens were computed with the block visible), an upper bound for the memento probes
    FB = memento_kv(model, tok, prompts, responses, restart=False, features="block")[:, PASSCODE_BLOCK - 1]
    direct = []
    for l in list(range(L)) + ["all"]:
        r = train_probe(FB.reshape(len(FB), -1) if l == "all" else FB[:, l], Y, split, seed=args.seed)
        direct.append({"layer": l, **r})
        log(f"direct T{PASSCODE_BLOCK} layer {l}: test {r['test_acc']:.3f}")
    del FB
    # does a memento read the previous one? attention of M3's tokens on M2's, normal mode
    attn = attention_mass(model, tok, prompts[:args.attention_n], responses[:args.attention_n])
    log(f"attention M3 -> M2 per layer: {attn}")

    checkpoints = []
    snaps = run_checkpoints(work / "stage2")
    for name, path, step in [("stage1", work / "stage1", 0)] + [(f"step{int(s.name[5:])}", s, int(s.name[5:])) for s in snaps]:
        cm, ctok = load_checkpoint(str(path), name, "probe_kv.py")
        # the last snapshot holds the final stage-2 weights: its features are already computed
        last = step == train_info["stage2"]["steps"]
        F = final_normal if last else memento_kv(cm, ctok, prompts, responses, restart=False, features=args.features)
        row = {"name": name, "step": step, **task_metrics(cm, ctok, args.task_n, args.seed, args.design)}
        for m in (2, 3):
            row[f"probe_M{m}_all"] = train_probe(F[:, m - 1].reshape(len(F), -1), Y, split, seed=args.seed)["test_acc"]
        checkpoints.append(row)
        log("checkpoint", row)

    out = {"experiment": "probe_kv", "config": {k: _relative(v) if k in ("out", "plots", "work_dir") else v
                                                for k, v in vars(args).items() if k not in ("json",)},
           "model": {"layers": L, "hidden": model.config.hidden_size, "heads": model.config.num_attention_heads,
                     "kv_heads": model.config.num_key_value_heads, "head_dim": model.config.head_dim,
                     "features": args.features,
                     "features_per_layer": int(2 * FEATURE_TOKENS[args.features] * model.config.num_key_value_heads
                                               * model.config.head_dim)},
           "train": train_info, "text_only_bayes_digit_accuracy": digits.text_only_digit_accuracy(design=args.design),
           "chance": 0.1, "split_sizes": [len(s) for s in split], "probes": probes, "direct_probe": direct,
           "attention_m3_on_m2": attn, "checkpoints": checkpoints,
           "machine": machine_info(), "wall_seconds": time.perf_counter() - t0}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if args.plots:
        plot(out, Path(args.plots))
    if args.json:
        print(json.dumps(out, indent=1))
    return out


def plot(res: dict, outdir: Path) -> None:
    """probe_layers.png, probe_distance.png, probe_checkpoints.png from a result dict."""
    plt = pyplot("probe_kv.py")
    if plt is None:
        return

    outdir.mkdir(parents=True, exist_ok=True)
    P = res["probes"]
    L = res["model"]["layers"]
    get = lambda mode, m, l: next((p["test_acc"] for p in P if p["mode"] == mode and p["memento"] == m and p["layer"] == l), None)  # noqa: E731
    xs = list(range(L)) + ["all"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for m, c in ((1, "tab:gray"), (2, "tab:blue"), (3, "tab:orange")):
        for mode, ls in (("normal", "-"), ("restart", "--")):
            ax.plot(range(len(xs)), [get(mode, m, l) for l in xs], ls, marker="o", color=c, label=f"M{m} {mode}")
    ax.axhline(res["chance"], color="k", lw=0.8, ls=":", label="chance")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(f"layer (K and V of the memento tokens: --features {res['model']['features']})")
    ax.set_ylabel("passcode digit accuracy (test)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(outdir / "probe_layers.png", dpi=110)
    plt.close(fig)

    ks = sorted({p["k"] for p in P if p["k"] >= 0})
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for mode, ls in (("normal", "-"), ("restart", "--")):
        for l, c in (("all", "tab:blue"), (L - 1, "tab:green")):
            ax.plot(ks, [get(mode, k + 2, l) for k in ks], ls, marker="o", color=c, label=f"{mode}, layer {l}")
    ax.axhline(res["chance"], color="k", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("k (probe on memento M(2+k); k=0 saw the passcode block)")
    ax.set_ylabel("passcode digit accuracy (test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(outdir / "probe_distance.png", dpi=110)
    plt.close(fig)

    C = res["checkpoints"]
    if C:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        x = range(len(C))
        for key, lab in (("probe_M2_all", "probe M2 (all layers)"), ("probe_M3_all", "probe M3 (all layers)"),
                         ("task_accuracy", "task accuracy"), ("memento_sum_accuracy", "memento sum accuracy (forced)")):
            ax.plot(x, [c[key] for c in C], marker="o", label=lab)
        ax.axhline(res["chance"], color="k", lw=0.8, ls=":", label="chance")
        ax.set_xticks(list(x), [c["name"] for c in C], fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("checkpoint (stage1 = end of stage 1; stepN = stage-2 step N)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(outdir / "probe_checkpoints.png", dpi=110)
        plt.close(fig)


def _relative(path: str) -> str:
    """A path as the results file stores it: relative to the repository when inside it, so no
    machine's directory layout is committed."""
    if not path:
        return path
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else path


if __name__ == "__main__":
    main()
