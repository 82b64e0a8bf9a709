"""Prompts of the LLM stages (paper §3), written for this project.

Every prompt asks for strict JSON; the shapes are checked in score.py and memento.py.
Each user message carries a "TASK:" line so a log (or a test server) can tell the stages
apart.
"""
from __future__ import annotations

__all__ = ["boundary_messages", "compress_messages", "refine_messages", "judge_messages",
           "JUDGE_CRITERIA"]

BOUNDARY_SYSTEM = """You segment long step-by-step reasoning into self-contained blocks.
You see numbered sentences of one reasoning trace. For every boundary between two
consecutive sentences, rate how good a place it is to close a block, on this scale:
0 = the thought continues: the next sentence depends directly on the previous one
    (in the middle of a derivation, a calculation, a list, or an argument).
1 = a small step: the same sub-task continues with a new minor step.
2 = a clear sub-task change: one intermediate result is finished and another begins.
3 = a major transition: a new approach, a verification pass, a case split, the final
    answer, or a return to the problem after a dead end.
Hard rules: never give 2 or 3 inside a calculation that is still running; give 0 after a
sentence that ends with ':' or '=' (what follows belongs to it).
Answer with JSON only, no prose, exactly this shape:
{"scores": [{"boundary": <int>, "score": <0|1|2|3>}, ...]}
with one entry for every boundary you are asked about and no others."""


def boundary_messages(sentences: list[str], first: int) -> list[dict]:
    """Chat messages asking for scores of the boundaries inside a window (§9.3).

    Args: sentences: the window's consecutive sentences; first: global index of the
        window's first sentence. Boundary i (global) lies between sentences i and i+1, so
        the window asks for boundaries first .. first+len(sentences)-2.
    """
    lines = [f"[{first + k}] {s.strip()}" for k, s in enumerate(sentences)]
    wanted = ", ".join(str(first + k) for k in range(len(sentences) - 1))
    user = ("TASK: score boundaries\n"
            "Sentences:\n" + "\n".join(lines) + "\n\n"
            f"Boundary i lies between sentence [i] and sentence [i+1].\n"
            f"Boundaries to score: {wanted}\n"
            "Reply with the JSON object only.")
    return [{"role": "system", "content": BOUNDARY_SYSTEM}, {"role": "user", "content": user}]


COMPRESS_SYSTEM = """You write mementos: the notes a reasoner keeps about one finished block
of its own reasoning after the block itself is erased from memory. Later reasoning will see
only the memento, so it must carry everything that later steps may need.
Rules:
- Result first: open with what the block established or decided (or that it failed).
- Keep exact formulas, equations, numerical values, variable definitions and code facts,
  copied verbatim where possible (extractive, not paraphrased).
- Keep the method used and any check performed and its outcome; keep dead ends in a few
  words so they are not retried.
- Add nothing that is not in the block. No narration ("the block", "I think"), no filler.
- Terse: about {target} tokens (10-20% of the block); shorter is fine if nothing is lost.
Answer with JSON only: {{"memento": "<text>"}}"""


def compress_messages(block: str, target_tokens: int, context: str = "") -> list[dict]:
    """Chat messages asking for a memento of one block (§9.5).

    Args: block: the block's reasoning text; target_tokens: desired memento length
        (tokens, ~15% of the block); context: the previous mementos of the trace (may be "").
    """
    user = "TASK: write memento\n"
    if context:
        user += "Earlier mementos (for context only, do not repeat them):\n" + context + "\n\n"
    user += "Block:\n" + block + "\n\nReply with the JSON object only."
    return [{"role": "system", "content": COMPRESS_SYSTEM.format(target=target_tokens)},
            {"role": "user", "content": user}]


def refine_messages(block: str, memento: str, feedback: str, target_tokens: int) -> list[dict]:
    """Chat messages asking to rewrite a memento using the judge's feedback (§9.5)."""
    user = ("TASK: refine memento\n"
            "Block:\n" + block + "\n\n"
            "Current memento:\n" + memento + "\n\n"
            "Reviewer feedback:\n" + feedback + "\n\n"
            "Write an improved memento that fixes every point of the feedback while following "
            "all the rules. Reply with the JSON object only.")
    return [{"role": "system", "content": COMPRESS_SYSTEM.format(target=target_tokens)},
            {"role": "user", "content": user}]


# criterion -> (maximum points, what earns them); the total is out of 10.
JUDGE_CRITERIA = {
    "formulas": (3, "every formula/equation the later reasoning needs is present and exact"),
    "values": (2, "all key numerical values and intermediate results are present and correct"),
    "methods": (2, "the approach taken and the decisions made (incl. dead ends) are stated"),
    "validation": (1, "checks/verifications done in the block and their outcome are kept"),
    "no_hallucination": (1, "nothing is stated that the block does not support"),
    "result_first": (1, "the memento opens with the block's result or conclusion"),
}

JUDGE_SYSTEM = """You grade a memento: a terse note that must replace one block of reasoning
for everything that comes after it. Compare it against the block and award points:
""" + "\n".join(f"- {k}: 0..{m} points, {d}" for k, (m, d) in JUDGE_CRITERIA.items()) + """
Give integer points only. In feedback, list concretely what is missing, wrong or
superfluous (quote formulas/values), or "none" if nothing.
Answer with JSON only, exactly this shape:
{"scores": {""" + ", ".join(f'"{k}": <int>' for k in JUDGE_CRITERIA) + """}, "feedback": "<text>"}"""


def judge_messages(block: str, memento: str) -> list[dict]:
    """Chat messages asking the judge to grade a memento 0-10 with the §9.5 rubric."""
    user = ("TASK: judge memento\n"
            "Block:\n" + block + "\n\n"
            "Memento:\n" + memento + "\n\n"
            "Reply with the JSON object only.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
