"""Sentence splitting of a reasoning trace (paper §3).

Whitespace rule: every sentence keeps the whitespace that follows it, so
``"".join(split_sentences(text)) == text`` exactly (no normalization at all). Callers
that need clean text strip each sentence.

Steps:
1. Atomic units: code fences (```...```, an unclosed fence runs to the end of the text),
   display math ($$...$$, \\[...\\], \\begin{env}...\\end{env}; an unclosed one is treated as
   prose) are never cut.
2. Prose is split after '.', '?' or '!' (plus closing quotes/brackets) followed by
   whitespace, except inside parentheses/brackets, inline math \\(...\\) or $...$, after
   common abbreviations (e.g., i.e., etc., Dr., vs., ...) and after a list number at the
   start of a line ("1."). A blank line always ends a sentence and resets the
   parenthesis/math state (so one stray "(" cannot swallow the rest of the trace).
3. Merges, in this order: consecutive math units (display math, or a sentence that is only
   inline math) into one; a sentence ending in ':' onto the next; a sentence starting
   with Therefore/Thus/So into the previous; fragments under `min_fragment_tokens` tokens
   into the previous (the first one into the next).
Only the last sentence can end in ':' (when the text itself does).
"""
from __future__ import annotations

import re
from typing import Callable

from .tokens import approx_tokens

__all__ = ["split_sentences", "protected_spans"]

ABBREVIATIONS = frozenset("""e.g. i.e. etc. dr. vs. mr. mrs. ms. prof. fig. figs. eq. eqs.
approx. cf. al. resp. no. st. jr. sr. vol. pp. ca. viz. def. thm. lem. sec. ch.""".split())

_CONTINUATION = re.compile(r"(Therefore|Thus|So)\b")
# one inline-math span and nothing else but trailing punctuation
_INLINE_MATH_ONLY = re.compile(r"(\\\((?:(?!\\\)).)*\\\)|\$[^$]+\$)[\s.,;]*", re.S)
_BEGIN = re.compile(r"\\begin\{([^}]+)\}")
_OPENERS = re.compile(r"```|\$\$|\\\[|\\begin\{")


def protected_spans(text: str) -> list[tuple[int, int, str]]:
    """Atomic spans of `text` as (start, end, kind) with kind "code" or "math" (§9.2).

    Code fences ```...``` (unclosed: to the end of the text) and display math $$...$$,
    \\[...\\], \\begin{env}...\\end{env} (unclosed: not protected). Spans do not overlap;
    the earliest opener wins, so math inside a code fence stays code.
    """
    spans = []
    pos = 0
    while True:
        m = _OPENERS.search(text, pos)
        if m is None:
            return spans
        a, tok = m.start(), m.group(0)
        if tok == "```":
            e = text.find("```", a + 3)
            end = len(text) if e < 0 else e + 3
            spans.append((a, end, "code"))
            pos = end
            continue
        if tok == "$$":
            e = text.find("$$", a + 2)
            end = -1 if e < 0 else e + 2
        elif tok == "\\[":
            e = text.find("\\]", a + 2)
            end = -1 if e < 0 else e + 2
        else:
            env = _BEGIN.match(text, a)
            closing = "\\end{%s}" % env.group(1) if env else None
            e = text.find(closing, a) if closing else -1
            end = -1 if e < 0 else e + len(closing)
        if end < 0:
            pos = a + len(tok)
            continue
        spans.append((a, end, "math"))
        pos = end


def _is_abbreviation_or_list_number(text: str, start: int, dot: int) -> bool:
    ws = max(text.rfind(" ", start, dot), text.rfind("\n", start, dot), text.rfind("\t", start, dot))
    word_start = ws + 1 if ws >= 0 else start
    word = text[word_start:dot + 1].lstrip("([{\"'").lower()
    if word in ABBREVIATIONS:
        return True
    if word[:-1].isdigit() and (word_start == 0 or text[word_start - 1] == "\n" or word_start == start):
        return True  # "1." opening a list item, not a sentence end
    return False


