"""Answer checking for pass@1 (paper §A.2.2): which responses count as correct.

A table of real-style responses with verdicts written by hand: what a grader must accept
(equivalent forms, units, degrees, thousands separators), what it must reject (a sign, an
interval bracket, an answer left inside an unfinished <think>), GPQA letters in prose, the
embedded toy task, and a pathological answer that must not hang an eval.
"""
import random
import threading
import time

import pytest

from data import grading, toy_task
from data.grading import extract_answer, grade, grade_choice, grade_math, infer_kind


def R(answer: str) -> str:
    """A finished response: some thinking, then `answer`."""
    return "<think>\nLet me work this out step by step.\n</think>\n" + answer


MATH = [
    # (response, gold, correct)
    (R("The answer is \\boxed{42}."), "42", True),
    (R("\\boxed{41}"), "42", False),
    (R("\\boxed{\\frac{1}{2}}"), "\\frac{1}{2}", True),
    (R("\\boxed{\\frac{1}{2}}"), "0.5", True),
    (R("\\boxed{.5}"), "\\frac12", True),
    (R("\\boxed{\\dfrac{3}{4}}"), "0.75", True),
    (R("\\boxed{\\dfrac{3}{4}}"), "\\frac34", True),
    (R("\\boxed{\\frac{3}{5}}"), "\\frac34", False),
    (R("\\boxed{\\sqrt{2}/2}"), "\\frac{\\sqrt2}{2}", True),
    (R("\\boxed{\\frac{\\sqrt{3}}{2}}"), "\\frac{\\sqrt2}{2}", False),
    (R("\\boxed{2\\sqrt{3}}"), "\\sqrt{12}", True),
    (R("\\boxed{x^2+2x+1}"), "(x+1)^2", True),
    (R("\\boxed{(0, 1]}"), "(0,1]", True),
    (R("\\boxed{(0, 1)}"), "(0,1]", False),
    (R("\\boxed{[0, 1]}"), "(0,1]", False),
    (R("\\boxed{-3}"), "3", False),
    (R("\\boxed{-3}"), "-3", True),
    (R("Final Answer: 42"), "42", True),
    (R("Final Answer: The final answer is $\\frac{1}{3}$. I hope it is correct."), "\\frac{1}{3}", True),
    (R("Final Answer: The final answer is $\\frac{1}{3}$. I hope it is correct."), "\\frac{2}{3}", False),
    (R("**Final Answer:** 17"), "17", True),
    (R("So $x = 12$, and the area is $144$."), "144", True),
    (R("We get $12$ at first and then $13$."), "12", False),  # the last span is the answer
    (R("The answer is 2016."), "2016", True),  # raw text: the last number
    ("<think>\nSo the answer is \\boxed{42}", "42", False),  # never finished thinking
    ("<think>\nmaybe \\boxed{7}\n</think>\nThe answer is \\boxed{42}.", "42", True),
    ("<think>\nclearly \\boxed{42}\n</think>\nThe answer is \\boxed{7}.", "42", False),  # think part not graded
    (R("\\boxed{30^\\circ}"), "30", True),
    (R("\\boxed{30^{\\circ}}"), "30", True),
    (R("\\boxed{5\\text{ cm}}"), "5", True),
    (R("\\boxed{x = 5}"), "5", True),
    (R("\\boxed{x = -5}"), "5", False),
    (R("\\boxed{1,000}"), "1000", True),  # thousands separator, not a pair
    (R("\\boxed{1{,}000}"), "1000", True),
    (R("\\boxed{\\pi/2}"), "\\frac{\\pi}{2}", True),
    (R("\\boxed{\\pi/3}"), "\\frac{\\pi}{2}", False),
    (R("\\boxed{(1, 2)}"), "(1,2)", True),
    (R("\\boxed{(2, 1)}"), "(1,2)", False),
    (R("\\boxed{\\left(\\frac{1}{2}, 3\\right)}"), "(\\frac12,3)", True),
    (R("First \\boxed{3}, no wait: \\boxed{4}"), "4", True),
    (R("First \\boxed{3}, no wait: \\boxed{4}"), "3", False),
    (R("\\fbox{12}"), "12", True),
    (R("\\boxed{\\$18.90}"), "18.90", True),
    (R("\\boxed{10\\%}"), "10", True),
    (R("\\boxed{033}"), "33", True),
    (R("\\boxed{\\text{Monday}}"), "\\text{Monday}", True),
    (R("\\boxed{\\text{Monday}}"), "\\text{Tuesday}", False),
    (R("The answer is $\\frac{1}{2}$.<|im_end|>"), "\\frac12", True),
    (R("\\boxed{6}"), "The answer is \\boxed{6}.", True),  # a boxed gold is unwrapped
]


