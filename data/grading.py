"""Is a response correct? Answer checking for pass@1 (paper §A.2.2) and, later, RL rewards.

A response is `<think> ... </think>` followed by the answer. Only the text after the last
</think> is graded; a response without </think> never finished thinking and is wrong.

Three kinds of problem:
  math    AIME/MATH-style. The candidate is, in order (paper §A.2.2): the content of the last
          \\boxed{...} or \\fbox{...} (balanced braces), else what follows the last "Final Answer"
          ("Final Answer: The final answer is $x$. I hope it is correct.", "**Final Answer:** x"),
          else the last math span ($...$, $$...$$, \\(...\\), \\[...\\]), else the last number in
          the answer text, else its last non-empty line. Candidate and gold are cleaned with a
          Hendrycks-MATH-style `normalize` (string cleanup, no parsing): equal strings are correct;
          otherwise math-verify decides (LaTeX -> SymPy equivalence: 0.75 == \\frac34, intervals,
          sets, \\pi/2 == \\frac{\\pi}{2}). Thousands separators are dropped ("1,000" == 1000), as
          AIME-style answers are integers and a model writing 1,000 means one thousand; only
          inside one number ("10, 100" is a list). After "Final Answer", a display span that
          follows is taken whole, across lines. Text answers (\\text{Monday}, a bare word) are
          compared as text, not parsed as products of symbols.
  choice  GPQA. The letter A-D in the last \\boxed{}, else the last "answer (is|:) X", else the last
          standalone capital A-D of the answer text. With neither a box nor an "answer" phrase,
          a later English article "A" is read as a letter (a known limit of the last rule).
  toy     the embedded running-sum task: data.toy_task.check_trace on the whole response.

Timeouts: math-verify bounds each parse and each comparison with signal.alarm (TIMEOUT_S
seconds), which works only in the main thread; grading there is safe against pathological
input (a few TIMEOUT_S at worst). It also cancels any SIGALRM alarm the caller had set. Off the
main thread, math-verify would raise, so it runs with no timeout there: bound the time yourself
(grade in worker processes, whose main thread has signals).
"""
from __future__ import annotations

import re
import threading

from data import toy_task

