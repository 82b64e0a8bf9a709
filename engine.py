"""The serving loop: continuous batching over a paged, compacting KV cache (paper §6.1, §6.2.1).

Requests wait in a queue; a request is admitted when the pool has pages for its prompt (plus
a small watermark) and fewer than `max_num_seqs` sequences run. Admission prefills it; then
every step decodes all running sequences together, one token each (a teacher-forced replay
may feed a chunk). Before a token is fed, the block tracker reads it and whatever its arrival
masks is evicted from the cache (the official engine evicts as soon as <|summary_end|> is
sampled); in restart mode the memento's K/V are then recomputed without the block. A
finished sequence frees its pages at once and the next request joins. When the pool cannot
hold the next step, the most recently admitted sequence is preempted: its pages are freed and
it goes back to the front of the queue with what it has generated; re-admitted, it is
prefilled again with its whole token stream, so blocks evicted before are evicted again.

    eng = Engine(model, tok, MementoConfig(0), max_num_seqs=64, kv_cache_tokens=65536)
    seqs = [eng.add(prompt_ids) for prompt_ids in prompts]
    eng.run()          # seqs[i].tokens, .curve (KV tokens after each token), .stop_reason

Sampling (paper §6.1 defaults): each request has its own CPU generator, seeded from its
`seed`, that draws one uniform number per decode step of that request; the token is the
inverse CDF of the filtered distribution at that number. A request therefore gets the same
tokens whatever else runs beside it, however it is batched or preempted, on CPU or CUDA.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from kv_cache import EMPTY, PagedKVCache
from memento_attention import NEVER, BlockTracker, MementoConfig, MementoTokens

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class SampleConfig:
    """Sampling (the paper's evaluation defaults, §6.1): temperature 0 means greedy."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20


def sample(logits: torch.Tensor, sc: SampleConfig, gens: list) -> torch.Tensor:
    """Draw one token per row (paper §6.1 sampling): temperature, then top-k, then top-p (nucleus).

    Args:
        logits: [B, V] float logits on any device.
        sc: temperature (<= 0: greedy argmax, no randomness drawn), top_k (0: all tokens),
            top_p (1.0: no nucleus cut).
        gens: B CPU torch.Generators (None: torch's global CPU generator), one per row.
    Returns:
        [B] int64 token ids on logits' device.

    Seed semantics, the same on every device: each call draws exactly one uniform number
    u ~ U[0, 1) per row from that row's generator on the CPU; the token is the first
    candidate, in descending probability, at which the cumulative filtered probability
    exceeds u times their total (inverse-CDF sampling, done on logits' device). The same
    generator state and logits therefore give the same token on CPU and CUDA (up to float
    rounding of the logits themselves), and a CUDA run never needs a CUDA generator.
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
    u = torch.cat([torch.rand(1, generator=g) for g in gens])[:, None].to(logits.device)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # u * total can round up to the total itself: fall back to the last kept candidate.
    choice = torch.minimum(choice, (probs > 0).sum(-1, keepdim=True) - 1)
    return idx.gather(-1, choice).squeeze(-1)


@dataclass
class Sequence:
    """One request: what it asked for, its state while it runs, and its results.

    tokens: the response so far (sampled, or taken from `forced` when replaying); curve: KV
    tokens held after each token of prompt + response was fed (§A.3.1; peak = max, AUC = sum);
    logits: each position's logits [V] (fp32, CPU) when the engine keeps them (tests).
    """

    id: int
    prompt: list[int]
    forced: list[int] | None = None
    max_new_tokens: int = 1024
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    stop_reason: str = ""
    curve: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    preemptions: int = 0
    blocks_completed: int = 0
    logprobs: list[float] = field(default_factory=list)  # per response token with record_logprobs (nan: forced)
    compaction: bool = True
    restart: bool = False
    # running state
    tracker: BlockTracker | None = None
    events: set = field(default_factory=set)
    last: torch.Tensor | None = None

    @property
    def position(self) -> int:
        """Logical position of the next token."""
        return len(self.prompt) + len(self.tokens)


class Engine:
    """Continuous batching over a PagedKVCache with memento compaction (§6.1).

    Args:
        model: a model.Qwen3 (eval). tok: a tokenizer.Tokenizer with the memento tokens.
        cfg: masking options (memento_attention.MementoConfig).
        compaction: False keeps every token (the full-cache baseline; no mask applied).
        restart: restart mode (§6.2.1): at each memento's end evict its block with the
            delimiters and recompute the memento tokens' K/V at the same positions without it.
            Both are defaults: a request may choose its own (Engine.add), so the modes of an
            evaluation share one batch.
        sampling: SampleConfig. max_block_tokens: force <|block_end|> once an open block
            holds this many tokens (§5 of the official engine options).
        max_num_seqs: sequences running at once. kv_cache_tokens: the pool's size in tokens
            (rounded down to pages); None = unbounded (grows). page_size: slots per page.
        max_num_batched_tokens: prompt tokens per prefill forward (chunked prefill).
        replay_chunk: teacher-forced response tokens per decode forward (chunks never cross
            a position where a mask starts, so any value gives the same result).
        watermark: share of the pool kept free at admission, so running sequences can grow.
        keep_logits: store every position's logits in Sequence.logits (tests).
        keep_cache: do not free finished sequences (tests read their K/V).
        on_token: callback(seq_id, token_id, kind) per response token; kind is one of
            "block", "memento", "delimiter", "text".
        on_finish: callback(Sequence) when a request finishes (its curve and stop_reason set).
        record_logprobs: keep in Sequence.logprobs the log-probability under the model's full
            distribution (log_softmax of the raw logits, before temperature and filtering) of
            each sampled token; NaN for a token the engine forced (max_block_tokens). RL's
            old-policy log-probs (train_rl.py).
    Raises:
        ValueError for restart with options it does not define, or a size < 1.
    """

    def __init__(self, model, tok, cfg: MementoConfig, *, compaction: bool = True, restart: bool = False,
                 sampling: SampleConfig = SampleConfig(), max_block_tokens: int | None = None, max_num_seqs: int = 256,
                 kv_cache_tokens: int | None = None, page_size: int = 16, max_num_batched_tokens: int = 2048,
                 replay_chunk: int = 1, watermark: float = 0.01, keep_logits: bool = False, keep_cache: bool = False,
                 on_token=None, on_finish=None, record_logprobs: bool = False):
        _check_restart(restart, cfg)
        sizes = dict(max_num_seqs=max_num_seqs, page_size=page_size, max_num_batched_tokens=max_num_batched_tokens,
                     replay_chunk=replay_chunk, kv_cache_tokens=kv_cache_tokens or 1, max_block_tokens=max_block_tokens or 1)
        bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
        if bad:
            raise ValueError(f"engine sizes must be >= 1: {', '.join(bad)}")
        if kv_cache_tokens is not None and kv_cache_tokens < page_size:
            raise ValueError(f"kv_cache_tokens={kv_cache_tokens} holds no page of {page_size} tokens")
        self.model, self.tok, self.cfg = model, tok, cfg
        self.compaction, self.restart, self.sampling = compaction, restart, sampling
        self.max_block_tokens, self.max_num_seqs = max_block_tokens, max_num_seqs
        self.max_num_batched_tokens, self.replay_chunk = max_num_batched_tokens, replay_chunk
        self.keep_logits, self.keep_cache, self.on_token, self.on_finish = keep_logits, keep_cache, on_token, on_finish
        self.record_logprobs = record_logprobs
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        num_pages = None if kv_cache_tokens is None else kv_cache_tokens // page_size
        self.cache = PagedKVCache(model.config, self.dtype, self.device, page_size=page_size, num_pages=num_pages)
        self.watermark_pages = int(watermark * num_pages) if num_pages else 0
        self.T = MementoTokens.from_tokenizer(tok)
        self.stop_ids = {tok.special_ids[s] for s in STOP_TOKENS if s in tok.special_ids}
        self.vocab = tok.n_vocab
        self.max_pos = model.config.max_position_embeddings
        self.sequences: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # steps: decode steps; forwards: every model forward (prefill chunks, restart recomputation)
        self.stats = {"steps": 0, "forwards": 0, "preemptions": 0, "rejected": 0, "batch_size_sum": 0, "max_running": 0}

    # ------------------------------------------------------------------------- requests

    def add(self, prompt: list[int], forced: list[int] | None = None, max_new_tokens: int = 1024,
            seed: int | None = None, compaction: bool | None = None, restart: bool | None = None) -> Sequence:
        """Queue a request: prompt ids (ChatML applied), an optional teacher-forced response,
        a sampling seed, and its mode (None: the engine's compaction / restart). Returns its
        Sequence (filled in by run()). A prompt longer than the pool can ever hold is rejected
        at once (stop_reason says so); the others run. Raises ValueError for an empty prompt,
        one that does not fit max_position_embeddings, max_new_tokens < 1, or restart mode
        with masking options it does not define."""
        if not prompt:
            raise ValueError("an empty prompt has no last token to continue from; give at least one token")
        if len(prompt) >= self.max_pos:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_position_embeddings={self.max_pos}; shorten it")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        compaction = self.compaction if compaction is None else compaction
        restart = self.restart if restart is None else restart
        _check_restart(restart, self.cfg)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        s = Sequence(len(self.sequences), list(prompt), None if forced is None else list(forced), max_new_tokens, gen,
                     compaction=compaction, restart=restart)
        self.sequences.append(s)
        need = self.cache.pages_for(len(prompt) + 1)
        if self.cache.bounded and need > self.cache.num_pages:
            self._reject(s, f"rejected: the prompt needs {need} pages of {self.cache.page_size} tokens, "
                            f"the KV pool holds {self.cache.num_pages}")
        else:
            self.waiting.append(s)
        return s

    def run(self, progress: bool = False) -> list[Sequence]:
        """Run until every request finished; returns all sequences in the order added."""
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.sequences), dynamic_ncols=True, desc="sequences")
        while self.waiting or self.running:
            self.step()
            if bar is not None:
                st = self.cache.stats()
                bar.n = sum(s.done for s in self.sequences)
                bar.set_postfix(running=len(self.running), pool=f"{st['held_pages']}/{st['pages']} pages",
                                refresh=False)
                bar.refresh()
        if bar is not None:
            bar.close()
        return self.sequences

    @torch.no_grad()  # generation never needs autograd; without this every KV write grows a graph
    def step(self) -> None:
        """One scheduler iteration: admit what fits, then one decode step for all running."""
        self._admit()
        if self.running:
            self._decode()

    # ------------------------------------------------------------------------- scheduling

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            need = self.cache.pages_for(s.position + 1) + (self.watermark_pages if self.running else 0)
            if need > self.cache.free_page_count():
                if self.running:
                    return  # wait for running sequences to give pages back
                self.waiting.popleft()  # nothing will give pages back: it can never run
                self._reject(s, f"KV pool full: {need} pages needed, {self.cache.free_page_count()} free")
                continue
            self.waiting.popleft()
            self._prefill(s)
            if not s.done:
                self.running.append(s)

    def _preempt(self, s: Sequence) -> None:
        """Free a running sequence's pages and queue it again, first in line, with its tokens."""
        self.running.remove(s)
        self.cache.free(s.id)
        s.preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(s)

    def _reject(self, s: Sequence, reason: str) -> None:
        s.done, s.stop_reason = True, reason
        self.stats["rejected"] += 1
        if self.on_finish:
            self.on_finish(s)

    def _finish(self, s: Sequence, reason: str) -> None:
        s.done, s.stop_reason = True, reason
        s.curve = list(self.cache.curve(s.id))
        s.blocks_completed = len(s.tracker.completed)
        s.last = None
        if s in self.running:
            self.running.remove(s)
        if not self.keep_cache:
            self.cache.free(s.id)
        if self.on_finish:
            self.on_finish(s)

    # ------------------------------------------------------------------------- prefill

    def _prefill(self, s: Sequence) -> None:
        """Start a sequence in the cache and feed prompt + tokens generated so far (after a
        preemption), teacher-forced, in chunks of max_num_batched_tokens that never cross a
        position where a mask starts: evictions and restart recomputation happen exactly
        as during decoding. Logits only for the last token (all of them with keep_logits)."""
        self.cache.add(s.id)
        s.tracker, s.logits = BlockTracker(self.T, self.cfg), []
        stream = s.prompt + s.tokens
        s.events = _mask_events(stream + (s.forced[len(s.tokens):] if s.forced else []), self.T, self.cfg)
        start = 0
        while start < len(stream):
            n = _chunk_length(stream, start, self.max_num_batched_tokens, s.events)
            for p in range(start, start + n):
                self._read(s, stream[p])
            h = self._forward([s], [stream[start:start + n]], [start])
            if self.keep_logits:
                s.logits.extend(self.model.logits(h[0, :n]).cpu())
            start += n
        s.last = self.model.logits(h[0, n - 1])
        self._check_done(s)

    # ------------------------------------------------------------------------- decode

    def _decode(self) -> None:
        sampled = [s for s in self.running if s.forced is None]
        if sampled:
            last = torch.stack([s.last for s in sampled])
            raw = torch.log_softmax(last.float(), -1) if self.record_logprobs else None
            last[:, self.vocab:] = float("-inf")  # the embedding may be padded beyond the tokenizer
            picks = sample(last, self.sampling, [s.generator for s in sampled])
            if raw is not None:
                lps = dict(zip((s.id for s in sampled), raw.gather(-1, picks[:, None]).squeeze(-1).tolist()))
            choice = dict(zip((s.id for s in sampled), picks.tolist()))
        chunks = {}
        for s in list(self.running):
            if s.forced is not None:
                k = len(s.tokens)
                chunk = s.forced[k:k + _chunk_length(s.forced, k, self.replay_chunk, s.events, offset=len(s.prompt))]
            else:
                ob = s.tracker.open_block_start
                forced = bool(self.max_block_tokens and ob is not None and s.position - ob - 1 >= self.max_block_tokens)
                chunk = [self.T.block_end] if forced else [choice[s.id]]
                if self.record_logprobs:
                    s.logprobs.append(float("nan") if forced else lps[s.id])
            for t in chunk:
                kind = _kind(s.tracker, t, self.T)
                self._read(s, t)
                s.tokens.append(t)
                if self.on_token:
                    self.on_token(s.id, t, kind)
            chunks[s.id] = chunk
        batch = self._make_room([s for s in self.running], chunks)
        if not batch:
            return
        h = self._forward(batch, [chunks[s.id] for s in batch], [s.position - len(chunks[s.id]) for s in batch])
        rows = [len(chunks[s.id]) - 1 for s in batch]
        last = self.model.logits(h[torch.arange(len(batch)), rows])
        self.stats["steps"] += 1
        self.stats["batch_size_sum"] += len(batch)
        self.stats["max_running"] = max(self.stats["max_running"], len(batch))
        for r, s in enumerate(batch):
            if self.keep_logits:
                s.logits.extend(self.model.logits(h[r, :len(chunks[s.id])]).cpu())
            s.last = last[r]
            self._check_done(s)

    def _make_room(self, batch: list[Sequence], chunks: dict) -> list[Sequence]:
        """The sequences whose chunks the pool can hold, preempting the most recently
        admitted ones until the rest fit (a sequence alone that cannot grow ends)."""
        while True:
            need = sum(self.cache.pages_to_append(s.id, len(chunks[s.id])) for s in batch)
            if need <= self.cache.free_page_count():
                return batch
            victim = batch[-1]
            if len(batch) == 1:
                victim.tokens = victim.tokens[:len(victim.tokens) - len(chunks[victim.id])]
                victim.logprobs = victim.logprobs[:len(victim.tokens)]
                self._finish(victim, "KV pool full: the sequence alone outgrew it")
                return []
            batch = batch[:-1]
            self._preempt(victim)

    def _check_done(self, s: Sequence) -> None:
        if s.forced is not None and len(s.tokens) >= len(s.forced):
            self._finish(s, "end of trace")
        elif s.tokens and s.forced is None and s.tokens[-1] in self.stop_ids:
            self._finish(s, "stop token")
        elif len(s.tokens) >= s.max_new_tokens:
            self._finish(s, "max_new_tokens")
        elif s.position >= self.max_pos:
            self._finish(s, "max_position_embeddings")

    # ------------------------------------------------------------------------- the mechanism

    def _read(self, s: Sequence, token: int) -> None:
        """Let the tracker read the token about to be fed; evict (or restart-recompute)
        whatever its arrival masks, before it is fed (§6.1)."""
        for b in s.tracker.step(token):
            if not s.compaction:
                continue
            if s.restart:
                self._restart_memento(s, b)
            else:
                self.cache.evict(s.id, *b.span(self.cfg.mask_delimiters))

    def _restart_memento(self, s: Sequence, b) -> None:
        """§6.2.1: drop block b with its delimiters, then recompute the K/V of every token
        between <|block_end|> and <|summary_end|> (the memento and any whitespace before
        <|summary_start|>) at their own logical positions against what remains, so they no
        longer carry the block. The memento text is unchanged; nothing is counted twice."""
        self.cache.evict(s.id, b.s, b.z - 1)
        stream = s.prompt + s.tokens
        if b.z - 1 > b.e:
            self._forward([s], [stream[b.e + 1:b.z]], [b.e + 1], record=False)

    def _forward(self, seqs: list[Sequence], chunks: list[list[int]], starts: list[int], record: bool = True):
        """One model forward of these sequences' chunks through the cache: hidden states
        [B, W, hidden] (right-padded; padding is stored nowhere)."""
        B, W = len(seqs), max(map(len, chunks))
        ids = torch.zeros(B, W, dtype=torch.int64)
        pos = torch.zeros(B, W, dtype=torch.int64)
        mf = torch.full((B, W), EMPTY, dtype=torch.int64)
        for r, (c, p0) in enumerate(zip(chunks, starts)):
            ids[r, :len(c)] = torch.tensor(c, dtype=torch.int64)
            pos[r, :len(c)] = torch.arange(p0, p0 + len(c))
            mf[r, :len(c)] = NEVER
        view = self.cache.batch([s.id for s in seqs], record=record)
        self.stats["forwards"] += 1
        return self.model.hidden_states(ids.to(self.device), pos.to(self.device), mf.to(self.device), view)


def _check_restart(restart: bool, cfg: MementoConfig) -> None:
    if restart and (cfg.keep_last_n_blocks != 0 or cfg.keep_last_block_for_answer):
        raise ValueError("restart mode is defined for keep_last_n_blocks=0 without keep_last_block_for_answer")


def _chunk_length(tokens: list[int], start: int, limit: int, events: set, offset: int = 0) -> int:
    """How many of tokens[start:] to feed in one forward: at most `limit`, and never past a
    position where a mask starts (offset + index is a token's logical position)."""
    n = 1
    while n < limit and start + n < len(tokens) and offset + start + n not in events:
        n += 1
    return n


def _mask_events(ids: list[int], T: MementoTokens, cfg: MementoConfig) -> set[int]:
    """Positions at which some mask starts (a teacher-forced chunk must begin there)."""
    tr = BlockTracker(T, cfg)
    return {p for p, t in enumerate(ids) if tr.step(t)}


def _kind(tracker: BlockTracker, t: int, T: MementoTokens) -> str:
    if t in (T.block_start, T.block_end, T.summary_start, T.summary_end):
        return "delimiter"
    if tracker.summarizing is not None:
        return "memento"
    if tracker.open_blocks:
        return "block"
    return "text"
