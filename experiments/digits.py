"""Synthetic digit-block traces for the probing experiment (paper §6.2).

The same format idea as data/toy_task.py, with 5 digits per block and 10 blocks: each block
adds five random digits to a running sum mod 10, one "qdp" triple per digit (sum so far q,
digit d, new sum p), and its memento keeps the block index and the sum so far:

    <think>
    <|block_start|>736 655 516 628 897<|block_end|><|summary_start|>b1=7<|summary_end|>...
    </think>
    3

(no newline between blocks in the real text.) The passcode of the probing protocol is the
five digits d of block T2. Its memento M2 states only the running sum, i.e. the passcode's
digit sum mod 10 plus known earlier values; given that, each passcode digit is still
uniform (`text_only_digit_accuracy`), so the memento TEXT alone gives a probe no per-digit
advantage over chance, and anything above 10% must come through the K/V values.
"""
from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
from data import toy_task

BASE = 10
DIGITS_PER_BLOCK = 5
BLOCKS = 10


@dataclass(frozen=True)
class Problem:
    """`blocks` blocks of `per_block` digits starting from running sum `start` (0-9)."""

    blocks: int = BLOCKS
    start: int = 0
    per_block: int = DIGITS_PER_BLOCK

    @property
    def prompt(self) -> str:
        """The user message (ChatML is applied by the tokenizer)."""
        return f"sum {self.blocks} blocks of {self.per_block} from {self.start}"


def render(problem: Problem, digits: list[list[int]]) -> str:
    """The response text for given digits [blocks][per_block] (ints 0-9).

    Raises ValueError if the digit array does not match the problem's shape.
    """
    if len(digits) != problem.blocks or any(len(d) != problem.per_block for d in digits):
        raise ValueError(f"digits must be [{problem.blocks}][{problem.per_block}]")
    s, out = problem.start, ["<think>\n"]
    for b, ds in enumerate(digits, 1):
        steps = []
        for d in ds:
            steps.append(f"{s}{d}{(s + d) % BASE}")
            s = (s + d) % BASE
        out.append(f"<|block_start|>{' '.join(steps)}<|block_end|><|summary_start|>b{b}={s}<|summary_end|>")
    out.append(f"\n</think>\n{s}")
    return "".join(out)


def sample(rng: random.Random, blocks: int = BLOCKS, per_block: int = DIGITS_PER_BLOCK) -> tuple[Problem, str, list[list[int]]]:
    """A random problem (start uniform 0-9), uniform random digits, and the correct response.

    Returns (problem, response text, digits [blocks][per_block]).
    """
    prob = Problem(blocks, rng.randrange(BASE), per_block)
    digits = [[rng.randrange(BASE) for _ in range(per_block)] for _ in range(blocks)]
    return prob, render(prob, digits), digits


def write_jsonl(path: str | Path, n: int, seed: int) -> Path:
    """Write n OpenMementos-schema records {problem, response, domain, source} to path."""
    rng = random.Random(f"digits:{seed}")
    path = Path(path)
    with path.open("w") as f:
        for _ in range(n):
            prob, resp, _ = sample(rng)
            f.write(json.dumps({"problem": prob.prompt, "response": resp, "domain": "toy",
                                "source": "experiments/digits.py"}) + "\n")
    return path


PROMPT_RE = re.compile(r"^sum (\d+) blocks of (\d+) from (\d)$")


def parse_prompt(prompt: str) -> Problem | None:
    """The Problem a prompt states, or None."""
    m = PROMPT_RE.match(prompt.strip())
    return Problem(int(m.group(1)), int(m.group(3)), int(m.group(2))) if m else None


def check_trace(problem: Problem, text: str) -> dict:
    """Check a generated response from its text: data/toy_task.check_trace with this task's
    block size. Returns {"correct": bool, "reason": str, "blocks": int}."""
    return toy_task.check_trace(problem, text, per_block=problem.per_block)


def text_only_digit_accuracy(per_block: int = DIGITS_PER_BLOCK) -> float:
    """Bayes-optimal per-digit accuracy of guessing the passcode digits from its digit sum
    mod 10 alone (what the memento text reveals), by exact enumeration of all 10^per_block
    passcodes. Returns a float in [0, 1] (0.1 for uniform digits: the sum gives no
    per-digit information)."""
    counts: dict = {}
    for combo in itertools.product(range(BASE), repeat=per_block):
        s = sum(combo) % BASE
        for i, d in enumerate(combo):
            counts[(s, i, d)] = counts.get((s, i, d), 0) + 1
    best = 0
    for s in range(BASE):
        for i in range(per_block):
            best += max(counts.get((s, i, d), 0) for d in range(BASE))
    return best / (BASE ** per_block * per_block)