KINDS = ("math", "choice", "toy")
TIMEOUT_S = 2  # signal.alarm takes whole seconds

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_FINAL_RE = re.compile(r"final answer(?:\s+is)?[\s:*]*", re.I)
_SPAN_RE = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.S)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_LETTER_RE = re.compile(r"(?<![A-Za-z])[A-D](?![A-Za-z])")
_ANSWER_LETTER_RE = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?[\s:*(\[]*(?:(?i:option|choice)\s*)?\(?([A-D])(?![A-Za-z])")
_TEXT_RE = r"\\(?:text|textrm|textbf|mbox|mathrm)\{"


def _answer_part(response: str) -> str | None:
    """Text after the last </think>, chat end tokens dropped; None if thinking never ended."""
    text = response.replace("<|im_end|>", "").replace("<|endoftext|>", "")
    return text.rsplit("</think>", 1)[1] if "</think>" in text else None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} (or `\\boxed 5`), else None."""
    found = None
    for m in _BOXED_RE.finditer(text):
        rest = text[m.end():].lstrip()
        if not rest.startswith("{"):
            token = re.match(r"[^\s$]+", rest)
            found = token.group(0) if token else found
            continue
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth == 0:
                found = rest[1:i]
                break
        # an unclosed brace is a truncated answer: keep the last complete one
    return found


def _spans(text: str) -> list[str]:
    """Contents of the non-empty math spans of `text`, in order."""
    contents = (next(g for g in groups if g).strip() for groups in _SPAN_RE.findall(text))
    return [c for c in contents if c]


def extract_answer(text: str) -> str | None:
    """The math answer candidate of an answer text, in the paper's order (paper §A.2.2).

    Args:
        text: the answer part of a response (what follows </think>; grade() splits it off).
    Returns:
        The raw candidate string (not normalized), or None when the text holds no answer.
    """
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    finals = list(_FINAL_RE.finditer(text))
    if finals:
        after = text[finals[-1].end():].strip()
        span = _SPAN_RE.match(after)  # a display span right after the marker may cross lines
        rest = after.split("\n")[0]
        rest = re.split(r"I hope it is correct", rest, flags=re.I)[0]
        rest = next(g for g in span.groups() if g).strip() if span else (_spans(rest) or [rest])[-1].strip(" *.")
        if rest:
            return rest
    if _spans(text):
        return _spans(text)[-1]
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1].rstrip(",")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize(answer: str) -> str:
    """Hendrycks-MATH-style cleanup (the `strip_string` idea) of a math answer string.

    \\dfrac/\\tfrac -> \\frac, \\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}; drops \\left, \\right,
    \\displaystyle, spacing commands, degrees, dollars, percent, trailing text units
    ("5\\text{ cm}" -> 5), \\text{} wrappers, whitespace, a trailing period and thousands
    separators; "x = 5" -> "5" for one variable; ".5" -> "0.5". Never raises.
    """
    s = answer.strip()
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\(?:left|right|displaystyle)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\[!,;: ]", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![a-zA-Z])", "", s)
    s = re.sub(r"\\?[$%]", "", s)
    # a word in \text{} after a value is a unit; once units are gone the wrapper says nothing
    s = re.sub(r"(?<=\S)\s*" + _TEXT_RE + r"\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?\s*$", "", s)
    s = re.sub(_TEXT_RE + r"([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    # spaces go, except the one that ends a command before a letter ("\pi r" must not be "\pir")
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", s)
    s = s.replace("{,}", ",")
    # a thousands separator sits inside one number ("1,000"); "10, 100" is a list of two
    one_number = re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s.strip().rstrip("."))
    s = re.sub(r",\s+", ",\x00", s)  # ", " stays: math-verify reads "10,100" as one number
    s = re.sub(r"\s+", "", s).replace("\x00", " ").rstrip(".")
    if one_number:
        s = s.replace(",", "")
    m = re.fullmatch(r"(?:[A-Za-z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?=([^=]+)", s)
    s = m.group(1) if m else s
    return re.sub(r"(?<![\w}])\.(\d)", r"0.\1", s)


def _is_text(answer: str) -> bool:
    """A text answer: a \\text{...} wrapper around the whole answer, or a bare word or phrase
    of two or more letters (no LaTeX command). Compared as text, never as a product of
    symbols ("Monday" is not M*o*n*d*a*y)."""
    a = answer.strip().strip("$").strip()
    wrapped = re.fullmatch(_TEXT_RE + r"([^{}]*)\}", a)
    return bool(wrapped) or bool(re.fullmatch(r"[A-Za-z][A-Za-z' -]*[A-Za-z]", a))


def _equivalent(pred: str, gold: str) -> bool:
    """Normalized strings equal, else math-verify equivalence (False if it fails or times out);
    text answers (`_is_text`) equal as text, case and spacing aside."""
    if _is_text(gold) or _is_text(pred):
        text = lambda x: re.sub(r"\s+", " ", normalize(x).replace("\x00", " ")).strip().lower()  # noqa: E731
        return bool(text(gold)) and text(pred) == text(gold)
    pred, gold = normalize(pred), normalize(gold)
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    try:
        from math_verify import parse, verify  # imported here: choice and toy grading need no SymPy

        t = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        g, p = parse(f"${gold}$", parsing_timeout=t), parse(f"${pred}$", parsing_timeout=t)
        return bool(g and p and verify(g, p, timeout_seconds=t))
    except Exception:  # a grader crash must not end an eval: the string comparison has spoken
        return False


def _choice_letter(text: str) -> str | None:
    """The chosen letter A-D of an answer text (rules in the module docstring), else None."""
    boxed = _last_boxed(text)
    for source in ([boxed] if boxed else []) + [text]:
        answers = _ANSWER_LETTER_RE.findall(source)
        letters = answers or _LETTER_RE.findall(source)
        if letters:
            return letters[-1]
    return None


def grade(response: str, gold: str | tuple[str, ...] | list[str] | None, kind: str,
          prompt: str | None = None) -> dict:
    """Grade one response (paper §A.2.2 pass@1 answer checking).

    Args:
        response: the decoded response, <think> ... </think> then the answer.
        gold: the reference answer (math: any string, a \\boxed{} in it is unwrapped; choice: a
            letter A-D), or a tuple/list of acceptable answers, any one of which makes the
            response correct; ignored for kind "toy".
        kind: "math", "choice" or "toy" (see infer_kind).
        prompt: for "toy" only, the problem's prompt ("sum 4 blocks from 7").
    Returns:
        {"correct": bool, "extracted": str | None} (the candidate, None if there was no answer);
        "toy" adds "reason" from check_trace.
    Raises:
        ValueError: unknown kind, gold missing for math/choice, or prompt not a toy prompt.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}: expected one of {', '.join(KINDS)}")
    answer = _answer_part(response)
    if kind == "toy":
        problem = toy_task.parse_prompt(prompt or "")
        if problem is None:
            raise ValueError(f"toy grading needs the task's prompt ('sum N blocks from S'), got {prompt!r}")
        check = toy_task.check_trace(problem, response)
        return {"correct": check["correct"], "extracted": (answer or "").strip() or None, "reason": check["reason"]}
    if gold is None:
        raise ValueError(f"grading kind {kind!r} needs a gold answer, got None")
    golds = [gold] if isinstance(gold, str) else list(gold)
    if kind == "choice":
        letter = _choice_letter(answer) if answer is not None else None
        return {"correct": letter is not None and letter in {g.strip().strip("()").upper() for g in golds},
                "extracted": letter}
    pred = extract_answer(answer) if answer is not None else None
    return {"correct": pred is not None and any(_equivalent(pred, _last_boxed(g) or g) for g in golds),
            "extracted": pred}


