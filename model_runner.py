"""The model runner: everything the engine does on the device (paper §6.1 serving).

The engine decides what each step computes (engine.py, scheduler.py); the runner computes it:
it turns a step's rows into device inputs (one host-to-device copy), runs the model forward
(eager, with torch.compile'd layers, or a recorded CUDA graph), samples on the device, and
starts the copy of the sampled ids back to the host without waiting for it:

    runner = ModelRunner(model, cache, config, vocab=tok.n_vocab)
    logits, kept = runner.forward(rows)            # one forward of some rows (RowIn)
    step = runner.sample(logits, draws)            # device ids; their copy to the host has begun
    ids, logprobs, tops = runner.collect(step)     # waits for that copy only

Asynchronous scheduling (vLLM V1's) rests on two things here. The sampled ids of the last
step stay on the device (`last_ids`), and a row of the next step may take its input token from
there (RowIn.prev) instead of from the host: the host plans and launches step n+1 before it
has read step n's tokens. And a row may carry a hidden key range (RowIn.hide): if the token it
feeds turns out to complete a memento, the block it summarizes is hidden from that token's
query on the device, as the synchronous engine would have evicted it first (the engine evicts
it when it reads the token, one step later). See engine.py for when a step may run ahead.

Decode steps on CUDA run through static, padded batch-size buckets (cuda_graphs.py), replayed
as CUDA graphs or run eagerly: the same kernels and the same KV-split choice either way, so
`cudagraph_mode="NONE"` reproduces a graph run bit for bit. On the CPU a step runs eagerly at
its own size.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from cuda_graphs import DecodeGraphs
from kv_cache import PagedKVCache, kv_bytes_per_token
from memento_attention import resolve_backend
from model import EAGER_OPS, compiled_ops, with_reduce
from sampling import sample

log = logging.getLogger("memento.model_runner")


@dataclass
class RowIn:
    """One row of a forward (paper §6.1): a sequence's next tokens.

    seq_id: its id in the cache. start: the position of its first token. ids: the tokens
    (host ints), or None for one token taken on the device from the last step's samples,
    the `prev`-th of them. sample: its last position's logits are sampled. keep_from: keep the
    logits of the row's positions from this offset on (Engine keep_logits), or None.
    hide: (token, lo, hi) or None: if the token fed from the device is `token`, the row's keys
    lo..hi (indices in what it holds) are hidden from it (see the module docstring).
    """

    seq_id: int
    start: int
    ids: list[int] | None
    prev: int = -1
    sample: bool = False
    keep_from: int | None = None
    hide: tuple[int, int, int] | None = None

    @property
    def n(self) -> int:
        """Tokens the row feeds."""
        return 1 if self.ids is None else len(self.ids)


@dataclass
class Draw:
    """How one sampled row draws (paper §6.1 sampling): its SamplingParams, seed and counter
    (the index of the token drawn), whether <|block_end|> replaces the draw (max_block_tokens),
    and the number of top log-probabilities wanted (None: no log-probabilities)."""

    params: object
    seed: int
    counter: int
    force: bool = False
    logprobs: int | None = None


@dataclass
class Sampled:
    """A step's samples: ids on the device (also in runner.last_ids), and their host copies,
    valid once `event` has completed (CUDA) — runner.collect waits for that."""

    ids: torch.Tensor
    host_ids: torch.Tensor
    host_lp: torch.Tensor | None
    host_top: tuple | None
    force: list[bool]
    want: list[int | None]
    event: object = None


# ----------------------------------------------------------------------------- the KV budget


def local_config(model):
    """The model.Qwen3Config of what this process holds: the model's, with the attention and
    KV heads divided by the tensor-parallel size (sharding.tensor_parallel) if it is split.
    Its KV cache is sized and shaped from this (paper §A.3.1 bytes per token, per rank)."""
    tp = getattr(model, "tensor_parallel", None)
    c = model.config
    if tp is None or tp.size == 1:
        return c
    return dataclasses.replace(c, num_attention_heads=c.num_attention_heads // tp.size,
                               num_key_value_heads=c.num_key_value_heads // tp.size)



def gpu_kv_budget_bytes(total: int, free: int, reserved: int, peak_allocated: int, utilization: float) -> int:
    """Bytes left for the KV pool on a GPU, as vLLM sizes it: utilization x total memory, minus
    the peak torch allocated while profiling (weights and one forward's activations), minus what
    other processes and non-torch allocations hold (total - free - reserved). May be <= 0.
    Paper §6.1 serving (the pool a server has)."""
    non_torch = max(0, total - free - reserved)
    return int(utilization * total) - peak_allocated - non_torch


@torch.no_grad()
def default_kv_cache_tokens(model, config) -> tuple[int, str]:
    """The default KV budget in tokens and a line describing it (paper §A.3.1 bytes per token).

    config: an engine.EngineConfig. CUDA: gpu_kv_budget_bytes after one profiling forward of
    max_num_batched_tokens tokens through a throwaway cache (the largest step the scheduler
    makes) and the LM head on max_num_seqs rows. CPU: config.cpu_kv_cache_gib. Raises
    ValueError when the GPU has no room left for a single page.
    """
    p = next(model.parameters())
    dtype = config.kv_cache_dtype or p.dtype
    per_token = kv_bytes_per_token(local_config(model), dtype)
    if p.device.type != "cuda":
        budget = int(config.cpu_kv_cache_gib * 2**30)
        tokens = budget // per_token
        return tokens, (f"KV cache: {config.cpu_kv_cache_gib:g} GiB = {tokens:,} tokens at {per_token:,} B/token "
                        "(the CPU default; --kv-cache-tokens or --kv-cache-gib to change)")
    torch.cuda.synchronize(p.device)
    torch.cuda.reset_peak_memory_stats(p.device)
    n = config.max_num_batched_tokens
    cache = PagedKVCache(local_config(model), dtype, p.device, page_size=config.page_size)
    cache.add(0)
    h = model.hidden_states(torch.zeros(1, n, dtype=torch.int64, device=p.device),
                            torch.arange(n, device=p.device)[None], None, cache.batch([0]), ops=_tp_ops(model, EAGER_OPS))
    model.logits(h[0, -1:].expand(config.max_num_seqs, -1))
    del h, cache
    torch.cuda.synchronize(p.device)
    free, total = torch.cuda.mem_get_info(p.device)
    budget = gpu_kv_budget_bytes(total, free, torch.cuda.memory_reserved(p.device),
                                 torch.cuda.max_memory_allocated(p.device), config.gpu_memory_utilization)
    torch.cuda.empty_cache()
    tokens = max(0, budget) // per_token
    tp = getattr(model, "tensor_parallel", None)
    if tp is not None and tp.size > 1:  # the group's engines must agree on the pool: the smallest
        t = torch.tensor([tokens], device=p.device)
        torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MIN, group=tp.group)
        tokens = int(t)
    if tokens < config.page_size:
        raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization={config.gpu_memory_utilization} "
                         f"({total / 2**30:.1f} GiB device); raise it or lower max_num_batched_tokens")
    return tokens, (f"KV cache: {budget / 2**30:.2f} GiB = {tokens:,} tokens at {per_token:,} B/token "
                    f"({config.gpu_memory_utilization:.0%} of {total / 2**30:.1f} GiB, minus weights and activations)")


# ----------------------------------------------------------------------------- the runner


class ModelRunner:
    """The device side of an Engine (paper §6.1): inputs, forwards, sampling, host copies.

    Args:
        model: a model.Qwen3 (eval). cache: the engine's PagedKVCache.
        config: the engine's EngineConfig (compile, cudagraph_mode, enforce_eager,
            max_num_seqs, keep_logits). vocab: the tokenizer's size (logits past it are
            never sampled). block_end: the id that a forced draw takes (<|block_end|>).
    Attributes: `ops` (the layer functions: compiled or eager), `graphs` (DecodeGraphs or
    None), `static` (decode steps run through padded buckets: CUDA with the paged kernel),
    `last_ids` (the last step's sampled ids, on the device), `compile_seconds`.
    Raises ValueError from DecodeGraphs for a cache that cannot be recorded.
    """

    def __init__(self, model, cache: PagedKVCache, config, vocab: int, block_end: int):
        self.model, self.cache, self.config = model, cache, config
        self.vocab, self.block_end = vocab, block_end
        self.device = cache.device
        cuda = self.device.type == "cuda"
        self.tp = getattr(model, "tensor_parallel", None)
        split = self.tp is not None and self.tp.size > 1
        # Tensor parallel: no torch.compile and no CUDA graphs until a multi-GPU run has checked them
        compile_ = config.compile if config.compile is not None else (cuda and not config.enforce_eager and not split)
        self.ops = _tp_ops(model, compiled_ops() if compile_ and not config.enforce_eager and not split else EAGER_OPS)
        self.last_ids = torch.zeros(config.max_num_seqs + 1, dtype=torch.int64, device=self.device)
        # keep_logits needs every position's logits, which the bucketed step does not return
        self.static = (cuda and cache.bounded and cache.paged_kernel and not config.keep_logits
                       and resolve_backend(self.device) == "triton")
        graphs = config.cudagraph_mode != "NONE" and not config.enforce_eager and not split
        self.graphs = None
        self.last_groups: list[list[int]] = []  # the forwards of the last step (row indices)
        self.compile_seconds = 0.0
        t0 = time.perf_counter()
        if self.static:
            self.graphs = DecodeGraphs(model, cache, config.max_num_seqs, self.last_ids, ops=self.ops, record=graphs)
        if self.ops is not EAGER_OPS and self.graphs is not None:
            self.compile_seconds = time.perf_counter() - t0
            log.info("compiled the layers (torch.compile) and recorded decode steps in %.1f s; inductor's caches "
                     "make the next start faster", self.compile_seconds)

    # ------------------------------------------------------------------------- forwards

    def forward(self, rows: list[RowIn]) -> tuple[torch.Tensor | None, list]:
        """A step's rows through the model and the cache, in as few forwards as padding allows
        (forward_groups); pages for the new tokens are reserved here (PagedKVCache.batch).
        Returns (the last-position logits of the rows that sample, [R, V] fp32 on the device,
        in row order, or None; per row its kept logits [n, V] on the host, or None). Raises
        OutOfPages if the pool cannot hold the new tokens (the scheduler makes sure it can)."""
        groups = forward_groups(rows)
        self.last_groups = groups
        if len(groups) == 1:
            return self._group(rows)
        parts, kept = [], [None] * len(rows)
        order = []  # each sampling row's index in `rows`, in the order of `parts`
        for g in groups:
            logits, k = self._group([rows[i] for i in g])
            if logits is not None:
                parts.append(logits)
                order += [i for i in g if rows[i].sample]
            for i, x in zip(g, k):
                kept[i] = x
        if not parts:
            return None, kept
        logits = torch.cat(parts)
        want = [i for i, r in enumerate(rows) if r.sample]
        if order != want:
            at = {i: j for j, i in enumerate(order)}
            logits = logits[[at[i] for i in want]]
        return logits, kept

    def _group(self, rows: list[RowIn]):
        """One forward of these rows (right-padded; padding is stored nowhere): a bucketed decode
        step when all feed one token and the static path is on, the general path otherwise."""
        hiding = any(r.hide is not None for r in rows)
        view = self.cache.batch([r.seq_id for r in rows], [r.n for r in rows], hide=hiding)
        if self.graphs is not None and all(r.n == 1 for r in rows) and self.graphs.usable(view):
            logits = self.graphs.run(view, rows)
            want = [i for i, r in enumerate(rows) if r.sample]
            return (logits if len(want) == len(rows) else logits[want]) if want else None, [None] * len(rows)
        return self._forward(rows, view, hiding)

    def _forward(self, rows: list[RowIn], view, hiding: bool):
        W = max(r.n for r in rows)
        # right padding repeats a row's last position: it is stored nowhere
        ids = [(r.ids or [0]) + [0] * (W - r.n) for r in rows]
        pos = [list(range(r.start, r.start + r.n)) + [r.start + r.n - 1] * (W - r.n) for r in rows]
        fed = [r.prev if r.ids is None else -1 for r in rows]
        hide = [r.hide or (-1, 1, 0) for r in rows]
        host = [torch.tensor(ids, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64)]
        if any(f >= 0 for f in fed) or hiding:
            host += [torch.tensor(fed, dtype=torch.int64), torch.tensor(hide, dtype=torch.int64)]
        dev = view.upload(*host)
        ids, pos = dev[0], dev[1]
        if len(dev) > 2:
            prev, hide = dev[2], dev[3]
            first = torch.where(prev >= 0, self.last_ids[prev.clamp(min=0)], ids[:, 0])
            ids = torch.cat([first[:, None], ids[:, 1:]], 1)
            if hiding:
                hit = first == hide[:, 0]
                view.hide = torch.stack([torch.where(hit, hide[:, 1], 1), torch.where(hit, hide[:, 2], 0)], 1)
        h = self.model.hidden_states(ids, pos, None, view, ops=self.ops)
        want = [i for i, r in enumerate(rows) if r.sample]
        logits = None
        if want and len(want) == len(rows) and all(r.n == W for r in rows):
            logits = self.model.logits(h[:, W - 1])
        elif want:
            logits = self.model.logits(h[want, [rows[i].n - 1 for i in want]])
        kept = [None if r.keep_from is None else self.model.logits(h[i, r.keep_from:r.n]).cpu()
                for i, r in enumerate(rows)]
        return logits, kept

    # ------------------------------------------------------------------------- sampling

    def sample(self, logits: torch.Tensor, draws: list[Draw]) -> Sampled:
        """Draw one token per row of logits [R, V] (paper §6.1 sampling: sampling.sample, on the
        device), <|block_end|> where a draw is forced, log-probabilities under the raw
        distribution where asked; store the ids in `last_ids` for the next step's rows and
        start their copy to the host (pinned, non-blocking on CUDA). Raises what sampling
        raises (a bad row: the engine then draws row by row)."""
        want = [d.logprobs for d in draws]
        lp_rows = [i for i, k in enumerate(want) if k is not None]
        lp = top = None
        if lp_rows:  # the model's full distribution, as a training forward computes it
            lp = torch.log_softmax(logits[lp_rows].float(), -1)
            k = max(want[i] for i in lp_rows)
            top = lp.topk(k, dim=-1) if k else None
        logits[:, self.vocab:] = float("-inf")  # the embedding may be padded beyond the tokenizer
        if self.tp is None or self.tp.size == 1 or self.tp.rank == 0:
            ids = sample(logits, [d.params for d in draws], [d.seed for d in draws], [d.counter for d in draws])
        else:
            ids = torch.empty(len(draws), dtype=torch.int64, device=self.device)
        if self.tp is not None and self.tp.size > 1:  # sampled once, on the group's first process
            torch.distributed.broadcast(ids, src=self.tp.src, group=self.tp.group)
        force = [d.force for d in draws]
        if any(force):
            ids = torch.where(torch.tensor(force, device=ids.device), self.block_end, ids)
        self.last_ids[:len(draws)] = ids
        host_lp = host_top = None
        cuda = self.device.type == "cuda"
        if cuda:
            host_ids = torch.empty(len(draws), dtype=torch.int64, pin_memory=True)
            host_ids.copy_(ids, non_blocking=True)
        else:
            host_ids = ids
        if lp is not None:
            chosen = lp.gather(1, ids[lp_rows][:, None])[:, 0]
            host_lp = _to_host(chosen, cuda)
            if top is not None:
                host_top = (_to_host(top.indices, cuda), _to_host(top.values, cuda))
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return Sampled(ids, host_ids, host_lp, host_top, force, want, event)

    def collect(self, s: Sampled) -> tuple[list[int], list[float | None], list[dict | None]]:
        """The host's copy of a step's samples: ids; the sampled token's log-probability per row
        (None where not asked, NaN where the draw was forced); the top-k {id: logprob} per row
        (None where not asked). Waits for that copy only (the device may run on)."""
        if s.event is not None:
            s.event.synchronize()
        ids = s.host_ids.tolist()
        lps, tops = [None] * len(ids), [None] * len(ids)
        if s.host_lp is not None:
            values = s.host_lp.tolist()
            idx, vals = (s.host_top[0].tolist(), s.host_top[1].tolist()) if s.host_top else (None, None)
            j = 0
            for i, k in enumerate(s.want):
                if k is None:
                    continue
                lps[i] = float("nan") if s.force[i] else values[j]
                if k:
                    tops[i] = dict(zip(idx[j][:k], vals[j][:k]))
                j += 1
        return ids, lps, tops


def _tp_ops(model, ops):
    """ops with the tensor-parallel all-reduce of a split model (sharding.tensor_parallel)."""
    tp = getattr(model, "tensor_parallel", None)
    return ops if tp is None or tp.size == 1 else with_reduce(ops, tp.all_reduce)


def forward_groups(rows: list[RowIn]) -> list[list[int]]:
    """Row indices split into forwards: longest chunk first, a row joins a forward while the
    padded size (rows x longest chunk) stays within twice the real tokens (decode rows of one
    token share one forward; a long prefill chunk runs apart from them). Paper §6.1."""
    groups, real = [], 0
    for i in sorted(range(len(rows)), key=lambda i: -rows[i].n):
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * rows[g[0]].n <= 2 * (real + rows[i].n):
            g.append(i)
            real += rows[i].n
        else:
            groups.append([i])
            real = rows[i].n
    return groups


def _to_host(t: torch.Tensor, cuda: bool) -> torch.Tensor:
    if not cuda:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
