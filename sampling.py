"""Sampling (paper §6.1): what a request asks for, how one token is drawn, and the seed rule.

`SamplingParams` carries vLLM's names and meanings, with the paper's evaluation defaults
(temperature 0.6, top-p 0.95, top-k 20). `sample` draws one token per row of a batch, each
row with its own parameters, as the inverse CDF of its filtered distribution at one uniform
number that is a hash of (the request's seed, the token's index), computed on the device: a
request gets the same tokens whatever runs beside it, with no generator state to carry. `request_seed` is the one rule that turns a run's seed into per-request seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # end of turn and end of text: the model's EOS tokens


MAX_TEMPERATURE = 100.0
# Below this a positive temperature divides float32 logits into overflow (1e-300 is 0 in float32:
# inf, then NaN probabilities); vLLM raises such a temperature to 0.01 with a warning, this
# repository refuses it, so that a request gets what it asked for or an error.
MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops; vLLM's names and meanings (paper §6.1 defaults).

    temperature: 0 (greedy: argmax, no randomness drawn) or a number in [0.01, 100].
    top_p: nucleus mass kept, in (0, 1]. top_k: candidates kept (0 or -1: all).
    min_p: drop tokens below min_p x the most likely token's probability, in [0, 1].
    max_tokens: response tokens at most (>= 1); None: as many as max_position_embeddings allows.
    stop: strings that end the response; matched on the decoded text across token
        boundaries, and the returned `Sequence.text` excludes them. Each a non-empty str that
        is valid Unicode (no lone surrogate: it must have a UTF-8 encoding).
    stop_token_ids: token ids (ints >= 0) that end the response (the token is kept).
    ignore_eos: do not stop at the end-of-turn / end-of-text tokens (STOP_TOKENS).
    seed: an int, the request's random stream (any size: it is used modulo 2**64; None: a
        seed drawn from torch's global CPU generator when the request arrives, so
        torch.manual_seed makes a run reproducible).
    logprobs: None: none; 0: the sampled token's log-probability (under the model's raw
        distribution, before temperature and filtering); k > 0: also the k most likely tokens'.
    The numbers are checked by value and type (a bool is not a number; NaN, infinities and
    integers too large for a float fall outside every range), temperature, top_p and min_p
    are stored as floats. Raises ValueError, one line naming each bad field, its value and
    the range to use. Engine.add checks what depends on the model (ids below the
    tokenizer's vocabulary, logprobs, max_tokens against the positions).
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
        bad = []
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x and _utf8(x) for x in stop):
            bad.append(f"stop={show(self.stop)} (use non-empty strings of valid Unicode, no lone surrogates)")
        else:
            object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            bad.append(f"stop_token_ids={show(ids)} (use a list of token ids >= 0)")
        else:
            object.__setattr__(self, "stop_token_ids", tuple(ids))
        # comparisons with Python numbers are exact for any int and false for NaN: a bounded
        # range refuses NaN, infinities and 400-digit integers without converting them first
        t = self.temperature
        if not (_is_real(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
            bad.append(f"temperature={show(t)} (use 0 for greedy or a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}])")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            bad.append(f"top_p={show(self.top_p)} (use a number in (0, 1])")
        if not (_is_int(self.top_k) and self.top_k >= -1):
            bad.append(f"top_k={show(self.top_k)} (use an integer >= 1, or 0 / -1 for all tokens)")
        if not (_is_real(self.min_p) and 0 <= self.min_p <= 1):
            bad.append(f"min_p={show(self.min_p)} (use a number in [0, 1])")
        if self.max_tokens is not None and not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            bad.append(f"max_tokens={show(self.max_tokens)} (use an integer >= 1)")
        if not isinstance(self.ignore_eos, bool):
            bad.append(f"ignore_eos={show(self.ignore_eos)} (use true or false)")
        if self.seed is not None and not _is_int(self.seed):
            bad.append(f"seed={show(self.seed)} (use an integer)")
        if self.logprobs is not None and not (_is_int(self.logprobs) and self.logprobs >= 0):
            bad.append(f"logprobs={show(self.logprobs)} (use an integer >= 0)")
        if bad:
            raise ValueError(f"SamplingParams: {'; '.join(bad)}")
        for name in ("temperature", "top_p", "min_p"):  # in range, so float() cannot overflow
            object.__setattr__(self, name, float(getattr(self, name)))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _utf8(text: str) -> bool:
    """Whether text has a UTF-8 encoding (a str holding a lone surrogate, as JSON's "\\ud800"
    gives, has none)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def show(value, width: int = 40) -> str:
    """A value for a one-line error message (paper §6.1 sampling and serving): its repr cut to
    `width` characters; an integer of more than 18 digits by its size alone (its decimal
    string can be slower than the request deserves, and past 4,300 digits Python refuses to
    make it). Raises nothing."""
    if _is_int(value) and abs(value) >= 10**18:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        r = repr(value)
    except Exception:  # noqa: BLE001 -- a message must still come out
        r = f"<{type(value).__name__}>"
    return r if len(r) <= width else r[:width - 3] + "..."


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply finaliser) of x [..] int64 in [0, 2**32),
    in int64 arithmetic: a product of two 32-bit numbers wraps modulo 2**64 in torch on every
    device, and the low 32 bits kept are exact. Same bits on CPU and CUDA."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): a pure function of (seed, counter), computed on the
    tensors' device with no state (paper §6.1 sampling, made reproducible per request).

    Args:
        seeds: [B, 2] int64, a 64-bit seed as its low and high 32-bit halves (each in
            [0, 2**32)); counters: [B] int64 in [0, 2**32), here the index of the response
            token being drawn.
    Returns:
        [B] float64, hash(seed, counter) / 2**32. A request's numbers depend only on its own
        seed and token index: not on the batch it runs in, on preemption, or on the device.
    """
    h = _mix32(seeds[:, 0])
    h = _mix32(h ^ seeds[:, 1])
    h = _mix32(h ^ (counters & _M32))
    return h.double() / 2.0 ** 32


def seed_halves(seed: int) -> tuple[int, int]:
    """A Python int seed (any size, any sign) as the (low, high) 32-bit halves of it modulo
    2**64, the form `uniform` takes (paper §6.1 sampling). Raises nothing."""
    seed %= 1 << 64
    return seed & _M32, seed >> 32


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], counters: list[int]) -> torch.Tensor:
    """Draw one token per row (paper §6.1 sampling), each row with its own parameters:
    temperature, then top-k, min-p and top-p (nucleus), then inverse-CDF sampling at one
    counter-based uniform number per row.

    Args:
        logits: [B, V] float logits on any device.
        params: B SamplingParams (temperature 0: greedy argmax).
        seeds: B Python int seeds (one per request); counters: B ints in [0, 2**32), the
            index of the token each row draws.
    Returns:
        [B] int64 token ids on logits' device.

    Everything runs on logits' device, with the per-row parameters as tensors built from
    host values in one copy: nothing is read back (no host sync), so a sampler call can
    follow a forward without stalling it. The token is the first candidate, in descending
    probability, at which the cumulative filtered probability exceeds u times their total,
    with u = uniform(seed, counter): the same request gets the same tokens alone or in any
    batch, on CPU and CUDA (up to float rounding of the logits themselves).
    """
    B, V = logits.shape
    dev = logits.device
    greedy = logits.argmax(-1)
    if all(p.temperature == 0 for p in params):
        return greedy
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    kmax = max(ks)
    host = torch.tensor([[p.temperature, p.top_p, p.min_p, k] for p, k in zip(params, ks)], dtype=torch.float64)
    ints = torch.tensor([[*seed_halves(s), c] for s, c in zip(seeds, counters)], dtype=torch.int64)
    host, ints = host.to(dev, non_blocking=True), ints.to(dev, non_blocking=True)
    temp, top_p, min_p, top_k = (host[:, i:i + 1] for i in range(4))
    z = logits.float() / torch.where(temp > 0, temp, 1.0).float()
    if kmax < V:
        cand, idx = torch.topk(z, kmax, dim=-1)  # sorted, largest first
    else:
        cand, idx = z.sort(-1, descending=True)
    cand = cand.masked_fill(torch.arange(kmax, device=dev)[None] >= top_k, float("-inf"))  # each row's top_k
    probs = torch.softmax(cand, -1)
    # top-p and min-p each keep a prefix of the sorted candidates; both apply (the shorter wins)
    drop = probs.cumsum(-1) - probs > top_p.float()  # keep the smallest prefix reaching top_p
    probs = probs.masked_fill((drop & (top_p < 1.0)) | (probs < min_p.float() * probs[:, :1]), 0.0)
    cdf = probs.cumsum(-1)
    u = uniform(ints[:, :2], ints[:, 2])[:, None].float()
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # u * total can round up to the total itself: fall back to the last kept candidate.
    choice = torch.minimum(choice, (probs > 0).sum(-1, keepdim=True) - 1)
    return torch.where(temp[:, 0] > 0, idx.gather(-1, choice).squeeze(-1), greedy)


def request_seed(seed: int | None, *index: int) -> int | None:
    """The sampling seed of one request of a run seeded with `seed` (None: None, a seed drawn
    from torch's global generator): request i of generate.py is request_seed(seed, i); sample k of problem p of an
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