def grade_math(response: str, gold: str) -> bool:
    """Whether `response` answers a math problem whose reference answer is `gold` (paper §A.2.2).
    See grade(); raises ValueError if gold is None."""
    return grade(response, gold, "math")["correct"]


def grade_choice(response: str, gold: str) -> bool:
    """Whether `response` picks the gold letter (A-D) of a multiple-choice problem (GPQA, paper
    §A.2.2). See grade(); raises ValueError if gold is None."""
    return grade(response, gold, "choice")["correct"]


def majority(answers: list[str | None], kind: str = "math") -> int | None:
    """maj@k's vote (paper §A.2.2): the index of the majority answer among `answers` (the
    extracted answers of one problem's samples, in sample order; None = no answer). Answers
    vote together when they are the same answer: equivalent math (normalized strings equal or
    math-verify equal, so "0.5", "\\frac12" and "1/2" are one vote), the same letter, the same
    text. Ties go to the class whose first sample comes first, so the result depends on the
    samples, never on the order they finished in. None when no sample has an answer."""
    same = _equivalent if kind == "math" else (lambda a, b: a.strip() == b.strip())
    classes: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for c in classes:
            if same(a, answers[c[0]]):
                c.append(i)
                break
        else:
            classes.append([i])
    if not classes:
        return None
    return max(classes, key=lambda c: (len(c), -c[0]))[0]


def infer_kind(gold: str | tuple[str, ...] | list[str]) -> str:
    """'choice' when `gold` is a single letter A-D (optionally "(C)"), or a list of acceptable
    answers that all are, else 'math' (paper §A.2.2). Never raises for a str or a list of str;
    'toy' cannot be told from a gold answer and must be asked for."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    return "choice" if golds and all(re.fullmatch(r"\(?[A-D]\)?", g.strip()) for g in golds) else "math"
