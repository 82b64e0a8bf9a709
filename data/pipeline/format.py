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

__all__ = ["BLOCK_START", "BLOCK_END", "SUMMARY_START", "SUMMARY_END", "build_response",
           "parse_response"]

BLOCK_START, BLOCK_END = "<|block_start|>", "<|block_end|>"
SUMMARY_START, SUMMARY_END = "<|summary_start|>", "<|summary_end|>"
_SPECIAL = (BLOCK_START, BLOCK_END, SUMMARY_START, SUMMARY_END)
_PAIR = re.compile(r"\s*" + re.escape(BLOCK_START) + r"(.*?)" + re.escape(BLOCK_END) + r"\s*"
                   + re.escape(SUMMARY_START) + r"(.*?)" + re.escape(SUMMARY_END), re.S)


def build_response(blocks: list[str], mementos: list[str], answer: str) -> str:
    """The assistant response for blocks with their mementos and the final answer (§3).

    Raises: ValueError if the counts differ, or a text contains a special token or
        <think>/</think> (the response would no longer parse unambiguously).
    """
    if len(blocks) != len(mementos):
        raise ValueError(f"{len(blocks)} blocks but {len(mementos)} mementos; need one memento per block")
    for t in list(blocks) + list(mementos) + [answer]:
        for tok in _SPECIAL + ("<think>", "</think>"):
            if tok in t:
                raise ValueError(f"text contains the reserved token {tok}; remove it from the trace/memento")
    body = "".join(f"{BLOCK_START}{b.strip()}{BLOCK_END}\n{SUMMARY_START}{m.strip()}{SUMMARY_END}\n"
                   for b, m in zip(blocks, mementos))
    return "<think>\n" + body + "</think>\n" + answer


def parse_response(response: str) -> tuple[list[str], list[str], str]:
    """Split a response into (block texts, memento texts, answer), texts stripped (§3).

    Raises: ValueError naming the problem when <think>...</think> is missing, text stands
        outside block/memento pairs, or the special tokens are out of order.
    """
    text = response.lstrip()
    if not text.startswith("<think>") or "</think>" not in text:
        raise ValueError("response must start with <think> and contain </think>")
    inner, answer = text[len("<think>"):].split("</think>", 1)
    blocks, mementos, pos = [], [], 0
    for m in _PAIR.finditer(inner):
        if m.start() != pos:
            raise ValueError(f"unexpected text before a block at character {pos}: {inner[pos:m.start()][:60]!r}")
        b, s = m.group(1), m.group(2)
        if any(tok in b or tok in s for tok in _SPECIAL):
            raise ValueError("special tokens out of order inside a block/memento pair")
        blocks.append(b.strip())
        mementos.append(s.strip())
        pos = m.end()
    if inner[pos:].strip():
        raise ValueError(f"unexpected text after the last memento: {inner[pos:][:60]!r}")
    if not blocks:
        raise ValueError("response has no <|block_start|>...<|summary_end|> pair")
    return blocks, mementos, answer.strip()