@pytest.mark.parametrize("response,gold,correct", MATH)
def test_math(response, gold, correct):
    assert grade_math(response, gold) is correct
    out = grade(response, gold, "math")
    assert out["correct"] is correct


@pytest.mark.parametrize("response", [R(""), R("   \n"), "<think>\nthe answer is \\boxed{42}"])
def test_no_answer(response):
    assert grade(response, "42", "math") == {"correct": False, "extracted": None}


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{2} and a cut-off \\boxed{\\frac{1", "2"),
    ("Final Answer: The final answer is $\\frac{1}{3}$. I hope it is correct.", "\\frac{1}{3}"),
    ("**Final Answer:** 42", "42"),
    ("so $x=3$ and $y = 7$.", "y = 7"),
    ("It is 5, or maybe 6.", "6"),
    ("no numbers here\nlast line", "last line"),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


CHOICE = [
    (R("The answer is (C)."), "C", True),
    (R("**Answer: B**"), "B", True),
    (R("I think C is right... so the final answer is D"), "D", True),
    (R("I think C is right... so the final answer is D"), "C", False),  # an earlier letter is a trap
    (R("Options A and B fail and C is tempting, but the answer is D."), "D", True),
    (R("Answer: B. A quick check of option A confirms it is wrong."), "B", True),
    (R("$\\boxed{B}$"), "B", True),
    (R("The answer is B.\nWait, re-checking the units, the answer is D."), "B", False),
    (R("None of these fit."), "A", False),
    ("<think>\nThe answer is A", "A", False),  # never finished thinking
]


@pytest.mark.parametrize("response,gold,correct", CHOICE)
def test_choice(response, gold, correct):
    assert grade_choice(response, gold) is correct
    assert grade(response, gold, "choice")["correct"] is correct


def test_choice_extracted():
    assert grade(R("I think C is right... so the final answer is D"), "D", "choice")["extracted"] == "D"
    assert grade(R("None of these fit."), "A", "choice")["extracted"] is None


@pytest.mark.parametrize("gold,kind", [("C", "choice"), (" (B) ", "choice"), ("42", "math"), ("E", "math"),
                                       ("\\frac12", "math"), ("a", "math")])
def test_infer_kind(gold, kind):
    assert infer_kind(gold) == kind


def test_toy():
    problem = toy_task.Problem(4, 7)
    response, _ = toy_task.solve(problem, random.Random(0))
    final = response.rsplit("\n", 1)[1]
    ok = grade(response, None, "toy", prompt=problem.prompt)
    assert ok["correct"] and ok["extracted"] == final and ok["reason"] == "ok"
    assert grade(response + "<|im_end|>", None, "toy", prompt=problem.prompt)["correct"]
    wrong = response[: -len(final)] + str((int(final) + 1) % 10)
    assert not grade(wrong, None, "toy", prompt=problem.prompt)["correct"]
    assert not grade(response, None, "toy", prompt=toy_task.Problem(5, 7).prompt)["correct"]  # block count
    unfinished = response.split("\n</think>")[0]
    assert grade(unfinished, None, "toy", prompt=problem.prompt)["extracted"] is None
    assert not grade(unfinished, None, "toy", prompt=problem.prompt)["correct"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(gold="1", kind="code"), "unknown answer kind 'code'"),
    (dict(gold=None, kind="math"), "needs a gold answer"),
    (dict(gold=None, kind="toy", prompt="what is 2+2"), "toy grading needs"),
    (dict(gold=None, kind="toy"), "toy grading needs"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grade(R("\\boxed{1}"), **kwargs)


def test_pathological_answer_times_out():
    """math-verify's alarms bound parsing (deep nesting) and comparison (a tower of powers)."""
    nested = "\\frac{1}{1+" * 200 + "x" + "}" * 200
    for answer in (nested, "9^{9^{9^{9}}}"):
        t0 = time.time()
        assert not grade_math(R(f"\\boxed{{{answer}}}"), "5")
        assert time.time() - t0 < 4 * grading.TIMEOUT_S + 3


def test_off_main_thread():
    """signal.alarm is main-thread only: elsewhere math-verify runs without a timeout, not raising."""
    result = {}
    th = threading.Thread(target=lambda: result.update(ok=grade_math(R("\\boxed{0.75}"), "\\frac34")))
    th.start()
    th.join(30)
    assert result == {"ok": True}


@pytest.mark.parametrize("response,gold,correct", [
    (R("\\boxed{\\dfrac{3}{4}}"), "\\frac34", True),
    (R("\\boxed{5\\text{ cm}}"), "5", True),
    (R("\\boxed{x = 5}"), "5", True),
    (R("\\boxed{1,000}"), "1000", True),
    (R("\\boxed{-3}"), "3", False),
])
def test_string_fallback_when_math_verify_fails(monkeypatch, response, gold, correct):
    """A math-verify crash falls back to comparing normalized strings instead of failing the eval."""
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("parser crashed")

    monkeypatch.setattr(math_verify, "parse", broken)
    assert grade_math(response, gold) is correct


# ------------------------------------------------------------------ known misses, fixed (verdicts by hand)

@pytest.mark.parametrize("response, gold, correct", [
    ("<think>x</think>**Final Answer**\n\\[\n\\frac12\n\\]", "0.5", True),       # display span after the marker
    ("<think>x</think>Final Answer:\n$$\n2\\sqrt{3}\n$$\nDone.", "2\\sqrt3", True),
    ("<think>x</think>**Final Answer**\n\\[\n\\frac12\n\\]", "\\[", False),
    ("<think>x</think>\\boxed{10, 100}", "10100", False),                        # a list, not one number
    ("<think>x</think>\\boxed{1,000}", "1000", True),                             # one number
    ("<think>x</think>\\boxed{100, 10}", "10, 100", True),                        # the same set
    ("<think>x</think>\\boxed{\\text{Monday}}", "\\text{Monday}", True),
    ("<think>x</think>\\boxed{\\text{dayMon}}", "\\text{Monday}", False),         # not a product of symbols
    ("<think>x</think>\\boxed{yaMnod}", "Monday", False),
    ("<think>x</think>The answer is \\boxed{\\text{monday}}", "Monday", True),
])
def test_fixed_misses(response, gold, correct):
    assert grade_math(response, gold) is correct


@pytest.mark.parametrize("answers, kind, winner", [
    (["0.5", "\\frac12", "3", "3", "1/2", None], "math", 0),   # three spellings of one half outvote two 3s
    (["3", "4", "4", "3"], "math", 0),                           # a tie goes to the earliest sample
    (["4", "3", "3", "4"], "math", 0),
    ([None, "7", None], "math", 1),
    ([None, None], "math", None),
    (["B", "C", "C", "B", "B"], "choice", 0),
])
def test_majority(answers, kind, winner):
    assert grading.majority(answers, kind) == winner
