"""Tests of the pipeline's offline stages: segmentation (§9.4), sentence splitting (§9.2),
seed filtering (§9.1) and the response format (§3). The LLM stages are in
test_pipeline_llm.py."""
from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.pipeline.format import build_response, parse_response
from data.pipeline.seed import has_cjk, seed_reason, think_parts, trace_id
from data.pipeline.segment import objective, score_grid, segment, segment_one_candidate
from data.pipeline.split import protected_spans, split_sentences
from data.pipeline.tokens import approx_tokens

from conftest import require_shared_data  # noqa: E402  (one definition of the path)


def raw_trace() -> dict:
    with open(require_shared_data() / "raw_cot_trace.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline())


# ---------------------------------------------------------------- segmentation (§9.4)

def brute_force(scores, lengths, min_tokens, lam, min_blocks):
    """Best J over every partition (2^(n-1)), or None when no partition is valid."""
    n = len(lengths)
    best = None
    for mask in range(1 << (n - 1)):
        blocks, a = [], 0
        for i in range(n - 1):
            if mask >> i & 1:
                blocks.append([a, i])
                a = i + 1
        blocks.append([a, n - 1])
        if len(blocks) < min_blocks or any(sum(lengths[x:y + 1]) < min_tokens for x, y in blocks):
            continue
        J = objective(blocks, scores, lengths, lam)
        best = J if best is None else max(best, J)
    return best


def valid(blocks, lengths, min_tokens, min_blocks):
    n = len(lengths)
    assert blocks[0][0] == 0 and blocks[-1][1] == n - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(blocks, blocks[1:]))
    return len(blocks) >= min_blocks and all(sum(lengths[x:y + 1]) >= min_tokens for x, y in blocks)


