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

A second design, `design="cumulative"` (as in the paper's toy, §6.2.2): each block writes its
five digits with block-local partial sums from 0 ("d:ss", ss = the block's sum so far, two
digits) and never restates the previous memento; each memento states the three-digit sum of
ALL digits so far ("b2=047"). Computing a memento therefore needs the previous memento (its
text, or its K/V): the design in which a block's information could travel from memento to
memento. Here the memento texts (all of them together) reveal T2's exact digit sum, so the
text-only bound is above 10% (`text_only_digit_accuracy(design="cumulative")`).

    <|block_start|>7:07 3:10 5:15 1:16 9:25<|block_end|><|summary_start|>b2=047<|summary_end|>
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
DESIGNS = ("restate", "cumulative")


@dataclass(frozen=True)
class Problem:
    """`blocks` blocks of `per_block` digits starting from running sum `start` (0-9; the
    cumulative design always starts from 0), in one of DESIGNS."""

    blocks: int = BLOCKS
    start: int = 0
    per_block: int = DIGITS_PER_BLOCK
    design: str = "restate"

    @property
    def prompt(self) -> str:
        """The user message (ChatML is applied by the tokenizer)."""
        if self.design == "cumulative":
            return f"add {self.blocks} blocks of {self.per_block} cumulatively"
        return f"sum {self.blocks} blocks of {self.per_block} from {self.start}"


def render(problem: Problem, digits: list[list[int]]) -> str:
    """The response text for given digits [blocks][per_block] (ints 0-9).

    Raises ValueError if the digit array does not match the problem's shape.
    """
    if len(digits) != problem.blocks or any(len(d) != problem.per_block for d in digits):
        raise ValueError(f"digits must be [{problem.blocks}][{problem.per_block}]")
    if problem.design == "cumulative":
        total, out = 0, ["<think>\n"]
        for b, ds in enumerate(digits, 1):
            local, steps = 0, []
            for d in ds:
                local += d
                steps.append(f"{d}:{local:02d}")
            total += local
            out.append(f"<|block_start|>{' '.join(steps)}<|block_end|><|summary_start|>b{b}={total:03d}<|summary_end|>")
        out.append(f"\n</think>\n{total:03d}")
        return "".join(out)
    s, out = problem.start, ["<think>\n"]
    for b, ds in enumerate(digits, 1):
        steps = []
        for d in ds:
            steps.append(f"{s}{d}{(s + d) % BASE}")
            s = (s + d) % BASE
        out.append(f"<|block_start|>{' '.join(steps)}<|block_end|><|summary_start|>b{b}={s}<|summary_end|>")
    out.append(f"\n</think>\n{s}")
    return "".join(out)


def sample(rng: random.Random, blocks: int = BLOCKS, per_block: int = DIGITS_PER_BLOCK,
           design: str = "restate") -> tuple[Problem, str, list[list[int]]]:
    """A random problem (start uniform 0-9 in the restate design), uniform random digits, and
    the correct response. Returns (problem, response text, digits [blocks][per_block])."""
    prob = Problem(blocks, rng.randrange(BASE) if design == "restate" else 0, per_block, design)
    digits = [[rng.randrange(BASE) for _ in range(per_block)] for _ in range(blocks)]
    return prob, render(prob, digits), digits


def write_jsonl(path: str | Path, n: int, seed: int, design: str = "restate") -> Path:
    """Write n OpenMementos-schema records {problem, response, domain, source} to path."""
    rng = random.Random(f"digits:{seed}" if design == "restate" else f"digits:{design}:{seed}")
    path = Path(path)
    with path.open("w") as f:
        for _ in range(n):
            prob, resp, _ = sample(rng, design=design)
            f.write(json.dumps({"problem": prob.prompt, "response": resp, "domain": "toy",
                                "source": "experiments/digits.py"}) + "\n")
    return path


PROMPT_RE = re.compile(r"^sum (\d+) blocks of (\d+) from (\d)$")
CUMULATIVE_RE = re.compile(r"^add (\d+) blocks of (\d+) cumulatively$")
_CUM_BLOCK_RE = re.compile(r"<\|block_start\|>([^<]*)<\|block_end\|><\|summary_start\|>b(\d+)=(\d{3})<\|summary_end\|>")


def parse_prompt(prompt: str) -> Problem | None:
    """The Problem a prompt states (either design), or None."""
    m = PROMPT_RE.match(prompt.strip())
    if m:
        return Problem(int(m.group(1)), int(m.group(3)), int(m.group(2)))
    m = CUMULATIVE_RE.match(prompt.strip())
    return Problem(int(m.group(1)), 0, int(m.group(2)), "cumulative") if m else None


def check_trace(problem: Problem, text: str) -> dict:
    """Check a generated response from its text. Restate design: data/toy_task.check_trace
    with this task's block size. Cumulative design: `problem.blocks` blocks of `per_block`
    "d:ss" steps whose ss are the block's partial sums from 0, each memento the three-digit
    sum of all digits so far, the answer the last memento's value.
    Returns {"correct": bool, "reason": str, "blocks": int}."""
    if problem.design != "cumulative":
        return toy_task.check_trace(problem, text, per_block=problem.per_block)
    parts = toy_task.split_response(text)
    if isinstance(parts, dict):
        return parts
    body, answer = parts
    pos, total, n = 0, 0, 0
    while pos < len(body):
        m = _CUM_BLOCK_RE.match(body, pos)
        if not m:
            return {"correct": False, "reason": f"malformed block after {n} blocks", "blocks": n}
        n, local = n + 1, 0
        steps = m.group(1).split()
        if len(steps) != problem.per_block or not all(re.fullmatch(r"\d:\d\d", st) for st in steps):
            return {"correct": False, "reason": f"block {n}: malformed steps", "blocks": n}
        for st in steps:
            local += int(st[0])
            if int(st[2:]) != local:
                return {"correct": False, "reason": f"block {n}: wrong partial sum {st}", "blocks": n}
        total += local
        if int(m.group(2)) != n or int(m.group(3)) != total:
            return {"correct": False, "reason": f"memento {n} says b{m.group(2)}={m.group(3)}, expected b{n}={total:03d}",
                    "blocks": n}
        pos = m.end()
    if n != problem.blocks:
        return {"correct": False, "reason": f"{n} blocks, expected {problem.blocks}", "blocks": n}
    if answer.strip() != f"{total:03d}":
        return {"correct": False, "reason": f"answer {answer.strip()!r}, expected {total:03d}", "blocks": n}
    return {"correct": True, "reason": "ok", "blocks": n}


def text_only_digit_accuracy(per_block: int = DIGITS_PER_BLOCK, design: str = "restate") -> float:
    """Bayes-optimal per-digit accuracy of guessing the passcode digits from what the memento
    texts reveal about them, by exact enumeration of all 10^per_block passcodes: their digit
    sum mod 10 (restate design), or their exact digit sum (cumulative design: the difference
    of mementos M2 and M1). Returns a float in [0, 1] (restate: 0.1, no per-digit
    information; cumulative: above 0.1, since an extreme sum pins the digits down)."""
    counts: dict = {}
    for combo in itertools.product(range(BASE), repeat=per_block):
        s = sum(combo) % BASE if design == "restate" else sum(combo)
        for i, d in enumerate(combo):
            counts[(s, i, d)] = counts.get((s, i, d), 0) + 1
    best = 0
    for s in range(BASE if design == "restate" else (BASE - 1) * per_block + 1):
        for i in range(per_block):
            best += max(counts.get((s, i, d), 0) for d in range(BASE))
    return best / (BASE ** per_block * per_block)
