"""Sampling (paper §6.1): what a request asks for, how one token is drawn, and the seed rule.

`SamplingParams` carries vLLM's names and meanings, with the paper's evaluation defaults
(temperature 0.6, top-p 0.95, top-k 20). `sample` draws one token per row of a batch, each
row with its own parameters, as the inverse CDF of its filtered distribution at one uniform
number from the request's own generator: a request gets the same tokens whatever runs beside
it. `request_seed` is the one rule that turns a run's seed into per-request seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # end of turn and end of text: the model's EOS tokens


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops; vLLM's names and meanings (paper §6.1 defaults).

    temperature: >= 0; 0 is greedy (argmax, no randomness drawn).
    top_p: nucleus mass kept, in (0, 1]. top_k: candidates kept (0 or -1: all).
    min_p: drop tokens below min_p x the most likely token's probability, in [0, 1].
    max_tokens: response tokens at most; None: as many as max_position_embeddings allows.
    stop: strings that end the response; matched on the decoded text across token
        boundaries, and the returned `Sequence.text` excludes them.
    stop_token_ids: token ids that end the response (the token is kept).
    ignore_eos: do not stop at the end-of-turn / end-of-text tokens (STOP_TOKENS).
    seed: the request's own random stream (None: torch's global CPU generator).
    logprobs: None: none; 0: the sampled token's log-probability (under the model's raw
        distribution, before temperature and filtering); k > 0: also the k most likely tokens'.
    Raises ValueError naming the field for a value out of range.
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    min_p: float = 0.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bad = []
        if not self.temperature >= 0:
            bad.append(f"temperature={self.temperature} (use >= 0; 0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad.append(f"top_p={self.top_p} (use a number in (0, 1])")
        if self.top_k < -1:
            bad.append(f"top_k={self.top_k} (use >= 1, or 0 / -1 for all tokens)")
        if not 0 <= self.min_p <= 1:
            bad.append(f"min_p={self.min_p} (use a number in [0, 1])")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad.append(f"max_tokens={self.max_tokens} (use >= 1)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad.append(f"stop={list(self.stop)!r} (use non-empty strings)")
        if self.logprobs is not None and self.logprobs < 0:
            bad.append(f"logprobs={self.logprobs} (use >= 0)")
        if bad:
            raise ValueError(f"SamplingParams: {'; '.join(bad)}")



def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list) -> torch.Tensor:
    """Draw one token per row (paper §6.1 sampling), each row with its own parameters:
    temperature, then top-k, min-p and top-p (nucleus), then inverse-CDF sampling.

    Args:
        logits: [B, V] float logits on any device.
        params: B SamplingParams (temperature <= 0: greedy argmax, no randomness drawn).
        gens: B CPU torch.Generators (None: torch's global CPU generator), one per row.
    Returns:
        [B] int64 token ids on logits' device.

    Seed semantics, the same on every device: each call draws exactly one uniform number
    u ~ U[0, 1) per sampled row from that row's generator on the CPU; the token is the first
    candidate, in descending probability, at which the cumulative filtered probability
    exceeds u times their total. The same generator state and logits therefore give the same
    token on CPU and CUDA (up to float rounding of the logits themselves).
    """
    V = logits.shape[-1]
    dev = logits.device
    out = logits.argmax(-1)
    rows = [r for r, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return out
    sub = [params[r] for r in rows]
    ks = [p.top_k if 0 < p.top_k < V else V for p in sub]
    temp = torch.tensor([p.temperature for p in sub], device=dev)[:, None]
    z = logits[rows].float() / temp
    kmax = max(ks)
    if kmax < V:
        cand, idx = torch.topk(z, kmax, dim=-1)  # sorted, largest first
    else:
        cand, idx = z.sort(-1, descending=True)
    if min(ks) < kmax:  # rows with a smaller top_k drop their tail
        cand = cand.masked_fill(torch.arange(kmax, device=dev)[None] >= torch.tensor(ks, device=dev)[:, None], float("-inf"))
    probs = torch.softmax(cand, -1)
    # top-p and min-p each keep a prefix of the sorted candidates; both apply (the shorter wins)
    top_p = torch.tensor([p.top_p for p in sub], device=dev)[:, None]
    drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
    min_p = torch.tensor([p.min_p for p in sub], device=dev)[:, None]
    probs = probs.masked_fill((drop & (top_p < 1.0)) | (probs < min_p * probs[:, :1]), 0.0)
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=gens[r]) for r in rows])[:, None].to(dev)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # u * total can round up to the total itself: fall back to the last kept candidate.
    choice = torch.minimum(choice, (probs > 0).sum(-1, keepdim=True) - 1)
    out[rows] = idx.gather(-1, choice).squeeze(-1)
    return out


def request_seed(seed: int | None, *index: int) -> int | None:
    """The sampling seed of one request of a run seeded with `seed` (None: None, torch's global
    generator): request i of generate.py is request_seed(seed, i); sample k of problem p of an
    evaluation or an RL step is request_seed(seed, p, k). Distinct indices give distinct
    streams, the same in every mode, batch and device."""
    if seed is None:
        return None
    for i in index:
        seed = seed * 1_000_003 + i
    return seed


def generation_config(tok, model_config, base: dict | None = None) -> dict:
    """generation_config.json for a checkpoint (paper §6.1 sampling): `base` (what the checkpoint
    it came from had) with SamplingParams' defaults and the tokenizer's stop tokens, so that
    transformers' generate() samples as this repository does. tok: a tokenizer.Tokenizer;
    model_config: a model.Qwen3Config."""
    sp = SamplingParams()
    out = dict(base or {})
    out.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
               eos_token_id=[tok.special_ids[s] for s in STOP_TOKENS if s in tok.special_ids])
    if "<|endoftext|>" in tok.special_ids:
        out.setdefault("pad_token_id", tok.special_ids["<|endoftext|>"])
    if model_config.bos_token_id is not None:
        out["bos_token_id"] = model_config.bos_token_id
    return out
