"""The OpenMementos response layout (paper §3).

    <think>
    <|block_start|>T1<|block_end|>
    <|summary_start|>M1<|summary_end|>
    ...
    </think>
    final answer

`build_response` writes exactly this (block and memento texts stripped, one newline after
each closing token); `parse_response` accepts any whitespace between the special tokens.
"""
from __future__ import annotations

import re

from blocks import (BLOCK_END, BLOCK_START, MEMENTO_TOKENS, SUMMARY_END, SUMMARY_START, THINK_END, THINK_START,
                    BlockTracker, MementoConfig, MementoTokens)

__all__ = ["BLOCK_START", "BLOCK_END", "SUMMARY_START", "SUMMARY_END", "build_response",
           "parse_response"]

_SPECIAL = MEMENTO_TOKENS
_SPLIT = re.compile("(" + "|".join(map(re.escape, MEMENTO_TOKENS)) + ")")
# The special tokens as the ids the tracker reads: their index in MEMENTO_TOKENS (text is -1).
_PIECES = MementoTokens(0, 1, 2, 3, think_end=-2, assistant_header=(-3,))


def build_response(blocks: list[str], mementos: list[str], answer: str) -> str:
    """The assistant response for blocks with their mementos and the final answer (§3).

    Raises: ValueError if the counts differ, or a text contains a special token or
        <think>/</think> (the response would no longer parse unambiguously).
    """
    if len(blocks) != len(mementos):
        raise ValueError(f"{len(blocks)} blocks but {len(mementos)} mementos; need one memento per block")
    for t in list(blocks) + list(mementos) + [answer]:
        for tok in _SPECIAL + (THINK_START, THINK_END):
            if tok in t:
                raise ValueError(f"text contains the reserved token {tok}; remove it from the trace/memento")
    body = "".join(f"{BLOCK_START}{b.strip()}{BLOCK_END}\n{SUMMARY_START}{m.strip()}{SUMMARY_END}\n"
                   for b, m in zip(blocks, mementos))
    return f"{THINK_START}\n" + body + f"{THINK_END}\n" + answer


def parse_response(response: str) -> tuple[list[str], list[str], str]:
    """Split a response into (block texts, memento texts, answer), texts stripped (§3).

    The text is cut at the special tokens and read by blocks.BlockTracker, the parser the
    training masks and the engine use; the layout must be strict: nothing but whitespace
    outside block/memento pairs, every block summarized once, no nesting.
    Raises: ValueError naming the problem when <think>...</think> is missing, text stands
        outside block/memento pairs, or the special tokens are out of order.
    """
    text = response.lstrip()
    if not text.startswith(THINK_START) or THINK_END not in text:
        raise ValueError(f"response must start with {THINK_START} and contain {THINK_END}")
    inner, answer = text[len(THINK_START):].split(THINK_END, 1)
    pieces = _SPLIT.split(inner)  # text, special, text, special, ...: a special at every odd index
    ids = [MEMENTO_TOKENS.index(x) if i % 2 else -1 for i, x in enumerate(pieces)]
    tracker = BlockTracker(_PIECES, MementoConfig(-1, require_assistant_section=False))
    for t in ids:
        tracker.step(t)
    problems = tracker.problems()
    if problems:
        raise ValueError(f"special tokens out of order: {problems[0]} (counting text pieces and special tokens)")
    blocks = tracker.completed
    inside = {p for b in blocks for p in (*range(b.start + 1, b.end), *range(b.summary_start + 1, b.summary_end))}
    stray = [x for i, x in enumerate(pieces) if i % 2 == 0 and i not in inside and x.strip()]
    if stray:
        raise ValueError(f"unexpected text outside a block/memento pair: {stray[0][:60]!r}")
    if not blocks:
        raise ValueError("response has no <|block_start|>...<|summary_end|> pair")
    span = lambda lo, hi: "".join(pieces[lo + 1:hi]).strip()  # noqa: E731
    return [span(b.start, b.end) for b in blocks], [span(b.summary_start, b.summary_end) for b in blocks], answer.strip()
