"""Seed filtering and raw-trace parsing (paper §3).

A raw trace is an OpenThoughts-style `cot` string: "<think> reasoning </think> answer".
"""
from __future__ import annotations

import hashlib
import re
from typing import Callable

from blocks import MEMENTO_TOKENS, THINK_END, THINK_START

__all__ = ["THINK_OPEN", "THINK_CLOSE", "has_cjk", "think_parts", "trace_id", "seed_reason"]

THINK_OPEN, THINK_CLOSE = THINK_START, THINK_END
RESERVED = MEMENTO_TOKENS  # a raw trace must not contain them

# Han (incl. extension A/B and compatibility), kana, Hangul, CJK punctuation/fullwidth forms.
_CJK = re.compile("[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
                  "\uf900-\ufaff\uff00-\uffef\U00020000-\U0002a6df]")


def has_cjk(text: str) -> bool:
    """True if `text` contains any CJK character (ideographs, kana, Hangul, CJK punctuation)."""
    return _CJK.search(text) is not None


def think_parts(cot: str) -> tuple[str, str]:
    """Split a raw trace into (reasoning, answer) (§9.1).

    reasoning = the text between "<think>" (optional) and the first "</think>", stripped of
    leading and trailing whitespace; answer = the text after "</think>", stripped.
    Raises: ValueError if there is no "</think>" (seed filtering drops such traces first).
    """
    end = cot.find(THINK_CLOSE)
    if end < 0:
        raise ValueError("trace has no closing </think>; filter it out with seed_reason() first")
    head = cot[:end].lstrip()
    if head.startswith(THINK_OPEN):
        head = head[len(THINK_OPEN):]
    return head.strip(), cot[end + len(THINK_CLOSE):].strip()


def trace_id(trace: dict) -> str:
    """Stable key of a raw trace, used to resume: its task_id, else sha256 of the cot (16 hex)."""
    tid = trace.get("task_id")
    if tid not in (None, ""):
        return str(tid)
    return "sha256:" + hashlib.sha256(str(trace.get("cot", "")).encode("utf-8")).hexdigest()[:16]


def seed_reason(trace: dict, min_tokens: int, count_tokens: Callable[[str], int]) -> str | None:
    """Why a raw trace is dropped by seed filtering (§9.1), or None to keep it.

    Args: trace: dict with a string `cot`; min_tokens: minimum reasoning length (tokens,
        measured with count_tokens on the text inside <think>...</think>).
    Returns: one of "no_cot", "no_close_think", "cjk", "reserved_token" (a Memento special
        token or a second <think>/</think> in the text), "too_short", or None.
    """
    cot = trace.get("cot")
    if not isinstance(cot, str) or not cot.strip():
        return "no_cot"
    if THINK_CLOSE not in cot:
        return "no_close_think"
    if has_cjk(cot):
        return "cjk"
    body, answer = think_parts(cot)
    if any(tok in body or tok in answer for tok in RESERVED):
        return "reserved_token"  # the output layout could not be parsed back
    if THINK_OPEN in body or THINK_OPEN in answer or THINK_CLOSE in answer:
        return "reserved_token"
    if not body or count_tokens(body) < min_tokens:
        return "too_short"
    return None
