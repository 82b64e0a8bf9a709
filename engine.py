"""The serving loop: continuous batching over a paged, compacting KV cache (paper §6.1, §6.2.1).

Requests wait in a queue and run in a set, as in vLLM V1. Every step is scheduled from a token
budget (`max_num_batched_tokens`): first each running sequence gets its work in the order it
was admitted (one token for a sequence that is decoding, a chunk for one that is still being
prefilled), with the pages it needs; when the pool is short, the most recently admitted
sequence is preempted. Then waiting requests are admitted with what is left, while the pool
holds their prefill's footprint plus a watermark. All scheduled tokens run in as few model
forwards as padding allows; a long prompt is spread over several steps while the others keep
decoding. After the forwards, every sequence whose tokens are all fed samples its next token;
one that sampled a stop token or reached its length finishes at once, before it asks for a slot.

The mechanism (§6.1): before a token is fed, the block tracker reads it and whatever its
arrival masks is evicted from the cache (the official engine evicts as soon as
<|summary_end|> is sampled); in restart mode (§6.2.1) the block goes with its delimiters and
the memento's tokens are fed again, at their own positions, without it. A chunk never crosses
a position where a mask starts, so the cache holds only visible tokens and plain causal
attention over it is exact. A preempted sequence frees its pages and waits first in line with
what it generated; re-admitted, its whole token stream is prefilled again with its block
structure, so blocks evicted before are evicted again, and its footprint is what the cache
will hold then (its compacted peak), not the length of its stream.

    eng = Engine(model, tok, EngineConfig(MementoConfig(0), max_num_seqs=64, kv_cache_tokens=65536))
    seqs = [eng.add(prompt_ids, SamplingParams(max_tokens=512, seed=i)) for i, prompt_ids in enumerate(prompts)]
    eng.run()          # seqs[i].tokens, .curve (KV tokens after each token), .stop_reason, .metrics()

Sampling (paper §6.1 defaults) runs on the device: the token is the inverse CDF of the
request's filtered distribution at one uniform number, a hash of (its seed, the token's
index). A request therefore gets the same tokens whatever else runs beside it, however it is
batched or preempted, on CPU or CUDA.

A step reads nothing back from the device until its tokens are sampled: the scheduler plans
on the host (which slots each token takes, how long each row is), the cache sends that with
the token ids and positions in one copy, and attention reads the pages in place on a GPU
(kv_cache.py). The one sync per step is the sampled tokens coming back.
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from blocks import Block, BlockTracker, MementoConfig, MementoTokens
from checkpoint import resolve_checkpoint
from kv_cache import PagedKVCache, curve_stats, kv_bytes_per_token
from model import Qwen3
from model_runner import (Draw, ModelRunner, RowIn, default_kv_cache_tokens, gpu_kv_budget_bytes,  # noqa: F401
                          local_config)
from sampling import STOP_TOKENS, SamplingParams, request_seed, show
from scheduler import Scheduler
from tokenizer import Tokenizer

log = logging.getLogger("memento.engine")


class Mode(str, enum.Enum):
    """How a request uses its KV cache (paper Table 1, §6.2.1).

    MEMENTO: a block is evicted when its mask starts (keep_last_n_blocks decides when).
    FULL: nothing is evicted (the vanilla full-cache baseline on the same weights).
    RESTART: memento, and each memento's K/V are recomputed without its block (the ablation).
    """

    MEMENTO = "memento"
    FULL = "full"
    RESTART = "restart"


def check_mode(mode, masking: MementoConfig) -> Mode:
    """The Mode named by `mode` (a Mode or its value), checked against the masking options.
    Raises ValueError for an unknown name, or restart mode where it is undefined (§6.2.1: it
    recomputes a memento right after its block is evicted, so keep_last_n_blocks must be 0
    without keep_last_block_for_answer)."""
    try:
        mode = Mode(mode)
    except ValueError:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(m.value for m in Mode)}") from None
    if mode is Mode.RESTART and (masking.keep_last_n_blocks != 0 or masking.keep_last_block_for_answer):
        raise ValueError("restart mode is defined for keep_last_n_blocks=0 without keep_last_block_for_answer")
    return mode


@dataclass(frozen=True)
class EngineConfig:
    """Every option of the engine, checked once here (paper §6.1; vLLM's names where they exist).

    masking: the block-masking options (MementoConfig, the official engine's names).
    mode: the default Mode of a request (Engine.add may choose another per request).
    sampling: the default SamplingParams of a request.
    max_block_tokens: force <|block_end|> once an open block holds this many tokens (§5).
    max_num_seqs: sequences running at once.
    max_num_batched_tokens: tokens per step, decode and prefill together (>= max_num_seqs,
        so that every running sequence gets a token each step).
    replay_chunk: teacher-forced response tokens per sequence per step (exact for any value).
    page_size: token slots per KV page.
    kv_cache_dtype: the pool's dtype (vLLM's name); None ("auto"): the parameters' dtype. A
        model computing in bf16 under autocast over fp32 weights (RL on CUDA) stores bf16.
    kv_cache_tokens: the KV pool in tokens; None: the default budget (default_kv_cache_tokens:
        on CUDA gpu_memory_utilization of the device, on the CPU cpu_kv_cache_gib).
    unbounded_kv_cache: no budget at all; the pool grows as needed (never preempts).
    gpu_memory_utilization: share of the device's memory the engine may use (vLLM's name).
    cpu_kv_cache_gib: the default KV budget on the CPU, GiB (vLLM's CPU backend also uses 4).
    watermark: share of the pool (at least one page) kept free when admitting a request
        while others run, so that running sequences can grow.
    keep_logits: store every position's logits in Sequence.logits (tests).
    keep_cache: do not free a finished sequence's pages (tests read its K/V).
    enforce_eager: no torch.compile and no CUDA graphs (vLLM's meaning).
    compile: run the layers through torch.compile (model.compiled_ops; vLLM's compilation
        mode 0 = False); None: on CUDA unless enforce_eager, off on the CPU.
    cudagraph_mode: "FULL_DECODE_ONLY" records decode steps as CUDA graphs (cuda_graphs.py;
        on CUDA with a bounded pool, a page size the paged kernel takes and keep_logits
        off), "NONE" runs the same bucketed steps eagerly (vLLM's names).
    async_scheduling: plan and launch step n+1 before step n's tokens are read back, when
        that plan cannot depend on them (vLLM's name; see Engine); None: on CUDA only.
    Raises ValueError naming the option for a size < 1, a share out of range, a pool that
    holds no page, a kv_cache_dtype that is not a floating dtype, max_num_batched_tokens <
    max_num_seqs, an unknown cudagraph_mode, or restart mode where undefined.
    """

    masking: MementoConfig = MementoConfig()
    mode: Mode = Mode.MEMENTO
    sampling: SamplingParams = SamplingParams()
    max_block_tokens: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    replay_chunk: int = 1
    page_size: int = 16
    kv_cache_dtype: torch.dtype | None = None
    kv_cache_tokens: int | None = None
    unbounded_kv_cache: bool = False
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 4.0
    watermark: float = 0.01
    keep_logits: bool = False
    keep_cache: bool = False
    enforce_eager: bool = False
    compile: bool | None = None
    cudagraph_mode: str = "FULL_DECODE_ONLY"
    async_scheduling: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "mode", check_mode(self.mode, self.masking))
        sizes = dict(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                     replay_chunk=self.replay_chunk, page_size=self.page_size, kv_cache_tokens=self.kv_cache_tokens,
                     max_block_tokens=self.max_block_tokens)
        bad = [f"{k}={v}" for k, v in sizes.items() if v is not None and v < 1]
        if bad:
            raise ValueError(f"EngineConfig: sizes must be >= 1: {', '.join(bad)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_size:
            raise ValueError(f"EngineConfig: kv_cache_tokens={self.kv_cache_tokens} holds no page of "
                             f"page_size={self.page_size} tokens")
        if self.kv_cache_dtype is not None and not (isinstance(self.kv_cache_dtype, torch.dtype)
                                                    and self.kv_cache_dtype.is_floating_point):
            raise ValueError(f"EngineConfig: kv_cache_dtype={self.kv_cache_dtype!r} must be a floating torch.dtype "
                             "(e.g. torch.bfloat16) or None for the parameters' dtype")
        if self.kv_cache_tokens is not None and self.unbounded_kv_cache:
            raise ValueError("EngineConfig: give kv_cache_tokens or unbounded_kv_cache, not both")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"EngineConfig: max_num_batched_tokens={self.max_num_batched_tokens} is below "
                             f"max_num_seqs={self.max_num_seqs}; every running sequence needs a token per step")
        if self.cudagraph_mode not in ("NONE", "FULL_DECODE_ONLY"):
            raise ValueError(f"EngineConfig: cudagraph_mode={self.cudagraph_mode!r}: use 'NONE' or 'FULL_DECODE_ONLY'")
        if not 0 < self.gpu_memory_utilization <= 1 or not self.cpu_kv_cache_gib > 0 or not 0 <= self.watermark < 1:
            raise ValueError(f"EngineConfig: gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1], "
                             f"cpu_kv_cache_gib={self.cpu_kv_cache_gib} > 0, watermark={self.watermark} in [0, 1)")


# ----------------------------------------------------------------------------- requests


class Held:
    """The logical positions a sequence's cache entry holds, on the host: sorted, disjoint
    [lo, hi] runs (paper §6.1: tokens sit in the cache in position order; a block's eviction
    cuts a run). It turns a block's position range into the indices the cache holds it at, so
    that eviction needs nothing from the device. Raises nothing."""

    def __init__(self):
        self.runs: list[list[int]] = []

    def add(self, start: int, n: int) -> None:
        """Positions start..start+n-1 were appended (after every position held)."""
        if self.runs and self.runs[-1][1] == start - 1:
            self.runs[-1][1] += n
        else:
            self.runs.append([start, start + n - 1])

    def find(self, lo: int, hi: int) -> tuple[int, int]:
        """(index of the first held position >= lo, how many held positions lie in [lo, hi])."""
        first = count = seen = 0
        for a, b in self.runs:
            first += max(0, min(b, lo - 1) - a + 1)
            count += max(0, min(b, hi) - max(a, lo) + 1)
            seen += b - a + 1
        return first, count

    def remove(self, lo: int, hi: int) -> tuple[int, int]:
        """Drop the held positions in [lo, hi]; returns find(lo, hi) as it was."""
        out = self.find(lo, hi)
        runs = []
        for a, b in self.runs:
            if a < lo:
                runs.append([a, min(b, lo - 1)])
            if b > hi:
                runs.append([max(a, hi + 1), b])
        self.runs = runs
        return out


@dataclass
class Sequence:
    """One request: what it asked for, its state while it runs, and its results.

    tokens: the response so far (sampled, or taken from `forced` when replaying). text: the
    decoded response when it finished, cut before a matched stop string. curve: KV tokens held
    after each token of prompt + response was fed (§A.3.1; peak = max, AUC = sum). logits:
    each position's logits [V] (fp32, CPU) with keep_logits. logprobs: per sampled token with
    params.logprobs set (NaN for a token the engine forced); top_logprobs: {id: logprob} per
    token when params.logprobs > 0. Times are time.perf_counter() seconds; see `metrics`.
    """

    id: int
    prompt: list[int]
    params: SamplingParams
    mode: Mode
    forced: list[int] | None = None
    seed: int = 0                                         # its sampling seed (SamplingParams.seed, or drawn)
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    done: bool = False
    stop_reason: str = ""
    curve: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict] = field(default_factory=list)
    preemptions: int = 0
    blocks_completed: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    itl: list[float] = field(default_factory=list)        # seconds between consecutive response tokens
    # running state
    last_token_time: float | None = None
    tracker: BlockTracker | None = None
    held: Held = field(default_factory=lambda: Held())    # positions the cache holds, on the host
    inflight: int = -1                                    # its draw in the step on the device, or -1
    events: set = field(default_factory=set)              # positions where a mask starts
    footprint: int = 0                                    # pages its (re-)prefill will hold at most
    computed: int = 0                                     # positions < computed are in the cache (or evicted)
    out_bytes: bytearray = field(default_factory=bytearray)  # the decoded response, for stop strings
    stop_ids: frozenset = frozenset()                     # params.stop_token_ids, for an O(1) check per token

    @property
    def length(self) -> int:
        """Tokens known: prompt + response."""
        return len(self.prompt) + len(self.tokens)

    @property
    def max_tokens(self) -> int:
        """The response length at which it stops (a replay: its trace's)."""
        return len(self.forced) if self.forced is not None else self.params.max_tokens

    def ids(self, start: int, stop: int) -> list[int]:
        """Token ids at positions start..stop-1 of prompt + response."""
        P = len(self.prompt)
        if stop <= P:
            return self.prompt[start:stop]
        if start >= P:
            return self.tokens[start - P:stop - P]
        return self.prompt[start:] + self.tokens[:stop - P]

    def metrics(self) -> dict:
        """Per-request figures, seconds and KV tokens (§A.3.1): queue time (arrival to first
        scheduled), time to first token, mean / median / max inter-token latency, end-to-end
        latency, preemptions, peak and final KV tokens. None where not reached."""
        def since(t):
            return None if t is None else t - self.arrival_time
        itl = sorted(self.itl)
        kv = curve_stats(self.curve, 0)
        return {"queue_time": since(self.first_scheduled_time), "ttft": since(self.first_token_time),
                "itl_mean": sum(itl) / len(itl) if itl else None, "itl_median": itl[len(itl) // 2] if itl else None,
                "itl_max": itl[-1] if itl else None, "e2e_latency": since(self.finished_time),
                "preemptions": self.preemptions, "peak_kv_tokens": kv["peak_kv_tokens"],
                "final_kv_tokens": kv["final_kv_tokens"]}


def kv_replay(ids: list[int], fmt: MementoTokens, masking: MementoConfig, mode: Mode) -> tuple[set[int], list[int]]:
    """Replay the block tracker over token ids as the engine feeds them (§6.1, §A.3.1).

    Returns (events, curve): the positions at which some mask starts (a chunk must begin there;
    empty in full mode), and the tokens the cache holds after each token is fed. A prefill of
    the first L tokens holds at most max(curve[:L]) whatever its chunking: no chunk crosses an
    event, so within a chunk the count only grows and at its end equals the token-by-token
    count. That peak is what admitting a (preempted) sequence needs, not L.
    """
    if mode is Mode.FULL:  # nothing is ever evicted
        return set(), list(range(1, len(ids) + 1))
    tr = BlockTracker(fmt, masking)
    held = bytearray(len(ids))
    n = 0
    events, curve = set(), []
    for p, t in enumerate(ids):
        blocks = tr.step(t)
        if blocks:
            events.add(p)
            for b in blocks:
                lo, hi = _evicted(b, masking, mode)
                n -= sum(held[lo:hi + 1])
                held[lo:hi + 1] = bytes(hi - lo + 1)
                if mode is Mode.RESTART:  # the memento's tokens come back, recomputed
                    first, last = b.memento()
                    held[first:last + 1] = b"\x01" * (last + 1 - first)
                    n += last + 1 - first
        held[p] = 1
        n += 1
        curve.append(n)
    return events, curve


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Continuous batching over a PagedKVCache with memento compaction (§6.1, §6.2.1).

    Args:
        model: a model.Qwen3 (eval). tok: a tokenizer.Tokenizer with the memento tokens.
        config: EngineConfig (every option; checked there).
        on_token: callback(seq_id, token_id, kind) per response token as it is produced;
            kind is one of "block", "memento", "delimiter", "text".
        on_finish: callback(Sequence) when a request finishes (its curve and stop_reason set).
    The KV budget is logged once (logger "memento.engine") and kept in `kv_cache_note`.

    Three parts: the Scheduler (scheduler.py) decides which sequences run each step; the
    ModelRunner (model_runner.py) does the device work; the Engine joins them, keeps each
    sequence's host state (its tokens, its block tracker, the positions its cache holds) and
    implements the scheduler's Host hooks (plan, pages_to_append, free_pages, start, preempt,
    outgrown, reject, fail, ahead).

    Asynchronous scheduling (config.async_scheduling): a step's sampled tokens are read back
    while the device runs the next step, which was planned without them, when that plan is
    provably the one the synchronous engine would make (Scheduler.run_ahead): nothing waits
    to be admitted, every running sequence decodes its token in flight, the pool holds every
    row's next token even if none ends, and no token in flight can change the step in a way
    the device cannot follow. The one thing a token can change is memento compaction: if it
    completes a memento, its block must be invisible to it. The engine knows, before the
    token is known, which block that would be (BlockTracker.peek) and where the cache holds
    it (Held), so the step hides that range on the device if the token is the memento's end
    (model_runner, the paged kernel's `hide`), and the block is evicted one step later, when
    the host reads the token: the cache then holds what the synchronous engine's holds.
    Steps where that is not possible (restart mode recomputing a memento, a forced
    <|block_end|> near max_block_tokens, a replay, admissions, preemption) run synchronously.
    A token is streamed (on_token) only once read back: a sequence that ended does not stream
    the extra token its next step computed. Tokens, log-probabilities, KV curves and
    preemptions equal the synchronous engine's (tests/test_async.py).

    One request never fails another: an exception while handling one sequence (planning its
    chunk, reading its tokens, sampling its row, its stop check, decoding its text, on_token)
    ends that sequence alone with stop_reason "error: <exception>", frees its pages and calls
    on_finish; its traceback is logged once and `stats["failed"]` counts it; the step goes on
    for the others. An exception raised by on_finish is logged and the sequence stays
    finished. Only what is batch-wide (a model forward, say out of memory) leaves step().
    Raises:
        KeyError if the tokenizer lacks a memento token; ValueError from default_kv_cache_tokens.
    """

    def __init__(self, model, tok, config: EngineConfig = EngineConfig(), *, on_token=None, on_finish=None):
        self.model, self.tok, self.config = model, tok, config
        self.on_token, self.on_finish = on_token, on_finish
        p = next(model.parameters())
        self.device, self.dtype = p.device, config.kv_cache_dtype or p.dtype
        budget = config.kv_cache_tokens
        if config.unbounded_kv_cache:
            self.kv_cache_note = "KV cache: unbounded (grows as needed; nothing is ever preempted)"
        elif budget is None:
            budget, self.kv_cache_note = default_kv_cache_tokens(model, config)
        else:
            self.kv_cache_note = (f"KV cache: {budget:,} tokens = {budget * kv_bytes_per_token(local_config(model), self.dtype) / 2**30:.3g}"
                                  " GiB (as configured)")
        tp = getattr(model, "tensor_parallel", None)
        if tp is not None and tp.size > 1:  # the pool is per process: its share of the KV heads, every token
            c = model.config
            self.kv_cache_note += (f" on each of {tp.size} tensor-parallel processes, which hold "
                                   f"{c.num_key_value_heads // tp.size} of the {c.num_key_value_heads} KV heads each")
        log.info(self.kv_cache_note)
        num_pages = None if budget is None else budget // config.page_size
        self.cache = PagedKVCache(local_config(model), self.dtype, self.device, page_size=config.page_size,
                                  num_pages=num_pages)
        self.format = MementoTokens.from_tokenizer(tok)
        self.eos_ids = frozenset(tok.special_ids[s] for s in STOP_TOKENS if s in tok.special_ids)
        self.vocab = tok.n_vocab
        self.max_pos = model.config.max_position_embeddings
        self.runner = ModelRunner(model, self.cache, config, self.vocab, self.format.block_end)
        self.graphs = self.runner.graphs
        watermark = max(1, int(config.watermark * num_pages)) if num_pages else 0
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, watermark, self)
        asynchronous = config.async_scheduling
        self.asynchronous = (self.device.type == "cuda") if asynchronous is None else asynchronous
        m = config.masking  # the token whose arrival may start a mask (BlockTracker.step)
        self.event_token = self.format.block_start if m.keep_last_block_for_answer else self.format.summary_end
        self.sequences: list[Sequence] = []
        self.inflight = None  # the launched step whose tokens the host has not read: (Sampled, [Sequence])
        # steps: scheduler iterations that ran a forward; forwards: model forwards; tokens: fed tokens;
        # ahead: steps planned before the previous step's tokens were read (asynchronous scheduling);
        # ahead_evictions: blocks hidden on the device in such a step, then evicted
        self.stats = {"steps": 0, "forwards": 0, "tokens": 0, "preemptions": 0, "rejected": 0, "failed": 0,
                      "batch_size_sum": 0, "max_running": 0, "ahead": 0, "ahead_evictions": 0}

    @property
    def waiting(self):
        """Requests waiting to be admitted (the scheduler's queue, first in line first)."""
        return self.scheduler.waiting

    @property
    def running(self):
        """Requests admitted, in admission order (the scheduler's list)."""
        return self.scheduler.running

    @property
    def busy(self) -> bool:
        """Whether step() has work: requests waiting or running, or a step whose tokens are not
        read yet (asynchronous scheduling)."""
        return bool(self.waiting or self.running) or self.inflight is not None

    @property
    def watermark_pages(self) -> int:
        """Pages kept free when admitting while others run (EngineConfig.watermark)."""
        return self.scheduler.watermark_pages

    # ------------------------------------------------------------------------- requests

    def add(self, prompt: list[int], params: SamplingParams | None = None, *, forced: list[int] | None = None,
            mode: Mode | str | None = None) -> Sequence:
        """Queue a request and return its Sequence (filled in by step()/run()).

        prompt: token ids (ChatML applied). params: SamplingParams (None: the engine's; its
        own fields are checked when it is made). forced: a response to teacher-force instead
        of sampling (replay). mode: its Mode (None: the engine's). Everything is checked
        before the engine changes; ValueError, one line naming the field, for: params that
        are not a SamplingParams; an empty prompt; a prompt, forced or stop_token_ids id
        that is not an int in 0..n_vocab-1 of the TOKENIZER (the embedding may have more
        rows, which no text decodes); logprobs above n_vocab; a prompt plus forced response
        or max_tokens beyond max_position_embeddings; restart mode where it is undefined.
        A request whose footprint (§A.3.1 peak of its prefill, or of its whole replay) can
        never fit the KV pool is not queued: it finishes at once, stop_reason naming the figures.
        """
        params = self.config.sampling if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        mode = self.config.mode if mode is None else check_mode(mode, self.config.masking)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("an empty prompt has no last token to continue from; give a list of at least one token id")
        if forced is not None and not isinstance(forced, (list, tuple)):
            raise ValueError(f"forced must be a list of token ids, got {type(forced).__name__}")
        # ids the tokenizer cannot decode would fail this request's text (and used to take the
        # engine down with it): the bound is the tokenizer's, and the embedding's if smaller
        limit = min(self.vocab, self.model.config.vocab_size)
        for name, ids in (("prompt", prompt), ("forced", forced or ()), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limit)), None)
            if bad is not None:
                raise ValueError(f"{name}: token id {show(bad)} is outside the tokenizer's vocabulary (0..{limit - 1})")
        if params.logprobs is not None and params.logprobs > limit:
            raise ValueError(f"logprobs={show(params.logprobs)} is above the vocabulary's {limit} tokens")
        stream = list(prompt) + list(forced or [])
        if forced is None:
            room = self.max_pos - len(prompt)
            if room < 1:
                raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_position_embeddings={self.max_pos}; "
                                 "shorten it")
            if params.max_tokens is None:
                params = replace(params, max_tokens=room)
            elif params.max_tokens > room:
                raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {show(params.max_tokens)} exceeds "
                                 f"max_position_embeddings={self.max_pos}; lower max_tokens to {room} or less")
        elif len(stream) > self.max_pos:
            raise ValueError(f"prompt + forced response = {len(stream)} tokens exceeds max_position_embeddings="
                             f"{self.max_pos}; truncate the trace")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
        s = Sequence(len(self.sequences), list(prompt), params, mode, None if forced is None else list(forced), seed,
                     arrival_time=time.perf_counter(), stop_ids=frozenset(params.stop_token_ids))
        self.sequences.append(s)
        try:
            self._enqueue(s, front=False)
        except Exception as e:  # noqa: BLE001 -- a bug reading this request ends it alone
            self._fail(s, e)
        return s

    @torch.inference_mode()  # freeing pages writes to the pool, which steps made under inference mode
    def abort(self, seq: Sequence | int) -> Sequence:
        """Drop a request, waiting or running, between steps (a client that went away, §6.1
        serving): its pages go back to the pool (unless keep_cache), it finishes with
        stop_reason "abort" and what it generated so far, and on_finish is called. A request
        already finished is left as it is. seq: its Sequence or id. Returns the Sequence.
        Raises KeyError for an id this engine never gave out."""
        s = seq if isinstance(seq, Sequence) else (self.sequences[seq] if 0 <= seq < len(self.sequences) else None)
        if s is None:
            raise KeyError(f"no request with id {seq!r} in this engine")
        if not s.done:
            self._end(s, "abort")
        return s

    def release(self, seq: Sequence) -> None:
        """Forget a finished request, so that a long-running server does not keep every one it
        served (§6.1 serving): its entry in `sequences` becomes None (ids are never reused; the
        caller keeps the Sequence). Raises ValueError for a request still waiting or running."""
        if not seq.done:
            raise ValueError(f"request {seq.id} is still {'waiting' if seq in self.waiting else 'running'}; "
                             "abort it first")
        self.sequences[seq.id] = None

    def run(self, progress: bool = False) -> list[Sequence]:
        """Run until every request finished; returns all sequences in the order added."""
        bar = None
        if progress:
            bar = tqdm(total=len(self.sequences), dynamic_ncols=True, desc="sequences")
        while self.busy:
            self.step()
            if bar is not None:
                st = self.cache.stats()
                bar.n = sum(s.done for s in self.sequences if s is not None)
                bar.set_postfix(running=len(self.running), pool=f"{st['held_pages']}/{st['pages']} pages", refresh=False)
                bar.refresh()
        if bar is not None:
            bar.close()
        return self.sequences

    @torch.inference_mode()  # never autograd: no graph through the KV pool, and less bookkeeping per op than no_grad
    def step(self) -> None:
        """One scheduler iteration: schedule running sequences, then admit waiting ones, run
        the scheduled tokens, sample for every sequence whose tokens are all fed. With
        asynchronous scheduling the sampled tokens are read back during the next call, and
        that call may launch its step first (see the class). A sequence whose own handling
        raises ends with an error; the others go on (see the class)."""
        if self.inflight is not None:
            rows = self.scheduler.run_ahead() if self.asynchronous else None
            if rows is not None:
                try:
                    launched = self._launch([(s, s.length, 1) for s, _, _ in rows], ahead=True)
                except _Redraw as r:  # read the tokens in flight first, then draw row by row
                    self._settle(self.inflight, fed={s.id for s, _, _ in rows})
                    self.inflight = None
                    self._redraw(r)
                    return
                self.stats["ahead"] += 1
                self._settle(self.inflight, fed={s.id for s, _, _ in rows})
                self.inflight = launched
                return
            self._settle(self.inflight)
            self.inflight = None
        rows = self.scheduler.schedule()
        if not rows:
            return
        try:
            launched = self._launch(rows)
        except _Redraw as r:
            self._redraw(r)
            return
        if launched is not None:
            if self.asynchronous:
                self.inflight = launched
            else:
                self._settle(launched)

    # ------------------------------------------------------------------------- the scheduler's hooks (scheduler.Host)

    def plan(self, s: Sequence, limit: int) -> tuple[int, int]:
        """The chunk s feeds this step, at most `limit` tokens: (first position, length). Reads
        the chunk's new tokens with the tracker, evicting what their arrival masks (only the
        first may start a mask: a chunk never crosses an event). Paper §6.1."""
        if s.forced is not None and s.computed == s.length:  # a replay takes its next forced tokens
            k = len(s.tokens)
            n = _chunk_length(s.length, len(s.prompt) + len(s.forced), min(limit, self.config.replay_chunk), s.events)
            for t in s.forced[k:k + n]:
                self._emit(s, t)
                self._read(s, t)
        if s.tracker.pos == s.computed:
            self._read(s, s.ids(s.computed, s.computed + 1)[0])  # restart mode may move s.computed back
        start = s.computed
        n = _chunk_length(start, s.length, limit, s.events, read=s.tracker.pos)
        for t in s.ids(s.tracker.pos, start + n):
            self._read(s, t)
        return start, n

    def pages_to_append(self, s: Sequence, n: int) -> int:
        """New pages s needs to append n tokens (paper §6.1 paging)."""
        return self.cache.pages_to_append(s.id, n)

    def free_pages(self) -> int:
        """Pages free in the pool now."""
        return self.cache.free_page_count()

    def start(self, s: Sequence) -> None:
        """Give an admitted sequence an empty cache entry and a fresh tracker; its whole token
        stream will be fed again (curve and logits are counted again, identically)."""
        self.cache.add(s.id)
        s.tracker, s.computed, s.curve, s.logits = BlockTracker(self.format, self.config.masking), 0, [], []
        s.held = Held()
        if s.first_scheduled_time is None:
            s.first_scheduled_time = time.perf_counter()

    def preempt(self, s: Sequence) -> bool:
        """Free a running sequence's pages; it will wait first in line with its tokens. False
        (and it ends) if its re-prefill can never fit the pool."""
        self.cache.free(s.id)
        s.preemptions += 1
        self.stats["preemptions"] += 1
        return self._size(s)

    def outgrown(self, s: Sequence) -> None:
        """End s, alone in the pool and still short of pages. Its tokens were all emitted
        (on_token: a server streamed them), so they all stay its response; the ones not fed
        count what the cache would hold."""
        self._finish_unfed(s, f"KV pool full: the sequence alone outgrew it ({self.cache.num_pages} pages)")

    def reject(self, s: Sequence, reason: str) -> None:
        """End a waiting s that can never be admitted."""
        self.stats["rejected"] += 1
        self._end(s, reason)

    def fail(self, s: Sequence, e: BaseException) -> None:
        """End s alone after an exception while handling it: its traceback logged once,
        stop_reason "error: <exception>", out of the queue or the running set, its pages
        freed, on_finish called (every other sequence is untouched)."""
        log.error(f"request {s.id} failed; it alone is ended", exc_info=e)
        self.stats["failed"] += 1
        if not s.done:
            self._end(s, _error(e))

    def ahead(self, s: Sequence) -> bool | None:
        """Whether s's next step can be planned before its token in flight is read (Scheduler.
        run_ahead): None if that token is its last by length (no row: it ends when read);
        True if its next step is that one token, and no value of it changes the step beyond
        a hidden range the device applies; False otherwise (paper §6.1)."""
        if s.inflight < 0 or s.forced is not None or self.config.keep_logits:
            return False
        if len(s.tokens) + 1 >= s.max_tokens:
            return None
        M = self.config.max_block_tokens
        if M and any(s.length - b.start >= M for b in s.tracker.open_blocks):  # a forced <|block_end|> may follow
            return False
        return self._hide(s) is not False

    # ------------------------------------------------------------------------- requests' bookkeeping

    def _enqueue(self, s: Sequence, front: bool) -> None:
        """Queue s (a new request) with the footprint of its prefill, or end it at once if that
        can never fit the pool."""
        if self._size(s):
            self.scheduler.add(s, front)

    def _size(self, s: Sequence) -> bool:
        """s's footprint (pages its prefill will hold at most: its compacted peak, §6.1) and the
        positions where its masks start; False (and it ends, rejected) if it can never fit."""
        known = s.ids(0, s.length) + (s.forced[len(s.tokens):] if s.forced is not None else [])
        s.events, curve = kv_replay(known, self.format, self.config.masking, s.mode)
        L = s.length  # the prefill feeds what is known; then the next token needs a slot
        s.footprint = self.cache.pages_for(max(max(curve[:L]), curve[L - 1] + 1))
        never = max(curve) if s.forced is not None else max(curve[:L]) + 1  # a replay's whole trace is known
        if self.cache.bounded and self.cache.pages_for(never) > self.cache.num_pages:
            what = "its replay" if s.forced is not None else "its prefill and first token"
            self.stats["rejected"] += 1
            self._end(s, f"rejected: {what} holds up to {never:,} KV tokens ({self.cache.pages_for(never)} pages of "
                         f"{self.cache.page_size}), the KV pool holds {self.cache.num_pages} pages")
            return False
        return True

    def _end(self, s: Sequence, reason: str) -> None:
        """Finish s: out of the running set, pages freed (unless keep_cache), results set,
        on_finish called. The bookkeeping comes first, so that a text that cannot be decoded
        or a callback that raises still leaves the pool and the batch clean."""
        s.done, s.stop_reason, s.finished_time, s.inflight = True, reason, time.perf_counter(), -1
        self.scheduler.remove(s)
        if s.id in self.cache.seqs and not self.config.keep_cache:
            self.cache.free(s.id)
        if s.tracker is not None:
            s.blocks_completed = len(s.tracker.completed)
        if s.text is None:
            try:
                s.text = self.tok.decode(s.tokens)
            except Exception as e:  # noqa: BLE001 -- ids are checked in add; a tokenizer bug ends this one only
                log.error(f"request {s.id}: its text cannot be decoded", exc_info=e)
                self.stats["failed"] += not reason.startswith("error")  # _fail counted the first error
                s.text, s.stop_reason = "", reason if reason.startswith("error") else _error(e)
        if self.on_finish:
            try:
                self.on_finish(s)
            except Exception as e:  # noqa: BLE001 -- the caller's bug: it is finished all the same
                log.error(f"request {s.id}: on_finish raised", exc_info=e)

    _fail = fail

    # ------------------------------------------------------------------------- launching a step

    def _launch(self, rows: list[tuple[Sequence, int, int]], ahead: bool = False):
        """Run these rows' forward and sample every sequence whose tokens are all fed (on the
        device; nothing is read back). ahead: rows planned before the last step's tokens were
        read, each feeding its token in flight. Returns the launched step (Sampled, sequences
        by draw) or None when nothing samples."""
        ins, keep = [], self.config.keep_logits
        for s, a, n in rows:
            fresh = max(a, len(s.curve)) - a  # positions fed before are recomputed (restart mode)
            r = RowIn(s.id, a, None if ahead else s.ids(a, a + n), prev=s.inflight if ahead else -1,
                      keep_from=fresh if keep and fresh < n else None,
                      hide=self._hide(s) if ahead else None)
            r.sample = s.forced is None and (ahead or a + n == s.length)
            ins.append(r)
        logits, kept = self.runner.forward(ins)
        self.stats["forwards"] += len(self.runner.last_groups)
        self.stats["tokens"] += sum(n for _, _, n in rows)
        self.stats["steps"] += 1
        self.stats["batch_size_sum"] += len(rows)
        self.stats["max_running"] = max(self.stats["max_running"], len(rows))
        for (s, a, n), r, k in zip(rows, ins, kept):
            s.held.add(a, n)
            if ahead:
                continue  # its token's curve and tracker wait until the token is read (_settle)
            held = self.cache.length(s.id) - n
            first = len(s.curve)
            if a + n > first:
                s.curve.extend(held + p - a + 1 for p in range(max(a, first), a + n))
                if k is not None:
                    s.logits.extend(k)
            s.computed = a + n
            if s.forced is not None and s.computed == len(s.prompt) + len(s.forced):
                self._end(s, "end of trace")
        ready = [(s, r) for (s, _, _), r in zip(rows, ins) if r.sample and not s.done]
        if not ready:
            return None
        draws = [self._draw(s) for s, _ in ready]
        want = [i for i, r in enumerate(ins) if r.sample]
        if len(ready) != len(want):  # a row ended at its forward (end of trace): drop its logits
            keepers = {id(r) for _, r in ready}
            logits = logits[[j for j, i in enumerate(want) if id(ins[i]) in keepers]]
        seqs = [s for s, _ in ready]
        try:
            sampled = self.runner.sample(logits, draws)
        except Exception as e:  # noqa: BLE001 -- find the row that raised: each draws alone
            raise _Redraw(logits, draws, seqs, e) from None
        for j, s in enumerate(seqs):
            s.inflight = j
        return sampled, seqs

    def _redraw(self, r: "_Redraw") -> None:
        """A batched draw raised: each row draws alone and is read at once, so that only the
        row that raises fails (its sampling parameters are checked on arrival: a bug)."""
        if len(r.seqs) == 1:
            self.fail(r.seqs[0], r.error)
            return
        for j, s in enumerate(r.seqs):
            s.inflight = -1
            try:
                self._settle((self.runner.sample(r.logits[j:j + 1], [r.draws[j]]), [s]))
            except Exception as e:  # noqa: BLE001 -- see fail
                self.fail(s, e)

    def _draw(self, s: Sequence) -> Draw:
        """How s draws its next token (paper §6.1 sampling): its counter is the token's index;
        max_block_tokens forces <|block_end|> once the open block is that long."""
        counter = len(s.tokens) + (1 if s.inflight >= 0 else 0)
        length = s.length + (1 if s.inflight >= 0 else 0)
        ob = s.tracker.open_block_start
        M = self.config.max_block_tokens
        force = bool(M and ob is not None and length - ob - 1 >= M)
        return Draw(s.params, s.seed, counter, force, s.params.logprobs)

    def _hide(self, s: Sequence):
        """For a row fed its token in flight: (token, lo, hi) if that token would complete a
        memento whose block the cache holds at indices lo..hi, None if no token would evict
        anything, False if its arrival would do what the device cannot follow (restart
        mode's recomputation, several blocks at once). Paper §6.1."""
        if s.mode is Mode.FULL:
            return None
        blocks = s.tracker.peek(self.event_token)
        if not blocks:
            return None
        if s.mode is Mode.RESTART or len(blocks) > 1:
            return False
        first, count = s.held.find(*_evicted(blocks[0], self.config.masking, s.mode))
        return (self.event_token, first, first + count - 1) if count else None

    # ------------------------------------------------------------------------- reading a step's tokens

    def _settle(self, launched, fed: set | frozenset = frozenset()) -> None:
        """Read a launched step's tokens back and act on them: log-probabilities, on_token, the
        stop checks. `fed`: ids of the sequences whose token the next step (already launched)
        feeds: the tracker reads it now and evicts what it masks (the device hid that block
        from it), and its KV curve entry is counted (paper §6.1); if it ends the sequence, the
        token the next step draws for it is dropped."""
        sampled, seqs = launched
        ids, lps, tops = self.runner.collect(sampled)
        for j, s in enumerate(seqs):
            if s.done:  # ended (aborted, failed) while its token was on the device
                continue
            if s.id not in fed:
                s.inflight = -1
            try:
                t = ids[j]
                if s.params.logprobs is not None:
                    s.logprobs.append(lps[j])
                    if s.params.logprobs:
                        s.top_logprobs.append(tops[j])
                self._emit(s, t)
                reason = self._stop_reason(s, t)
                if s.id in fed:  # already in the cache: read it (evicting), count what the cache holds
                    if self._read(s, t):
                        self.stats["ahead_evictions"] += 1
                    s.computed = s.length
                    s.curve.append(self.cache.length(s.id))
                    if reason:
                        self._end(s, reason)
                elif reason:
                    self._finish_unfed(s, reason)
            except Exception as e:  # noqa: BLE001 -- see fail
                self.fail(s, e)

    def _emit(self, s: Sequence, t: int) -> None:
        """Append a response token (sampled or forced): timing, stop-string text, on_token."""
        now = time.perf_counter()
        if s.first_token_time is None:
            s.first_token_time = now
        else:
            s.itl.append(now - s.last_token_time)
        s.last_token_time = now
        if self.on_token:
            self.on_token(s.id, t, _kind(s.tracker, t, self.format))
        s.tokens.append(t)
        if s.params.stop:
            s.out_bytes += self.tok.decode_bytes([t])

    def _stop_reason(self, s: Sequence, t: int) -> str:
        """Why s stops after sampling t ("" if it does not): a stop token, a stop string (the
        text is cut before it), or its length."""
        if (t in self.eos_ids and not s.params.ignore_eos) or t in s.stop_ids:
            return "stop token"
        if s.params.stop:
            tail = max(len(x.encode()) for x in s.params.stop) + len(self.tok.decode_bytes([t]))
            hits = [i for i in (s.out_bytes.find(x.encode(), max(0, len(s.out_bytes) - tail)) for x in s.params.stop)
                    if i >= 0]
            if hits:
                s.text = bytes(s.out_bytes[:min(hits)]).decode("utf-8", errors="replace")
                return "stop string"
        if len(s.tokens) >= s.max_tokens:
            return "max_tokens"
        return ""

    def _finish_unfed(self, s: Sequence, reason: str) -> None:
        """End a sequence whose last token was sampled but is not fed (nothing would read its
        K/V, or the pool has no room for it): the tracker still reads it and its arrival
        still evicts, and the curve counts what the cache would hold after it (§A.3.1), so
        every token has its entry. Several tokens not fed (a re-prefill the pool cut short)
        get kv_replay's count of what feeding them would hold."""
        while s.tracker.pos < s.length:
            self._read(s, s.ids(s.tracker.pos, s.tracker.pos + 1)[0])
        missing = s.length - len(s.curve)
        if missing == 1:
            s.curve.append(self.cache.length(s.id) + s.length - s.computed)
        elif missing > 1:
            s.curve.extend(kv_replay(s.ids(0, s.length), self.format, self.config.masking, s.mode)[1][len(s.curve):])
        self._end(s, reason)

    # ------------------------------------------------------------------------- the mechanism

    def _read(self, s: Sequence, token: int) -> int:
        """Let the tracker read the token about to be fed; evict whatever its arrival masks,
        before it is fed (§6.1): the positions come off the host's list (Held), which gives
        the cache the indices to remove, so nothing is read back from the device. Restart
        mode (§6.2.1) evicts the block with its delimiters and the memento too, whose tokens
        are then fed again from s.computed: same text, same positions, K/V recomputed without
        the block. Returns the number of tokens evicted."""
        evicted = 0
        for b in s.tracker.step(token):
            if s.mode is Mode.FULL:
                continue
            first, count = s.held.remove(*_evicted(b, self.config.masking, s.mode))
            evicted += self.cache.remove(s.id, first, count)
            if s.mode is Mode.RESTART:
                s.computed = min(s.computed, b.memento()[0])
        return evicted


def _evicted(b: Block, masking: MementoConfig, mode: Mode) -> tuple[int, int]:
    """The inclusive position range block b's mask removes from the cache: its span, or in
    restart mode (§6.2.1) everything from <|block_start|> to the memento's last token."""
    return (b.start, b.summary_end - 1) if mode is Mode.RESTART else b.span(masking.mask_delimiters)


def _chunk_length(start: int, end: int, limit: int, events: set, read: int | None = None) -> int:
    """How many positions from `start` (below `end`) one chunk feeds: at most `limit` (>= 1),
    never past a position where a mask starts. `read`: positions before it were already read
    by the tracker (their evictions are done), so only events at or after it end a chunk."""
    read = start + 1 if read is None else max(read, start + 1)
    n = 1
    while n < limit and start + n < end and not (start + n >= read and start + n in events):
        n += 1
    return n


class _Redraw(Exception):
    """A step's batched draw raised (Engine._redraw draws its rows one by one)."""

    def __init__(self, logits, draws, seqs, error):
        super().__init__(str(error))
        self.logits, self.draws, self.seqs, self.error = logits, draws, seqs, error


def _error(e: BaseException) -> str:
    """The stop_reason of a sequence ended by an exception: "error: <type>: <message>"
    (first line, 200 characters at most)."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"error: {type(e).__name__}: {text[:200]}"


def _kind(tracker: BlockTracker, t: int, fmt: MementoTokens) -> str:
    if t in (fmt.block_start, fmt.block_end, fmt.summary_start, fmt.summary_end):
        return "delimiter"
    if tracker.summarizing is not None:
        return "memento"
    if tracker.open_blocks:
        return "block"
    return "text"


# ----------------------------------------------------------------------------- offline use


def load(checkpoint: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from a checkpoint dir, training run or hub id, checked to
    hold the memento tokens (paper §3). Raises FileNotFoundError (no such checkpoint),
    ValueError (not a Qwen3 checkpoint) or KeyError (a memento token missing), one line each."""
    path = resolve_checkpoint(checkpoint)
    model = Qwen3.from_pretrained(path, dtype=dtype, device=device).eval()
    tok = Tokenizer.from_dir(path)
    MementoTokens.from_tokenizer(tok)
    return model, tok


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], config: EngineConfig = EngineConfig(),
             sampling: SamplingParams | list[SamplingParams] | None = None, *, seed: int | None = None,
             forced: list[list[int]] | None = None, on_token=None, progress: bool = False):
    """Generate (or replay) B requests through one Engine and return them (§6.1).

    Args:
        model: a model.Qwen3. tok: a tokenizer.Tokenizer with the memento tokens.
        prompts: B lists of token ids (each already in ChatML, see Tokenizer.chat_prompt).
        config: the engine's options (EngineConfig: masking, mode, pool, batching).
        sampling: SamplingParams of every request, or one per prompt (None: config.sampling).
        seed: request i samples with seed request_seed(seed, i) (None: each params' seed).
        forced: B lists of response ids to teacher-force instead of sampling (replay).
        on_token: see Engine. progress: a tqdm bar.
    Returns:
        (list[Sequence] in prompt order, the Engine: its cache and counters).
    Raises:
        ValueError for an empty prompt, one (with its max_tokens or forced response) beyond
        max_position_embeddings, or an id outside the vocabulary (Engine.add).
    """
    eng = Engine(model, tok, config, on_token=on_token)
    sampling = sampling or config.sampling
    params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    if seed is not None:
        params = [replace(sp, seed=request_seed(seed, i)) for i, sp in enumerate(params)]
    seqs = [eng.add(p, sp, forced=None if forced is None else forced[i]) for i, (p, sp) in enumerate(zip(prompts, params))]
    eng.run(progress=progress)
    return seqs, eng