@st.composite
def instances(draw, max_n=9):
    n = draw(st.integers(1, max_n))
    unit = draw(st.sampled_from([1.0, 0.5, 0.25]))
    scores = [draw(st.integers(0, int(3 / unit))) * unit for _ in range(n - 1)]
    lengths = [draw(st.integers(0, 80)) for _ in range(n)]
    min_tokens = draw(st.sampled_from([0, 1, 20, 50, 100, 150, 400]))
    lam = draw(st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    min_blocks = draw(st.integers(1, 4))
    return scores, lengths, min_tokens, lam, min_blocks


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_segment_equals_brute_force(inst):
    scores, lengths, min_tokens, lam, min_blocks = inst
    blocks = segment(scores, lengths, min_tokens, lam, min_blocks)
    best = brute_force(scores, lengths, min_tokens, lam, min_blocks)
    if best is None:
        assert blocks == [[0, len(lengths) - 1]]
    else:
        assert valid(blocks, lengths, min_tokens, min_blocks)
        assert objective(blocks, scores, lengths, lam) == pytest.approx(best, abs=1e-9)


@settings(max_examples=20, deadline=None)
@given(st.integers(11, 13), st.integers(0, 10**6), st.sampled_from([1.0, 0.5, 0.25]),
       st.sampled_from([30, 60, 90]), st.sampled_from([0.5, 2.0]))
def test_segment_equals_brute_force_medium(n, seed, unit, min_tokens, lam):
    rng = random.Random(seed)
    lengths = [rng.randint(5, 40) for _ in range(n)]
    scores = [rng.randint(0, int(3 / unit)) * unit for _ in range(n - 1)]
    blocks = segment(scores, lengths, min_tokens, lam)
    best = brute_force(scores, lengths, min_tokens, lam, 1)
    assert valid(blocks, lengths, min_tokens, 1)
    assert objective(blocks, scores, lengths, lam) == pytest.approx(best, abs=1e-9)


@settings(max_examples=12, deadline=None)
@given(st.integers(60, 100), st.integers(0, 10**6), st.sampled_from([1.0, 0.5]),
       st.sampled_from([100, 200, 300]), st.sampled_from([0.5, 1.0]), st.integers(1, 3))
def test_segment_never_worse_than_one_candidate_dp(n, seed, unit, min_tokens, lam, min_blocks):
    rng = random.Random(seed)
    lengths = [rng.randint(20, 60) for _ in range(n)]
    scores = [rng.randint(0, int(3 / unit)) * unit for _ in range(n - 1)]
    exact = segment(scores, lengths, min_tokens, lam, min_blocks)
    heur = segment_one_candidate(scores, lengths, min_tokens, lam, min_blocks)
    assert valid(exact, lengths, min_tokens, min_blocks)
    assert valid(heur, lengths, min_tokens, min_blocks)
    assert objective(exact, scores, lengths, lam) >= objective(heur, scores, lengths, lam) - 1e-12


def test_one_candidate_dp_is_strictly_worse_on_a_known_instance():
    # Found by random search: the heuristic keeps [[0,1],[2,2]] for prefix 3 with K=2
    # (better prefix objective) and so cannot reach the optimum [[0,1],[2,2],[3,3]].
    scores, lengths, min_tokens, lam = [2, 3, 3], [20, 10, 5, 30], 0, 1.0
    exact = segment(scores, lengths, min_tokens, lam)
    heur = segment_one_candidate(scores, lengths, min_tokens, lam)
    assert exact == [[0, 1], [2, 2], [3, 3]]
    assert heur == [[0, 1], [2, 3]]
    J_exact = objective(exact, scores, lengths, lam)
    J_heur = objective(heur, scores, lengths, lam)
    assert J_exact > J_heur + 0.03
    assert brute_force(scores, lengths, min_tokens, lam, 1) == pytest.approx(J_exact, abs=1e-12)


def test_segment_honours_min_tokens_and_min_blocks():
    lengths = [100] * 10
    scores = [0] * 4 + [3] + [0] * 4  # one strong boundary in the middle
    assert segment(scores, lengths, 200, 0.5) == [[0, 4], [5, 9]]
    # a minimum block size that forbids the 5/5 split leaves one block
    assert segment(scores, lengths, 600, 0.5) == [[0, 9]]
    # min_blocks forces more blocks than the objective alone would choose
    forced = segment(scores, lengths, 200, 0.5, min_blocks=4)
    assert len(forced) >= 4 and all(sum(lengths[a:b + 1]) >= 200 for a, b in forced)
    assert any(b == 4 for _, b in forced[:-1])  # the strong boundary is still a cut


def test_segment_unsplittable_traces_give_one_block():
    assert segment([], [50]) == [[0, 0]]
    assert segment([3, 3], [50, 50, 50], min_tokens=200) == [[0, 2]]      # too short for a block
    assert segment([3, 3], [150, 150, 150], min_tokens=200) == [[0, 2]]   # no split keeps 200/block
    assert segment([3, 3], [300, 300, 300], min_tokens=200, min_blocks=4) == [[0, 2]]  # too few tokens for 4


def test_segment_rejects_bad_input():
    with pytest.raises(ValueError, match="0.25"):
        segment([0.3], [10, 10])
    with pytest.raises(ValueError, match="one score per boundary"):
        segment([1, 1], [10, 10])
    with pytest.raises(ValueError, match="lam"):
        segment([1], [10, 10], lam=-1)
    with pytest.raises(ValueError, match=">= 0"):
        segment([-1], [10, 10])
    assert score_grid([0.5, 1.5, 3]) == ([1, 3, 6], 0.5)
    assert score_grid([0.25, 2]) == ([1, 8], 0.25)


# ---------------------------------------------------------------- splitting (§9.2)

def offsets(sentences):
    out, pos = [], 0
    for s in sentences:
        out.append((pos, pos + len(s)))
        pos += len(s)
    return out


def inside_one_sentence(span, sentences):
    a, b = span
    return any(x <= a and b <= y for x, y in offsets(sentences))


def test_split_raw_trace_round_trip_and_no_colon_ends():
    body, answer = think_parts(raw_trace()["cot"])
    sentences = split_sentences(body)
    assert "".join(sentences) == body
    assert len(sentences) > 100
    assert not any(s.rstrip().endswith(":") for s in sentences)
    assert all(approx_tokens(s.strip()) >= 5 for s in sentences)
    assert not any(re.match(r"\s*(Therefore|Thus|So)\b", s) for s in sentences[1:])
    # inline math \( ... \) is never cut
    for m in re.finditer(r"\\\(.*?\\\)", body, re.S):
        assert inside_one_sentence(m.span(), sentences)


def test_split_raw_trace_with_code_and_display_math_keeps_them_whole():
    body, _ = think_parts(raw_trace()["cot"])
    inserts = ["```python\nx = 1.  # e.g. a. b. c\nprint(x). \n\ny = 2.\n```",
               "$$a = b. \\quad c = d. \\quad$$",
               "\\[\n x = 1. \\\\ y = 2.\n\\]",
               "\\begin{align} p &= q. \\\\ r &= s. \\end{align}"]
    paras = body.split("\n\n")
    step = len(paras) // (len(inserts) + 1)
    for k, ins in enumerate(inserts):
        paras.insert((k + 1) * step + k, ins)
    text = "\n\n".join(paras)
    sentences = split_sentences(text)
    assert "".join(sentences) == text
    assert not any(s.rstrip().endswith(":") for s in sentences)
    spans = protected_spans(text)
    assert len(spans) == len(inserts)
    for a, b, _ in spans:
        assert inside_one_sentence((a, b), sentences)
        assert text[a:b] in inserts


def test_split_rules_on_small_texts():
    text = ("We use a method, e.g. the one of Dr. Smith vs. others. It works (see Fig. 2. here) well. "
            "Take \\( x = 1. y \\) and $a. b$ in the formula now. Then compute the next value:\n\n"
            "Therefore the value is five units long. So we are done here with this.\n\n"
            "Ok. A new paragraph starts here with more words.")
    s = split_sentences(text)
    assert "".join(s) == text
    assert s[0] == "We use a method, e.g. the one of Dr. Smith vs. others. "
    assert s[1] == "It works (see Fig. 2. here) well. "
    assert s[2] == "Take \\( x = 1. y \\) and $a. b$ in the formula now. "
    # ':' attaches to the next; Therefore/So merge into the previous
    assert s[3].startswith("Then compute") and "So we are done" in s[3]
    # "Ok. " is a fragment under 5 tokens: merged into the previous sentence
    assert s[3].endswith("Ok. ") and s[4].startswith("A new paragraph")
    assert len(s) == 5


def test_split_merges_consecutive_math_and_numbered_lists():
    text = ("The first equation is the quadratic one written below.\n\n"
            "\\( a t^2 + b t + c = 0 \\)\n\n\\( A t^2 + B t + C = 0 \\)\n\n"
            "$$x = 1$$\n\nNow we subtract the two equations from each other.\n"
            "1. first item of the list here\n2. second item of the list here.")
    s = split_sentences(text)
    assert "".join(s) == text
    assert s[1] == "\\( a t^2 + b t + c = 0 \\)\n\n\\( A t^2 + B t + C = 0 \\)\n\n$$x = 1$$\n\n"
    assert s[2] == "Now we subtract the two equations from each other.\n"
    # a sentence with prose between two inline formulas is not a math unit
    t = "\\( x \\) is larger than \\( y \\) here.\n\n\\( z = a + b + c + d \\)\n\n"
    assert split_sentences(t) == ["\\( x \\) is larger than \\( y \\) here.\n\n", "\\( z = a + b + c + d \\)\n\n"]
    # "1." / "2." opening a line are list numbers, not sentence ends
    assert s[3] == "1. first item of the list here\n2. second item of the list here."
    assert len(s) == 4


def test_split_unclosed_code_fence_runs_to_the_end():
    text = "Let us write some code for this problem now.\n```python\nprint(1). x. y.\n"
    s = split_sentences(text)
    assert "".join(s) == text and s[-1].startswith("```")


# ---------------------------------------------------------------- seed filter and format

def test_seed_filter():
    count = approx_tokens
    tr = raw_trace()
    assert seed_reason(tr, 1000, count) is None
    assert seed_reason(tr, 10**6, count) == "too_short"
    assert seed_reason({"cot": "<think> no end"}, 0, count) == "no_close_think"
    assert seed_reason({"cot": "<think> 解 </think> x"}, 0, count) == "cjk"
    assert seed_reason({"cot": ""}, 0, count) == "no_cot"
    assert seed_reason({"cot": "<think> a <|block_end|> </think> x"}, 0, count) == "reserved_token"
    assert seed_reason({"cot": "<think> a </think> x </think>"}, 0, count) == "reserved_token"
    assert seed_reason({"cot": "<think> a </think> x"}, 0, count) is None
    assert has_cjk("한국어") and has_cjk("かな") and not has_cjk("plain ascii, ü, α")
    assert trace_id(tr) == "ot3-train-0000030"
    assert trace_id({"cot": "a"}) == trace_id({"cot": "a"}) != trace_id({"cot": "b"})
    assert think_parts("<think> a b </think>\n answer ") == ("a b", "answer")


def test_response_format_round_trip():
    r = build_response(["T1 ", " T2"], ["M1", "M2"], "42")
    assert r == ("<think>\n<|block_start|>T1<|block_end|>\n<|summary_start|>M1<|summary_end|>\n"
                 "<|block_start|>T2<|block_end|>\n<|summary_start|>M2<|summary_end|>\n</think>\n42")
    assert parse_response(r) == (["T1", "T2"], ["M1", "M2"], "42")
    with pytest.raises(ValueError):
        parse_response("<think>\n<|block_start|>T1<|summary_start|>M1<|summary_end|>\n</think>\n")
    with pytest.raises(ValueError):
        parse_response("<think>\nstray<|block_start|>T<|block_end|><|summary_start|>M<|summary_end|></think>")
    with pytest.raises(ValueError, match="reserved"):
        build_response(["a <|block_end|>"], ["m"], "")
