"""Mementos: LLM compression of a block, graded by an LLM judge, refined with its
feedback (paper §3).

Round 0 writes a memento; every round is graded 0-10 (formulas 0-3, values 0-2, methods
0-2, validation 0-1, no hallucination 0-1, result-first 0-1; the total is the sum of the
parts, computed here, not trusted from the model). While the last grade is below the
threshold (8) and fewer than `max_refinements` (2) refinements were made, the memento is
rewritten with the judge's feedback. The kept memento is the best-graded round (the later
one on ties); every round's grade is recorded.
"""
from __future__ import annotations

from typing import Callable

from .llm import ChatClient
from .prompts import JUDGE_CRITERIA, compress_messages, judge_messages, refine_messages
from .seed import RESERVED
from .tokens import approx_tokens

__all__ = ["parse_memento", "parse_judgement", "make_memento"]


def parse_memento(obj) -> str:
    """Validate a compressor reply {"memento": "<non-empty text>"}; return the stripped text.

    Raises ValueError on any other shape or if the text contains a special token or
    <think>/</think> (the response layout would break).
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("memento"), str) or not obj["memento"].strip():
        raise ValueError('expected {"memento": "<non-empty text>"}')
    for tok in RESERVED + ("<think>", "</think>"):
        if tok in obj["memento"]:
            raise ValueError(f"memento contains the reserved token {tok}")
    return obj["memento"].strip()


def parse_judgement(obj) -> tuple[int, str, dict]:
    """Validate a judge reply {"scores": {criterion: int}, "feedback": str} (§9.5).

    Returns (total 0..10, feedback, per-criterion points). Raises ValueError if a criterion
    is missing, unknown, not an integer or outside its range, or feedback is not a string.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("scores"), dict):
        raise ValueError('expected {"scores": {...}, "feedback": "..."}')
    parts = obj["scores"]
    if set(parts) != set(JUDGE_CRITERIA):
        raise ValueError(f"judge criteria {sorted(parts)} != {sorted(JUDGE_CRITERIA)}")
    for k, (hi, _) in JUDGE_CRITERIA.items():
        v = parts[k]
        if type(v) is not int or not 0 <= v <= hi:
            raise ValueError(f"judge points {k}={v!r} must be an integer in 0..{hi}")
    if not isinstance(obj.get("feedback"), str):
        raise ValueError("judge feedback must be a string")
    return sum(parts.values()), obj["feedback"], dict(parts)


def make_memento(client: ChatClient, block: str, context: str = "", threshold: int = 8,
                 max_refinements: int = 2, judge: ChatClient | None = None,
                 count_tokens: Callable[[str], int] = approx_tokens) -> dict:
    """Write, grade and refine the memento of one block (§9.5).

    Args: client: compressor endpoint; block: the block's text; context: earlier mementos
        of the trace; threshold: grade (0-10) at which refinement stops; max_refinements:
        at most this many rewrites; judge: judge endpoint (default: the same client);
        count_tokens: sets the length target, 15% of the block's tokens (at least 16).
    Returns: {"memento": str, "scores": [grade per round], "feedback": [per round],
        "parts": [per-criterion points per round]}.
    Raises: LLMError when an endpoint keeps failing.
    """
    judge = judge or client
    target = max(16, round(0.15 * count_tokens(block)))
    memento = client.chat_json(compress_messages(block, target, context), parse_memento)
    rounds = []
    while True:
        score, feedback, parts = judge.chat_json(judge_messages(block, memento), parse_judgement)
        rounds.append({"memento": memento, "score": score, "feedback": feedback, "parts": parts})
        if score >= threshold or len(rounds) > max_refinements:
            break
        memento = client.chat_json(refine_messages(block, memento, feedback, target), parse_memento)
    best = max(range(len(rounds)), key=lambda r: (rounds[r]["score"], r))
    return {"memento": rounds[best]["memento"],
            "scores": [r["score"] for r in rounds],
            "feedback": [r["feedback"] for r in rounds],
            "parts": [r["parts"] for r in rounds]}
