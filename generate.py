"""Generate with block masking and a compacting KV cache (paper §6.1, §6.2.1, §A.3).

    python generate.py --prompt "..." [--checkpoint DIR|hub-id]
    python generate.py --replay traces.jsonl --json

The loop is the whole method at inference: prefill the prompt once, then one token at a
time: pick the token (sample, or take it from a trace when replaying), let the block tracker
read it, evict whatever the token's arrival masks (before feeding it, as the engine does
when <|summary_end|> is sampled), feed it, and count the cache. --restart additionally
recomputes each memento's K/V without its block (the implicit-channel ablation, §6.2.1);
--no-compaction keeps every token (the full-cache baseline).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cli import ArgumentParser, check_device, nonnegative_int, positive_int
from kv_cache import EMPTY, KVCache
from memento_attention import NEVER, BlockTracker, MementoConfig, MementoTokens

DEFAULT_CHECKPOINT = "out/stage2"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class SampleConfig:
    """Sampling (the paper's evaluation defaults, §6.1): temperature 0 means greedy."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20


def generation_config(tok, model_config, base: dict | None = None) -> dict:
    """generation_config.json for a checkpoint (paper §6.1 sampling): `base` (what the checkpoint
    it came from had) with this module's sampling defaults and the tokenizer's stop tokens, so
    that transformers' generate() samples as generate.py does."""
    sc = SampleConfig()
    out = dict(base or {})
    out.update(do_sample=True, temperature=sc.temperature, top_p=sc.top_p, top_k=sc.top_k,
               eos_token_id=[tok.special_ids[s] for s in STOP_TOKENS if s in tok.special_ids])
    if "<|endoftext|>" in tok.special_ids:
        out.setdefault("pad_token_id", tok.special_ids["<|endoftext|>"])
    if model_config.bos_token_id is not None:
        out["bos_token_id"] = model_config.bos_token_id
    return out


def sample(logits: torch.Tensor, sc: SampleConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row (paper §6.1 sampling): temperature, then top-k, then top-p (nucleus).

    Args:
        logits: [B, V] float logits on any device.
        sc: temperature (<= 0: greedy argmax, no randomness drawn), top_k (0: all tokens),
            top_p (1.0: no nucleus cut).
        gen: a CPU torch.Generator, or None for torch's global CPU generator.
    Returns:
        [B] int64 token ids on logits' device.

    Seed semantics, the same on every device: each call draws exactly one uniform number
    u ~ U[0, 1) per row from `gen` on the CPU; the token is the first candidate, in
    descending probability, at which the cumulative filtered probability exceeds u times
    their total (inverse-CDF sampling, done on logits' device). The same seed and logits
    therefore give the same tokens on CPU and CUDA (up to float rounding of the logits
    themselves), and a CUDA run never needs a CUDA generator.
    """
    if sc.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / sc.temperature
    V = logits.shape[-1]
    if 0 < sc.top_k < V:
        cand, idx = torch.topk(logits, sc.top_k, dim=-1)  # sorted, largest first
    else:
        cand, idx = logits.sort(-1, descending=True)
    probs = torch.softmax(cand, -1)
    if sc.top_p < 1.0:
        drop = probs.cumsum(-1) - probs > sc.top_p  # keep the smallest prefix reaching top_p
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=gen).to(logits.device)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # u * total can round up to the total itself: fall back to the last kept candidate.
    choice = torch.minimum(choice, (probs > 0).sum(-1, keepdim=True) - 1)
    return idx.gather(-1, choice).squeeze(-1)


@dataclass
class Sequence:
    """One sequence's state and results. kv_curve: cache tokens after each token."""

    prompt: list[int]
    forced: list[int] | None = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    stop_reason: str = ""
    logits: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], cfg: MementoConfig, *, compaction: bool = True,
             restart: bool = False, max_new_tokens: int = 1024, max_block_tokens: int | None = None,
             sampling: SampleConfig = SampleConfig(), seed: int | None = None,
             forced: list[list[int]] | None = None, replay_chunk: int = 1, prefill_chunk: int = 2048,
             keep_logits: bool = False, on_token=None):
    """Prefill B prompts, then decode them together through one compacting KVCache.

    Args:
        model: a model.Qwen3. tok: a tokenizer.Tokenizer with the memento tokens.
        prompts: B lists of token ids (each already in ChatML, see Tokenizer.chat_prompt).
        cfg: the masking options (memento_attention.MementoConfig).
        compaction: False keeps every token (full-cache baseline; the mask is not applied).
        restart: restart mode (§6.2.1): at each memento's end evict its block with the
            delimiters, and recompute the memento tokens' K/V at the same positions.
            Needs keep_last_n_blocks == 0 without keep_last_block_for_answer.
        max_new_tokens: response tokens per sequence. max_block_tokens: force
            <|block_end|> once an open block holds this many tokens (§5).
        forced: B lists of response ids to teacher-force instead of sampling (replay).
        replay_chunk: with `forced`, feed up to this many tokens per forward (chunks never
            cross a position where a mask starts, so the result is the same as 1; it only
            trades memory for speed). Sampling always decodes one token at a time.
        prefill_chunk: prompt positions per forward (chunked prefill, as vLLM's
            --max-num-batched-tokens bounds a step): attention memory is O(chunk x cache)
            and logits are computed only for the last prompt token of each row, so a 40K
            prompt never builds a 40K x 40K score matrix or 40K rows of logits. Exact for
            any value >= 1.
        keep_logits: store each position's logits [V] (float32) in Sequence.logits
            (prompt positions included), for tests.
        on_token: callback(row, token_id, kind) per decoded token; kind is one of
            "block", "memento", "delimiter", "text".
    Returns:
        (list[Sequence], KVCache): the sequences and the cache with its counters.
    Raises:
        ValueError for a prompt at or beyond max_position_embeddings, or restart with
        options it does not define.
    """
    if restart and (cfg.keep_last_n_blocks != 0 or cfg.keep_last_block_for_answer):
        raise ValueError("--restart is defined for keep_last_n_blocks=0 without keep_last_block_for_answer")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    max_pos = model.config.max_position_embeddings
    for p in prompts:
        if not p:
            raise ValueError("an empty prompt has no last token to continue from; give at least one token")
        if len(p) >= max_pos:
            raise ValueError(f"prompt of {len(p)} tokens does not fit max_position_embeddings={max_pos}; shorten it")
    T = MementoTokens.from_tokenizer(tok)
    stop_ids = {tok.special_ids[s] for s in STOP_TOKENS if s in tok.special_ids}
    gen = torch.Generator().manual_seed(seed) if seed is not None else None  # CPU: see sample()
    B = len(prompts)
    seqs = [Sequence(p, None if forced is None else forced[i]) for i, p in enumerate(prompts)]
    trackers = [BlockTracker(T, cfg) for _ in range(B)]
    cache = KVCache(model.config, B, dtype, device)

    # ---- prefill: right-padded, padding slots are EMPTY (seen by nobody). The prompt goes in
    # chunks of positions; each chunk attends to the cache (itself included) under the stored
    # mask_from, and every key whose mask has started by the next position is evicted.
    lens = [len(p) for p in prompts]
    Tp = max(lens)
    ids = torch.zeros(B, Tp, dtype=torch.int64)
    mask_from = torch.full((B, Tp), EMPTY, dtype=torch.int64)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.tensor(p)
        mask_from[r, :len(p)] = NEVER
        for i, t in enumerate(p):
            for b in trackers[r].step(t):
                if compaction:
                    lo, hi = b.span(cfg.mask_delimiters)
                    mask_from[r, lo:hi + 1].clamp_(max=i)  # earliest start wins (nested blocks)
        cache.curve[r].extend(_visible_counts(mask_from[r, :len(p)]))
    last = torch.empty(B, model.config.vocab_size, device=device)
    for c0 in range(0, Tp, prefill_chunk):
        c1 = min(Tp, c0 + prefill_chunk)
        positions = torch.arange(c0, c1).expand(B, c1 - c0)
        h = model.hidden_states(ids[:, c0:c1].to(device), positions.to(device), mask_from[:, c0:c1].to(device), cache)
        if keep_logits:
            for r, n in enumerate(lens):
                seqs[r].logits.extend(model.logits(h[r, :max(0, min(n, c1) - c0)]).cpu())
        _last_logits(model, h, last, {r: n - 1 - c0 for r, n in enumerate(lens) if c0 < n <= c1})
        cache.evict_masked(torch.tensor([min(n, c1) for n in lens], device=device))

    # ---- decode. Sampling feeds one token per live row per step. Teacher forcing feeds up to
    # `replay_chunk` tokens at once, cut so that a chunk never crosses a position where a mask
    # starts: evictions still happen exactly before the token that triggers them.
    starts = [_mask_events(s.prompt + s.forced, T, cfg) if forced is not None else set() for s in seqs]
    vocab = tok.n_vocab
    while True:
        live = [not s.done for s in seqs]
        if not any(live):
            break
        if forced is None:
            last[:, vocab:] = float("-inf")  # the embedding may be padded beyond the tokenizer
            sampled = sample(last, sampling, gen).cpu()
        chunks = []
        for r, s in enumerate(seqs):
            if s.done:
                chunks.append([])
                continue
            p = len(s.prompt) + len(s.tokens)
            if forced is not None:
                k = len(s.tokens)
                n = 1
                while n < replay_chunk and k + n < len(s.forced) and p + n not in starts[r]:
                    n += 1
                chunk = s.forced[k:k + n]
            else:
                chunk = [int(sampled[r])]
                ob = trackers[r].open_block_start
                if max_block_tokens and ob is not None and p - ob - 1 >= max_block_tokens:
                    chunk = [T.block_end]
            for t in chunk:
                kind = _kind(trackers[r], t, T)
                for b in trackers[r].step(t):
                    if not compaction:
                        continue
                    if restart:
                        _restart_memento(model, cache, r, b, s, device)
                    else:
                        cache.evict(r, *b.span(cfg.mask_delimiters))
                s.tokens.append(t)
                if on_token:
                    on_token(r, t, kind)
            if forced is None and chunk[-1] in stop_ids:
                s.done, s.stop_reason = True, "stop token"
                chunk = []
            chunks.append(chunk)
        n_new = [len(c) for c in chunks]
        W = max(n_new)
        if W == 0:
            continue
        ids = torch.zeros(B, W, dtype=torch.int64)
        pos = torch.zeros(B, W, dtype=torch.int64)
        mf = torch.full((B, W), EMPTY, dtype=torch.int64)
        for r, c in enumerate(chunks):
            p0 = len(seqs[r].prompt) + len(seqs[r].tokens) - len(c)
            ids[r, :len(c)] = torch.tensor(c, dtype=torch.int64)
            pos[r, :len(c)] = torch.arange(p0, p0 + len(c))
            mf[r, :len(c)] = NEVER
        h = model.hidden_states(ids.to(device), pos.to(device), mf.to(device), cache)
        for layer in cache.layers:  # padding slots (rows with shorter or no chunks) go back
            layer.length -= torch.tensor([W - n for n in n_new], device=layer.length.device)
            layer.mask_from[torch.arange(layer.capacity, device=device) >= layer.length[:, None]] = EMPTY
        cache.record(n_new, active=[n > 0 for n in n_new])
        _last_logits(model, h, last, {r: n - 1 for r, n in enumerate(n_new) if n})
        for r, s in enumerate(seqs):
            if n_new[r] == 0:
                continue
            if keep_logits:
                s.logits.extend(model.logits(h[r, :n_new[r]]).cpu())
            p = len(s.prompt) + len(s.tokens)
            if forced is not None and len(s.tokens) == len(s.forced):
                s.done, s.stop_reason = True, "end of trace"
            elif len(s.tokens) >= max_new_tokens:
                s.done, s.stop_reason = True, "max_new_tokens"
            elif p >= max_pos:
                s.done, s.stop_reason = True, "max_position_embeddings"
    return seqs, cache


def _last_logits(model, h: torch.Tensor, last: torch.Tensor, where: dict[int, int]) -> None:
    """last[r] = logits at h[r, where[r]] for each row r in `where`, in one lm_head call."""
    if where:
        rows = list(where)
        last[rows] = model.logits(h[rows, [where[r] for r in rows]])


def _visible_counts(mask_from: torch.Tensor) -> list[int]:
    """§A.3.1 count for a prefilled prompt of n tokens: keys j <= i with mask_from[j] > i, for
    each i, in O(n) (mask_from [n] int; a key hidden from i on satisfies j < mask_from[j] <= i)."""
    n = mask_from.shape[0]
    hidden_from = mask_from[mask_from < n]
    hidden = torch.bincount(hidden_from, minlength=n).cumsum(0)
    return (torch.arange(1, n + 1) - hidden).tolist()


def _mask_events(ids: list[int], T: MementoTokens, cfg: MementoConfig) -> set[int]:
    """Positions at which some mask starts (a teacher-forced chunk must begin there)."""
    tr = BlockTracker(T, cfg)
    return {p for p, t in enumerate(ids) if tr.step(t)}


def _restart_memento(model, cache: KVCache, row: int, b, seq: Sequence, device) -> None:
    """§6.2.1: drop block b with its delimiters, then recompute the K/V of every token
    between <|block_end|> and <|summary_end|> (the memento and any whitespace before
    <|summary_start|>) at their own logical positions against what remains, so they no
    longer carry the block. The memento text is unchanged."""
    sub = cache.row_copy(row)
    sub.evict(0, b.s, b.z - 1)
    full = seq.prompt + seq.tokens
    ids = torch.tensor([full[b.e + 1:b.z]], device=device)
    pos = torch.arange(b.e + 1, b.z, device=device)[None]
    model.hidden_states(ids, pos, None, sub)
    cache.write_row(row, sub)


def _kind(tracker: BlockTracker, t: int, T: MementoTokens) -> str:
    if t in (T.block_start, T.block_end, T.summary_start, T.summary_end):
        return "delimiter"
    if tracker.summarizing is not None:
        return "memento"
    if tracker.open_blocks:
        return "block"
    return "text"


def kv_summary(seq: Sequence, curve: list[int], bytes_per_token: int, tracker_blocks: int) -> dict:
    """The §A.3.1 figures for one sequence: KV tokens after each step, peak, AUC, bytes,
    and the same for a full cache (every token kept: i + 1 after token i)."""
    n = len(seq.prompt) + len(seq.tokens)
    return {
        "tokens": len(seq.tokens),
        "prompt_tokens": len(seq.prompt),
        "blocks_completed": tracker_blocks,
        "peak_kv_tokens": max(curve) if curve else 0,
        "final_kv_tokens": curve[-1] if curve else 0,
        "kv_auc": sum(curve),
        "peak_kv_bytes": (max(curve) if curve else 0) * bytes_per_token,
        "full_cache_peak_kv_tokens": n,
        "full_cache_kv_auc": n * (n + 1) // 2,
        "full_cache_peak_kv_bytes": n * bytes_per_token,
        "bytes_per_token": bytes_per_token,
        "stop_reason": seq.stop_reason,
        "kv_curve": curve,
    }


# ----------------------------------------------------------------------------- command line

STYLE = {"block": "\033[2m", "memento": "\033[1;36m", "delimiter": "\033[33m", "text": ""}
RESET = "\033[0m"


def load(checkpoint: str, device: str, dtype: torch.dtype):
    """Model and tokenizer from a checkpoint dir, training run or hub id; exits with one line
    if missing, incomplete or not a Qwen3 with the memento tokens."""
    from checkpoint import resolve_checkpoint
    from model import Qwen3
    from tokenizer import Tokenizer

    try:
        if checkpoint == DEFAULT_CHECKPOINT and not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"{checkpoint} does not exist")
        path = resolve_checkpoint(checkpoint)
        model = Qwen3.from_pretrained(path, dtype=dtype, device=device).eval()
        tok = Tokenizer.from_dir(path)
        MementoTokens.from_tokenizer(tok)
    except (FileNotFoundError, ValueError, KeyError) as e:
        hint = " (train one with `python train_sft.py --stage 1` then `--stage 2`)" if checkpoint == DEFAULT_CHECKPOINT else ""
        sys.exit(f"generate.py: cannot load --checkpoint: {str(e).strip(chr(34))}{hint}")
    return model, tok


