"""The embedded default task: running sums carried through mementos (paper §3 format, §4 training).

The prompt asks for N blocks of digit additions starting from a value s:

    sum 4 blocks from 7

The response is a chain of blocks. Each block adds three digits it chooses itself, one step
per triple "qdp": the sum so far q, the digit d, the new sum p = q + d mod 10. Its memento
keeps what later blocks need: the block index and the sum so far ("b2=7": after block 2 the
sum is 7). The answer is the final sum:

    <think>
    <|block_start|>736 655 516<|block_end|><|summary_start|>b1=6<|summary_end|><|block_start|>628 897 707<|block_end|>...
    </think>
    7

The first q of a block restates the previous memento's sum (the prompt's start for block 1).

(one line per block above for reading; the real response has no newline between blocks:
with the byte-level tokenizer every character is a token, and 18 tokens per block keep a
training step cheap on a CPU.)

Once a block is masked (keep_last_n_blocks=0) its digits are gone: the next block, the block
count and the answer can only come from the mementos, so the task measures whether state
passes through them. Showing each step keeps every prediction a small lookup (a memento that
added four numbers at once was not learnable from scratch in minutes when this was designed).
Problems have 3 to 6 blocks (MIN_BLOCKS, MAX_BLOCKS) and a start from 0 to 9: the models
trained here have seen nothing else.
Correctness is checked from the text alone (`check_trace`): the digits are the model's own.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

BASE = 10
DIGITS_PER_BLOCK = 3
MIN_BLOCKS, MAX_BLOCKS = 3, 6


@dataclass(frozen=True)
class Problem:
    """One task instance: `blocks` blocks starting from running sum `start` (0-9)."""

    blocks: int
    start: int

    @property
    def prompt(self) -> str:
        """The user message (ChatML is applied by the tokenizer)."""
        return f"sum {self.blocks} blocks from {self.start}"


def sample_problem(rng: random.Random, min_blocks: int = MIN_BLOCKS, max_blocks: int = MAX_BLOCKS) -> Problem:
    """A random problem: block count uniform in [min_blocks, max_blocks], start uniform 0-9."""
    return Problem(rng.randint(min_blocks, max_blocks), rng.randrange(BASE))


def solve(problem: Problem, rng: random.Random) -> tuple[str, list[list[int]]]:
    """A correct response for `problem` with random digits, and the digits of each block.

    Returns the response text (OpenMementos `response` layout, paper §3) and
    digits [blocks][DIGITS_PER_BLOCK].
    """
    s, out, all_digits = problem.start, ["<think>\n"], []
    for b in range(1, problem.blocks + 1):
        digits = [rng.randrange(BASE) for _ in range(DIGITS_PER_BLOCK)]
        steps = []
        p = s
        for d in digits:
            steps.append(f"{p}{d}{(p + d) % BASE}")
            p = (p + d) % BASE
        out.append(f"<|block_start|>{' '.join(steps)}<|block_end|><|summary_start|>b{b}={p}<|summary_end|>")
        s = p
        all_digits.append(digits)
    out.append(f"\n</think>\n{s}")
    return "".join(out), all_digits


def example(seed: int, index: int) -> dict:
    """Example `index` of the stream seeded by `seed` (same pair, same example, on any
    machine): an OpenMementos `default` record {problem, response, domain, source}."""
    rng = random.Random(f"{seed}:{index}")
    prob = sample_problem(rng)
    response, _ = solve(prob, rng)
    return {"problem": prob.prompt, "response": response, "domain": "toy", "source": "embedded running-sum task"}


PROMPT_RE = re.compile(r"^sum (\d+) blocks from (\d)$")
BLOCK_RE = re.compile(r"<\|block_start\|>((?:\d\d\d ?)+)<\|block_end\|><\|summary_start\|>b(\d+)=(\d)<\|summary_end\|>")


def parse_prompt(prompt: str) -> Problem | None:
    """The Problem a prompt states, or None if it is not a prompt of this task."""
    m = PROMPT_RE.match(prompt.strip())
    return Problem(int(m.group(1)), int(m.group(2))) if m else None


def split_response(text: str) -> tuple[str, str] | dict:
    """(the reasoning between "<think>\\n" and "\\n</think>\\n", the answer after it) of a
    response, chat end tokens dropped; or a failed check {"correct": False, "reason",
    "blocks": 0} when it does not open with <think> or never closes it. Every checker of this
    format starts here (paper §3 trace format)."""
    text = text.replace("<|im_end|>", "").replace("<|endoftext|>", "")
    if not text.startswith("<think>\n"):
        return {"correct": False, "reason": "does not open with <think>", "blocks": 0}
    body, sep, answer = text[len("<think>\n"):].partition("\n</think>\n")
    if not sep:
        return {"correct": False, "reason": "no </think>", "blocks": 0}
    return body, answer


def check_trace(problem: Problem, text: str, per_block: int = DIGITS_PER_BLOCK) -> dict:
    """Verify a generated response against the task's rules, from the text alone.

    Correct iff: it opens with <think>, holds exactly problem.blocks well-formed blocks; each
    block starts from the previous memento's sum (the problem's start for the first); every
    step adds its digit mod 10; every memento states its block index and the block's last
    partial sum; and the answer after </think> equals the last sum.

    Args:
        problem: the Problem the prompt stated (anything with .blocks and .start).
        text: the decoded response (special tokens as text; a trailing <|im_end|> is ignored).
        per_block: steps per block (experiments/digits.py reuses this checker with 5).
    Returns:
        {"correct": bool, "reason": str, "blocks": int}; reason names the first error.
    """
    parts = split_response(text)
    if isinstance(parts, dict):
        return parts
    body, answer = parts
    pos, s, n = 0, problem.start, 0
    while pos < len(body):
        m = BLOCK_RE.match(body, pos)
        if not m:
            return {"correct": False, "reason": f"malformed block after {n} blocks", "blocks": n}
        n += 1
        steps, idx, memo = m.group(1).split(), int(m.group(2)), int(m.group(3))
        if int(steps[0][0]) != s:
            return {"correct": False, "reason": f"block {n} starts from {steps[0][0]}, memento said {s}", "blocks": n}
        if len(steps) != per_block:
            return {"correct": False, "reason": f"block {n} has {len(steps)} steps", "blocks": n}
        p = s
        for st in steps:
            q, d, r = int(st[0]), int(st[1]), int(st[2])
            if q != p or r != (p + d) % BASE:
                return {"correct": False, "reason": f"block {n}: wrong step {st}", "blocks": n}
            p = r
        if idx != n or memo != p:
            return {"correct": False, "reason": f"memento {n} says b{idx}={memo}, expected b{n}={p}", "blocks": n}
        s, pos = p, m.end()
    if n != problem.blocks:
        return {"correct": False, "reason": f"{n} blocks, prompt asked for {problem.blocks}", "blocks": n}
    if answer.strip() != str(s):
        return {"correct": False, "reason": f"answer {answer.strip()!r}, expected {s}", "blocks": n}
    return {"correct": True, "reason": "ok", "blocks": n}
