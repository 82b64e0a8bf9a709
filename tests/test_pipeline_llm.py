"""Tests of the pipeline's LLM stages (§9.3, §9.5) and the resumable driver, against a real
OpenAI-compatible HTTP server started on 127.0.0.1 (a thread, ephemeral port) that answers
import sft
from fixed rules keyed by the request content."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data.pipeline.format import parse_response
from data.pipeline.llm import ChatClient, LLMError, parse_json_content
from data.pipeline.memento import make_memento
from data.pipeline.run import Config, read_done, run_pipeline
from data.pipeline.score import score_boundaries, score_two_pass, windows
from data.pipeline.seed import think_parts

REPO = Path(__file__).resolve().parents[1]
from conftest import require_shared_data  # noqa: E402  (one definition of the path)
SPECIAL = ["<|block_start|>", "<|block_end|>", "<|summary_start|>", "<|summary_end|>"]


def judge_parts(score: int) -> dict:
    parts, left = {}, score
    for k, hi in [("formulas", 3), ("values", 2), ("methods", 2), ("validation", 1),
                  ("no_hallucination", 1), ("result_first", 1)]:
        parts[k] = min(hi, left)
        left -= parts[k]
    return parts


class FakeLLM:
    """The answer table. `plan` maps a TASK name to a list of overrides consumed in order
    ("ok", "bad_json", "bad_shape", 500, 503, 429, "sleep"); then "ok" forever.
    `judge` maps a memento version (v0 = first draft, vK = K-th refinement) to a grade.
    `fail_after`: every request after that many answers HTTP 500."""

    def __init__(self):
        self.plan: dict[str, list] = {}
        self.judge = {0: 9}
        self.fail_after: int | None = None
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def answer(self, body: dict):
        user = body["messages"][-1]["content"]
        task = re.search(r"TASK: (\w+ \w+)", user).group(1)
        with self.lock:
            self.requests.append(body)
            n = len(self.requests)
            step = self.plan.get(task, []).pop(0) if self.plan.get(task) else "ok"
        if self.fail_after is not None and n > self.fail_after:
            return 500, None
        if isinstance(step, int):
            return step, None
        if step == "sleep":
            time.sleep(0.5)
        if step == "bad_json":
            return 200, '{"scores": [ oops'
        if task == "score boundaries":
            wanted = [int(x) for x in re.search(r"Boundaries to score: ([\d, ]+)", user).group(1).split(",")]
            if step == "bad_shape":
                wanted = wanted[:-1]  # one boundary missing
            return 200, json.dumps({"scores": [{"boundary": b, "score": 3 if b % 5 == 4 else b % 2}
                                               for b in wanted]})
        if task == "write memento":
            if step == "reserved":
                return 200, json.dumps({"memento": "v0: x <|block_end|> y"})
            return 200, json.dumps({"memento": f"v0: result of block ({len(user)} chars)"})
        if task == "refine memento":
            v = int(re.search(r"Current memento:\nv(\d+):", user).group(1))
            return 200, "```json\n" + json.dumps({"memento": f"v{v + 1}: refined result"}) + "\n```"
        if task == "judge memento":
            v = int(re.search(r"Memento:\nv(\d+):", user).group(1))
            score = self.judge.get(v, 10)
            if step == "bad_shape":
                return 200, json.dumps({"scores": {"formulas": 7}, "feedback": "x"})
            return 200, json.dumps({"scores": judge_parts(score), "feedback": f"round {v}: add the values"})
        raise AssertionError(task)


@pytest.fixture
def server():
    fake = FakeLLM()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                code, content = 404, None
            else:
                code, content = fake.answer(body)
            if code != 200:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b'{"error": "fake failure"}')
                return
            raw = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            try:
                self.wfile.write(raw)
            except BrokenPipeError:  # the client timed out first, as a test asked it to
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


def client(fake, **kw):
    args = dict(timeout=0.25, max_retries=3, backoff=0.001, max_backoff=0.01)
    args.update(kw)
    return ChatClient(fake.url, "fake-model", **args)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


SENTS = [f"Sentence number {i} says something about the problem. " for i in range(30)]


# ---------------------------------------------------------------- scoring (§9.3)

def test_windows_cover_every_boundary_once():
    for n in range(1, 60):
        for size in (2, 11, 16):
            bs = [b for a, z in windows(n, size) for b in range(a, z)]
            assert bs == list(range(n - 1))
            assert all(z - a + 1 <= size for a, z in windows(n, size))


def test_scoring_one_and_two_passes(server):
    s1 = score_boundaries(client(server), SENTS, 16)
    assert s1 == [3 if b % 5 == 4 else b % 2 for b in range(29)]
    assert len(server.requests) == 2  # 29 boundaries in windows of 15
    s2 = score_two_pass(client(server), SENTS)
    assert s2 == [float(x) for x in s1]  # the fake is consistent, so the average is the same
    assert len(server.requests) == 2 + 2 + 3  # 15+14 then 10+10+9 boundaries


def test_malformed_json_is_retried_then_reported(server):
    server.plan["score boundaries"] = ["bad_json", "bad_shape"]
    assert len(score_boundaries(client(server), SENTS[:5], 16)) == 4
    assert len(server.requests) == 3
    server.plan["score boundaries"] = ["bad_json"] * 10
    with pytest.raises(LLMError) as e:
        score_boundaries(client(server, max_retries=2), SENTS[:5], 16)
    msg = str(e.value)
    assert "\n" not in msg and server.url + "/chat/completions" in msg and "malformed" in msg
    assert len(server.requests) == 3 + 3


def test_5xx_429_and_timeouts_are_retried_then_reported(server):
    server.plan["score boundaries"] = [503, 429, "sleep", 500]
    assert len(score_boundaries(client(server, max_retries=4), SENTS[:5], 16)) == 4
    assert len(server.requests) == 5
    server.plan["score boundaries"] = [500] * 10
    with pytest.raises(LLMError, match="HTTP 500"):
        score_boundaries(client(server, max_retries=2), SENTS[:5], 16)
    server.plan["score boundaries"] = ["sleep"] * 3
    t = time.perf_counter()
    with pytest.raises(LLMError, match="failed after 3 attempts.*no reply within --timeout 0.1 s"):
        score_boundaries(client(server, max_retries=2, timeout=0.1), SENTS[:5], 16)
    assert time.perf_counter() - t < 2.0


def test_backoff_doubles_up_to_the_cap(server, monkeypatch):
    import data.pipeline.llm as llm

    sleeps = []
    monkeypatch.setattr(llm.time, "sleep", sleeps.append)
    server.plan["score boundaries"] = [500] * 10
    with pytest.raises(LLMError, match="failed after 5 attempts"):
        score_boundaries(client(server, max_retries=4, backoff=0.01, max_backoff=0.03), SENTS[:3], 16)
    assert sleeps == [0.01, 0.02, 0.03, 0.03]


def test_non_retryable_http_error_fails_at_once(server):
    c = ChatClient(server.url.replace("/v1", "/v2"), "m", timeout=1, max_retries=3, backoff=0.001)
    with pytest.raises(LLMError, match="HTTP 404.*--base-url"):
        c.chat([{"role": "user", "content": "TASK: write memento\nx"}])
    assert len(server.requests) == 0


def test_unreachable_endpoint_gives_a_clear_error():
    c = ChatClient(f"http://127.0.0.1:{free_port()}/v1", "m", timeout=0.5, max_retries=2, backoff=0.001)
    with pytest.raises(LLMError) as e:
        c.chat([{"role": "user", "content": "hi"}])
    msg = str(e.value)
    assert "unreachable after 3 attempts" in msg and "--base-url" in msg and "\n" not in msg


def test_parse_json_content_is_strict():
    assert parse_json_content(' {"a": 1} ') == {"a": 1}
    assert parse_json_content('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_content('<think>hmm</think>\n{"a": 1}') == {"a": 1}
    for bad in ['Here: {"a": 1}', '{"a": 1} thanks', '{"a": 1,}', "```\n{}\n``` more"]:
        with pytest.raises(ValueError):
            parse_json_content(bad)


# ---------------------------------------------------------------- mementos (§9.5)

@pytest.mark.parametrize("grades, expected", [
    ({0: 9}, [9]),                       # first draft passes: no refinement
    ({0: 5, 1: 8}, [5, 8]),              # stops as soon as the threshold is met
    ({0: 3, 1: 4, 2: 7, 3: 10}, [3, 4, 7]),  # at most 2 refinements
    ({0: 6, 1: 2, 2: 4}, [6, 2, 4]),     # best round is kept, not the last
])
def test_refinement_loop(server, grades, expected):
    server.judge = grades
    r = make_memento(client(server), "Block text with x = 3 and y = 4. " * 20)
    assert r["scores"] == expected
    assert len(r["feedback"]) == len(expected) and r["feedback"][0] == "round 0: add the values"
    best = max(range(len(expected)), key=lambda i: (expected[i], i))
    assert r["memento"].startswith(f"v{best}:")
    tasks = [re.search(r"TASK: (\w+ \w+)", q["messages"][-1]["content"]).group(1) for q in server.requests]
    assert tasks.count("judge memento") == len(expected)
    assert tasks.count("refine memento") == len(expected) - 1


def test_memento_with_a_special_token_is_retried(server):
    server.plan["write memento"] = ["reserved"]
    r = make_memento(client(server), "Some block. " * 30)
    assert r["memento"].startswith("v0: result") and len(server.requests) == 3


def test_judge_reply_of_wrong_shape_is_retried(server):
    server.plan["judge memento"] = ["bad_shape"]
    assert make_memento(client(server), "Some block. " * 30)["scores"] == [9]
    server.plan["judge memento"] = ["bad_shape"] * 10
    with pytest.raises(LLMError, match="judge criteria"):
        make_memento(client(server, max_retries=1), "Some block. " * 30)


# ---------------------------------------------------------------- driver: resume, e2e

def synthetic_traces(k: int) -> list[dict]:
    out = []
    for t in range(k):
        steps = " ".join(f"Step {i} of trace {t} computes the value {i * t} carefully." for i in range(12))
        out.append({"task_id": f"syn-{t}", "cot": f"<think> {steps} </think>\nThe answer is {t}.",
                    "problem": f"Problem {t}", "source": "synthetic", "domain": "math"})
    return out


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def output_ids(path: Path) -> list[str]:
    return [json.loads(line)["pipeline"]["trace_id"] for line in path.read_text().splitlines()]


SMALL = Config(min_trace_tokens=0, min_block_tokens=40)


def test_interrupted_run_resumes_without_loss_or_duplicates(server, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    traces = synthetic_traces(6)
    rejects = [{"task_id": "cjk", "cot": "<think> 中文的推理 </think> 1"}, {"task_id": "open", "cot": "<think> no end"}]
    write_jsonl(inp, traces + [traces[2]] + rejects)  # a duplicate input line is processed once
    server.fail_after = 14  # ~2 traces' worth of requests, then the server breaks
    with pytest.raises(LLMError):
        run_pipeline(inp, out, client(server, max_retries=1), SMALL, progress=False, log=lambda s: None, bad="skip")
    first = output_ids(out)
    assert 1 <= len(first) < 6 and len(set(first)) == len(first)
    # a crash in the middle of a write leaves half a line; it must be dropped on resume
    with open(out, "a") as f:
        f.write('{"problem": "half a li')
    server.fail_after = None
    stats = run_pipeline(inp, out, client(server), SMALL, workers=3, progress=False, log=lambda s: None, bad="skip")
    ids = output_ids(out)
    assert sorted(ids) == sorted(t["task_id"] for t in traces)
    assert ids[:len(first)] == first
    assert stats["already_done"] == len(first) and stats["written"] == 6 - len(first)
    assert stats["duplicates"] == 1 and stats["filtered"] == {"cjk": 1, "no_close_think": 1}
    # a third run has nothing left to do
    n_req = len(server.requests)
    stats = run_pipeline(inp, out, client(server), SMALL, progress=False, log=lambda s: None, bad="skip")
    assert stats["written"] == 0 and len(server.requests) == n_req and output_ids(out) == ids


def test_unusable_trace_is_skipped_and_the_run_goes_on(server, tmp_path, monkeypatch):
    import data.pipeline.run as run_mod

    real = run_mod.split_sentences

    def split(text, *a):
        if "trace 1 " in text:
            raise ValueError("cannot split this one")
        return real(text, *a)

    monkeypatch.setattr(run_mod, "split_sentences", split)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, synthetic_traces(3) + [{"task_id": "empty", "cot": "<think> </think> 1"}])
    logs = []
    stats = run_pipeline(inp, out, client(server), SMALL, workers=2, progress=False, log=logs.append)
    assert sorted(output_ids(out)) == ["syn-0", "syn-2"]
    assert stats["failed"] == 1 and stats["filtered"] == {"too_short": 1}
    assert any("skipped trace syn-1: cannot split this one" in line for line in logs)
    with pytest.raises(ValueError, match="window >= 2"):
        run_pipeline(inp, out, client(server), Config(window=1), progress=False, log=logs.append)


def test_read_done_rejects_a_corrupt_middle_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('not json\n{"pipeline": {"trace_id": "a"}}\n')
    with pytest.raises(ValueError, match="out.jsonl:1"):
        read_done(out)
    out.write_text('{"pipeline": {"trace_id": "a"}}\n{"pipeline": {"trace_id": "b"')
    assert read_done(out) == {"a"}
    assert out.read_text() == '{"pipeline": {"trace_id": "a"}}\n'


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "data.pipeline", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_end_to_end_on_the_raw_sample_trace(server, tmp_path):
    out = tmp_path / "out.jsonl"
    server.judge = {0: 6, 1: 9}
    # `python -m data.pipeline` with data/ a namespace package (no data/__init__.py)
    assert not (REPO / "data" / "__init__.py").exists()
    p = run_cli("--input", str(require_shared_data() / "raw_cot_trace.jsonl"), "--output", str(out),
                "--base-url", server.url, "--model", "fake-model", "--two-pass", "--no-progress",
                "--timeout", "5", "--retries", "1", "--backoff", "0.01")
    assert p.returncode == 0, p.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    raw = json.loads((require_shared_data() / "raw_cot_trace.jsonl").read_text().splitlines()[0])
    for k in ("problem", "domain", "source"):
        assert rec[k] == raw[k]
    assert rec["difficulty"] is None
    body, answer = think_parts(raw["cot"])
    assert "".join(rec["sentences"]) == body
    blocks = rec["blocks"]
    assert blocks[0][0] == 0 and blocks[-1][1] == len(rec["sentences"]) - 1 and len(blocks) >= 2
    assert all(b[0] == a[1] + 1 for a, b in zip(blocks, blocks[1:]))
    assert all(t >= 200 for t in rec["pipeline"]["block_tokens"])
    assert len(rec["pipeline"]["boundary_scores"]) == len(rec["sentences"]) - 1
    assert all(s * 2 == int(s * 2) for s in rec["pipeline"]["boundary_scores"])
    assert rec["pipeline"]["judge_scores"] == [[6, 9]] * len(blocks)
    # the response parses into blocks and mementos, special tokens in order
    texts, mementos, ans = parse_response(rec["response"])
    assert texts == ["".join(rec["sentences"][a:b + 1]).strip() for a, b in blocks]
    assert mementos == rec["block_summaries"] and all(m.startswith("v1:") for m in mementos)
    assert ans == answer
    assert rec["response"].startswith("<think>\n") and "</think>\n" in rec["response"]
    # the SFT loader accepts the output, and both stages train a step on it
    import sft
    from data import openmementos
    from tokenizer import Tokenizer

    rows, read = openmementos.read_records(str(out), bad="error")
    examples, report = openmementos.tokenize([r.data for r in rows], Tokenizer.byte_level(), 1024)
    assert report == {"kept": 1, "truncated": 1, "skipped": 0, "reasons": {}}  # a long trace, cut at 1024
    tiny = ["--data", str(out), "--max-steps", "1", "--max-seq-len", "1024", "--layers", "1", "--hidden", "32",
            "--heads", "2", "--kv-heads", "1", "--no-progress"]
    for stage, extra in (("1", []), ("2", ["--init-from", str(tmp_path / "s1")])):
        m = sft.train(sft.parse_args(["--stage", stage, "--out", str(tmp_path / f"s{stage}"), *tiny, *extra]))
        assert m["steps"] == 1 and m["final_loss"] > 0
    toks = re.findall("|".join(re.escape(t) for t in SPECIAL), rec["response"])
    assert toks == SPECIAL * len(blocks)
    # rerunning finds the trace done and changes nothing
    p = run_cli("--input", str(require_shared_data() / "raw_cot_trace.jsonl"), "--output", str(out),
                "--base-url", server.url, "--model", "fake-model", "--no-progress")
    assert p.returncode == 0 and out.read_text().splitlines() == lines
    assert "1 already done" in p.stderr


def test_cli_reports_an_unreachable_endpoint(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, synthetic_traces(1))
    p = run_cli("--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--base-url",
                f"http://127.0.0.1:{free_port()}/v1", "--model", "m", "--min-trace-tokens", "0",
                "--retries", "1", "--backoff", "0.01", "--timeout", "1", "--no-progress")
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "unreachable" in err[0] and "--base-url" in err[0] and "resume" in err[0]
    p = run_cli("--input", str(tmp_path / "missing.jsonl"), "--output", "x", "--base-url", "u", "--model", "m")
    assert p.returncode == 2 and "no such file" in p.stderr
    p = run_cli("--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--base-url", "u", "--model", "m",
                "--tokenizer", str(tmp_path / "missing.json"))
    assert p.returncode == 2 and "--tokenizer" in p.stderr and "no such file" in p.stderr