def _split_prose(text: str) -> list[str]:
    out = []
    start = i = 0
    n = len(text)
    depth = 0
    in_dollar = in_paren_math = False
    while i < n:
        c = text[i]
        if c.isspace():
            j = i
            while j < n and text[j].isspace():
                j += 1
            if text.count("\n", i, j) >= 2:
                if text[start:i].strip():
                    out.append(text[start:j])
                    start = j
                depth, in_dollar, in_paren_math = 0, False, False
            i = j
            continue
        if c == "\\" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "(":
                in_paren_math = True
            elif nxt == ")":
                in_paren_math = False
            i += 2
            continue
        if c == "$":
            in_dollar = not in_dollar
            i += 1
            continue
        if in_dollar or in_paren_math:
            i += 1
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        elif c in ".?!" and depth == 0:
            j = i + 1
            while j < n and text[j] in ".?!\"')]\u201d\u2019":
                j += 1
            if (j == n or text[j].isspace()) and not (
                    c == "." and j == i + 1 and _is_abbreviation_or_list_number(text, start, i)):
                while j < n and text[j].isspace():
                    j += 1
                out.append(text[start:j])
                start = i = j
                depth = 0
                continue
            i = j
            continue
        i += 1
    if start < n:
        if text[start:].strip() or not out:
            out.append(text[start:])
        else:
            out[-1] += text[start:]
    return out


def _is_math(sentence: str) -> bool:
    return _INLINE_MATH_ONLY.fullmatch(sentence.strip()) is not None


def split_sentences(text: str, count_tokens: Callable[[str], int] = approx_tokens,
                    min_fragment_tokens: int = 5) -> list[str]:
    """Split reasoning text into sentences for boundary scoring (§3).

    Args: text: the reasoning inside <think>...</think>; count_tokens: text -> tokens
        (for the fragment rule); min_fragment_tokens: sentences shorter than this many
        tokens are merged into a neighbour.
    Returns: list of non-empty strings with "".join(result) == text exactly (every
        sentence keeps its trailing whitespace); [] for "".
    """
    if text == "":
        return []
    units: list[list] = []  # [text, kind] with kind in prose/math/code
    pos = 0
    for a, b, kind in protected_spans(text):
        if a > pos:
            units.extend([s, "prose"] for s in _split_prose(text[pos:a]))
        # the span takes the whitespace after it, like a sentence does
        while b < len(text) and text[b].isspace():
            b += 1
        units.append([text[a:b], kind])
        pos = b
    if pos < len(text):
        units.extend([s, "prose"] for s in _split_prose(text[pos:]))
    for u in units:
        if u[1] == "prose" and _is_math(u[0]):
            u[1] = "math"
    if units and not units[0][0].strip() and len(units) > 1:
        units[1][0] = units[0][0] + units[1][0]  # leading whitespace joins the first sentence
        units.pop(0)

    def merge_runs(units, should_merge):
        out = [units[0]]
        for u in units[1:]:
            if should_merge(out[-1], u):
                kind = "math" if out[-1][1] == u[1] == "math" else "prose"
                out[-1] = [out[-1][0] + u[0], kind]
            else:
                out.append(u)
        return out

    units = merge_runs(units, lambda p, u: p[1] == "math" and u[1] == "math")
    units = merge_runs(units, lambda p, u: p[0].rstrip().endswith(":"))
    units = merge_runs(units, lambda p, u: _CONTINUATION.match(u[0].lstrip()) is not None)
    # short fragments: into the previous sentence; a short first sentence into the next.
    units = merge_runs(units, lambda p, u: count_tokens(u[0].strip()) < min_fragment_tokens)
    if len(units) > 1 and count_tokens(units[0][0].strip()) < min_fragment_tokens:
        units[1] = [units[0][0] + units[1][0], "prose"]
        units.pop(0)
    return [u[0] for u in units]
