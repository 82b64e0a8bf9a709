"""Boundary scoring by an LLM (paper §3).

Boundary i lies between sentence i and i+1 (n sentences, n-1 boundaries). The trace is
cut into windows of consecutive sentences; consecutive windows share their edge sentence,
so every boundary is asked exactly once per pass. One pass gives integers 0..3; two passes
with coprime window sizes (16 and 11) place window edges at different sentences, and
their average lies on the 0.5 grid that `segment` accepts.
"""
from __future__ import annotations

from .llm import ChatClient
from .prompts import boundary_messages

__all__ = ["windows", "parse_boundary_scores", "score_boundaries", "score_two_pass"]


def windows(n: int, size: int) -> list[tuple[int, int]]:
    """Inclusive sentence windows (first, last) of at most `size` sentences covering
    boundaries 0..n-2 exactly once (consecutive windows share one sentence).

    Raises: ValueError if size < 2.
    """
    if size < 2:
        raise ValueError(f"window size {size} must be >= 2 sentences (a window needs a boundary)")
    out, first = [], 0
    while first < n - 1:
        last = min(first + size - 1, n - 1)
        out.append((first, last))
        first = last
    return out


def parse_boundary_scores(obj, expected: list[int]) -> dict[int, int]:
    """Validate a scoring reply {"scores": [{"boundary": i, "score": s}, ...]} (§9.3).

    Returns {boundary: score}. Raises ValueError unless every expected boundary appears
    exactly once, no other boundary appears, and every score is an integer in 0..3.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("scores"), list):
        raise ValueError('expected an object {"scores": [...]}')
    got: dict[int, int] = {}
    for item in obj["scores"]:
        if not isinstance(item, dict):
            raise ValueError(f"score entry {item!r} is not an object")
        b, s = item.get("boundary"), item.get("score")
        if type(b) is not int or type(s) is not int:
            raise ValueError(f"score entry {item!r} needs integer boundary and score")
        if not 0 <= s <= 3:
            raise ValueError(f"score {s} for boundary {b} is outside 0..3")
        if b in got:
            raise ValueError(f"boundary {b} scored twice")
        got[b] = s
    if set(got) != set(expected):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        raise ValueError(f"boundaries missing {missing}, unexpected {extra}")
    return got


def score_boundaries(client: ChatClient, sentences: list[str], window: int = 16) -> list[int]:
    """One scoring pass: n-1 integer scores 0..3 (§9.3).

    Args: client: chat client; sentences: the trace's sentences; window: sentences per
        request (window-1 boundaries each).
    Raises: LLMError if the endpoint keeps failing or keeps replying malformed JSON.
    """
    n = len(sentences)
    scores = [0] * max(n - 1, 0)
    for first, last in windows(n, window):
        expected = list(range(first, last))
        got = client.chat_json(boundary_messages(sentences[first:last + 1], first),
                               lambda o, e=expected: parse_boundary_scores(o, e))
        for b, s in got.items():
            scores[b] = s
    return scores


def score_two_pass(client: ChatClient, sentences: list[str], sizes: tuple[int, int] = (16, 11)) -> list[float]:
    """Two scoring passes with coprime window sizes, averaged: n-1 multiples of 0.5 (§9.3)."""
    a = score_boundaries(client, sentences, sizes[0])
    b = score_boundaries(client, sentences, sizes[1])
    return [(x + y) / 2 for x, y in zip(a, b)]