def read_replay(path: str, tok) -> list[tuple[int, dict]]:
    """(line number, record) for each usable line of an OpenMementos .jsonl; bad lines are
    reported on stderr with their number and skipped."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        sys.exit(f"generate.py: cannot read --replay file: {e}")
    except UnicodeDecodeError:
        sys.exit(f"generate.py: --replay {path}: not a UTF-8 text file; expected OpenMementos JSON lines")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"{path}:{i}: not JSON ({e.msg}); skipped", file=sys.stderr)
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("response"), str):
            print(f"{path}:{i}: no 'response' string; skipped", file=sys.stderr)
            continue
        out.append((i, rec))
    return out


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


def _probability(text: str) -> float:
    import argparse

    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range: use a number in (0, 1]")
    return x


def _temperature(text: str) -> float:
    import argparse

    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: use a number >= 0 (0 = greedy)")
    return x


def main(argv=None):
    ap = ArgumentParser(prog="generate.py", description=__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the user message (ChatML is applied); the embedded task's prompts are "
                                      "'sum N blocks from S' with N 3-6 and S 0-9")
    src.add_argument("--replay", metavar="FILE.jsonl", help="teacher-force OpenMementos traces (problem, response)")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint dir, training run dir or hub id")
    ap.add_argument("--keep-last-n-blocks", type=int, default=0, help="-1 never mask, 0 mask at the memento's end, N keep N")
    ap.add_argument("--mask-delimiters", action="store_true", help="also evict a block's delimiters")
    ap.add_argument("--keep-last-block-for-answer", action="store_true", help="the last block stays for the answer")
    ap.add_argument("--max-block-tokens", type=positive_int, default=None, help="force <|block_end|> at this block length")
    ap.add_argument("--max-new-tokens", type=positive_int, default=2048, help="response tokens per sequence")
    ap.add_argument("--restart", action="store_true", help="restart mode: recompute mementos without their block")
    ap.add_argument("--no-compaction", action="store_true", help="full KV cache (baseline)")
    ap.add_argument("--temperature", type=_temperature, default=0.6, help="0 = greedy")
    ap.add_argument("--top-p", type=_probability, default=0.95, help="nucleus mass kept")
    ap.add_argument("--top-k", type=nonnegative_int, default=20, help="candidates kept (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (the same tokens on CPU and CUDA)")
    ap.add_argument("--replay-chunk", type=positive_int, default=256,
                    help="teacher-forced tokens per forward in --replay (exact; memory vs speed)")
    ap.add_argument("--prefill-chunk", type=positive_int, default=2048,
                    help="prompt tokens per forward (chunked prefill, cf. vLLM --max-num-batched-tokens; exact; memory vs speed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    default="bfloat16" if torch.cuda.is_available() else "float32", help="weights and KV cache dtype")
    ap.add_argument("--json", action="store_true", help="one JSON object per sequence on stdout")
    ap.add_argument("--plot", metavar="FILE.png", help="write the KV sawtooth (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.prompt is None and args.replay is None:
        ap.error("give --prompt TEXT or --replay FILE.jsonl")
    if args.restart and args.no_compaction:
        ap.error("--restart needs compaction (it recomputes mementos after their block is evicted); drop --no-compaction")
    try:
        cfg = MementoConfig(args.keep_last_n_blocks, args.mask_delimiters, args.keep_last_block_for_answer)
    except ValueError as e:
        ap.error(f"--keep-last-n-blocks: {e}")
    if args.restart and (cfg.keep_last_n_blocks != 0 or cfg.keep_last_block_for_answer):
        ap.error("--restart is defined for --keep-last-n-blocks 0 without --keep-last-block-for-answer")
    args.device = check_device(ap, args.device)
    model, tok = load(args.checkpoint, args.device, getattr(torch, args.dtype))
    sc = SampleConfig(args.temperature, args.top_p, args.top_k)
    kw = dict(compaction=not args.no_compaction, restart=args.restart, max_block_tokens=args.max_block_tokens, seed=args.seed)
    if args.replay:
        jobs = [(f"{args.replay}:{i}", tok.chat_prompt(str(rec.get("problem", ""))), tok.encode(rec["response"]), rec)
                for i, rec in read_replay(args.replay, tok)]
        if not jobs:
            sys.exit("generate.py: no usable trace in the replay file")
    else:
        jobs = [("prompt", tok.chat_prompt(args.prompt), None, None)]
    stream = not args.json and args.prompt is not None
    color = stream and sys.stdout.isatty()
    curves = []
    for name, prompt_text, forced, rec in jobs:
        prompt = tok.encode(prompt_text)
        if forced is not None:
            over = len(prompt) + len(forced) - model.config.max_position_embeddings
            if over > 0:
                print(f"{name}: trace is {over} tokens longer than max_position_embeddings; truncated", file=sys.stderr)
                forced = forced[:len(forced) - over]

        def show(r, t, kind):
            piece = tok.decode_bytes([t]).decode("utf-8", errors="replace")
            sys.stdout.write(f"{STYLE[kind]}{piece}{RESET}" if color and STYLE[kind] else piece)
            sys.stdout.flush()

        try:
            seqs, cache = generate(model, tok, [prompt], cfg, max_new_tokens=len(forced) if forced else args.max_new_tokens,
                                   replay_chunk=args.replay_chunk, prefill_chunk=args.prefill_chunk,
                                   sampling=sc, forced=None if forced is None else [forced],
                                   on_token=show if stream else None, **kw)
        except ValueError as e:
            sys.exit(f"generate.py: {e}")
        s = seqs[0]
        tracker = BlockTracker(MementoTokens.from_tokenizer(tok), cfg)
        for t in s.prompt + s.tokens:
            tracker.step(t)
        summary = kv_summary(s, cache.curve[0], cache.bytes_per_token, len(tracker.completed))
        curves.append((name, summary["kv_curve"]))
        text = tok.decode(s.tokens)
        verdict = _task_verdict(args.prompt, text) if args.prompt else None
        if args.json:
            out = {"name": name, **summary, "token_ids": s.prompt + s.tokens,
                   "special_token_ids": dict(tok.special_ids), "restart": args.restart,
                   "compaction": not args.no_compaction}
            if args.prompt is not None:
                out["text"] = text
            if verdict is not None:
                out["task_check"] = verdict
            print(json.dumps(out))
        else:
            if stream:
                print()
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
    try:
        from data.toy_task import check_trace, parse_prompt
    except ImportError:
        return None
    spec = parse_prompt(prompt)
    return None if spec is None else check_trace(spec, text)


if __name__ == "__main__":
    main()
