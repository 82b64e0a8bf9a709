"""serve.py, the OpenAI-compatible server (paper §6.1 serving), against the offline Engine.

serve.py runs as a subprocess on a free 127.0.0.1 port with a tiny random checkpoint; the real
`openai` client and `httpx` talk to it. The reference for every answer is an Engine built in
this process from the same checkpoint: a request's tokens depend only on its prompt, seed and
parameters (sampling.py), so the server's texts, token counts and KV figures must equal the
offline run's whatever the server batched, preempted or aborted beside them. Engine.abort and
the pieces of streaming text are checked here too.
"""
import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import REPO, memento_text, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from blocks import BlockTracker, MementoConfig, MementoTokens
from engine import Engine, EngineConfig, generate, load
from kv_cache import curve_stats
from model import Qwen3, Qwen3Config
from sampling import SamplingParams, request_seed
from tokenizer import CHATML_TEMPLATE, Tokenizer

TOK = Tokenizer.byte_level()
FMT = MementoTokens.from_tokenizer(TOK)
KEY = "test-key-0123"
MAX_POS, POOL, PAGE = 2048, 1200, 4  # the server's pool: 300 pages of 4 tokens, small enough to preempt
# a prompt whose assistant turn already holds one completed block: memento mode evicts it
BLOCK = "<think>\n<|block_start|>add three and four<|block_end|>\n<|summary_start|>7<|summary_end|>\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A serve.py subprocess: its URL, its log file, and `stop()` (by its PID)."""

    def __init__(self, ckpt, log_path, *flags, env=None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--checkpoint", str(ckpt), "--port",
                                      str(self.port), "--uvicorn-log-level", "warning", *flags],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.log_path = log_path

    def wait_healthy(self, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve.py exited with {self.proc.returncode}: {open(self.log_path).read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"serve.py not healthy after {timeout} s: {open(self.log_path).read()[-2000:]}")

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 1-layer random Qwen3 with 2,048 positions and the byte-level tokenizer."""
    d = tmp_path_factory.mktemp("serve_ckpt")
    cfg = Qwen3Config(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=MAX_POS, tie_word_embeddings=True,
                      rope_theta=10000.0)
    Qwen3(cfg).init_weights(std=0.15, seed=3).eval().save_pretrained(d)
    TOK.save(d)
    return d


@pytest.fixture(scope="module")
def servers(ckpt, tmp_path_factory):
    """Two servers started together: `main` (key from $MEMENTO_API_KEY, a pool of 1,200 tokens,
    small limits) and `slow` (key from --api-key, requests time out after 0.3 s)."""
    logs = tmp_path_factory.mktemp("serve_logs")
    main = Server(ckpt, logs / "main.log", "--kv-cache-tokens", str(POOL), "--page-size", str(PAGE), "--max-num-seqs",
                  "32", "--max-request-bytes", "8192", "--max-n", "4", env={"MEMENTO_API_KEY": KEY})
    slow = Server(ckpt, logs / "slow.log", "--kv-cache-tokens", "4096", "--request-timeout", "0.3", "--api-key", "k2",
                  env={"MEMENTO_API_KEY": ""})
    try:
        main.wait_healthy()
        slow.wait_healthy()
        yield {"main": main, "slow": slow}
    finally:
        main.stop()
        slow.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def model(ckpt):
    return load(str(ckpt))[0]


def client(server, key=KEY):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def offline(model, jobs):
    """The reference: (prompt ids, SamplingParams, mode, forced) jobs through one Engine with an
    unbounded pool, in this process. Returns their Sequences."""
    eng = Engine(model, TOK, EngineConfig(MementoConfig(0), unbounded_kv_cache=True))
    seqs = [eng.add(p, sp, mode=mode, forced=forced) for p, sp, mode, forced in jobs]
    eng.run()
    return seqs


def answer_text(seq) -> str:
    """What the server must answer for an offline Sequence: its text, less a final stop token
    (OpenAI and vLLM leave the end-of-turn token out of the text)."""
    return TOK.decode(seq.tokens[:-1]) if seq.stop_reason == "stop token" else seq.text


def kv_figures(seq, mode: str) -> dict:
    """usage.memento for an offline Sequence: curve_stats of its curve, and the blocks a fresh
    tracker over its whole stream says are evicted (none in full mode)."""
    st_ = curve_stats(seq.curve, 0)
    tr = BlockTracker(FMT, MementoConfig(0))
    evicted = sum(len(tr.step(t)) for t in seq.prompt + seq.tokens)
    out = {k: st_[k] for k in ("peak_kv_tokens", "final_kv_tokens", "kv_auc", "full_cache_peak_kv_tokens",
                               "full_cache_kv_auc")}
    return {**out, "blocks_evicted": 0 if mode == "full" else evicted}


def metrics(server, key=KEY) -> dict:
    """/metrics as {(name, frozenset of labels): value}; m[name] for an unlabelled sample."""
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
            if not s.labels:
                out[s.name] = s.value
    return out


def aborted(m) -> float:
    return m.get(("memento_request_success_total", frozenset({("finished_reason", "abort")})), 0.0)


def wait_idle(server, key=KEY, timeout=30.0) -> dict:
    """/metrics once nothing runs or waits (bounded in time)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server, key)
        if m["memento_num_requests_running"] == 0 and m["memento_num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"server still busy after {timeout} s: {m}"
        time.sleep(0.05)


def read_sse(lines) -> tuple[list[dict], bool]:
    """The JSON events of a server-sent-event stream, and whether it ended with [DONE]."""
    events, done = [], False
    for line in lines:
        if line.startswith("data: "):
            assert not done, "an event after [DONE]"
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[len("data: "):]))
    return events, done


# ------------------------------------------------------------------ answers equal the offline engine


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_completions_equal_the_offline_engine(server, model, stream):
    """Two choices (seeds request_seed(S, 0 / 1)), a stop string that spans tokens, log-probs:
    text, usage counts, usage.memento and the sampled tokens' log-probabilities as offline."""
    prompt = TOK.chat_prompt("sum 3 blocks from 4") + BLOCK
    ids = TOK.encode(prompt)
    base = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=24, logprobs=2)
    first = offline(model, [(ids, dataclasses.replace(base, seed=request_seed(11, 0)), "memento", None)])[0]
    # two printable bytes from inside the response (one token each): a stop string across two tokens
    stop = next(first.text[i:i + 2] for i in range(2, len(first.text) - 1)
                if all(32 < ord(ch) < 127 for ch in first.text[i:i + 2]) and first.text.find(first.text[i:i + 2]) == i)
    ref = offline(model, [(ids, dataclasses.replace(base, stop=(stop,), seed=request_seed(11, k)), "memento", None)
                          for k in range(2)])
    assert ref[0].stop_reason == "stop string"
    c = client(server)
    kw = dict(model=c.models.list().data[0].id, prompt=prompt, max_tokens=24, temperature=0.9, top_p=0.95, seed=11, n=2,
              stop=stop, logprobs=2, extra_body={"top_k": 50})
    if stream:
        texts, lps, usage, reasons = ["", ""], [[], []], None, [None, None]
        for chunk in c.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            for ch in chunk.choices:
                texts[ch.index] += ch.text
                lps[ch.index] += ch.logprobs.token_logprobs if ch.logprobs else []
                reasons[ch.index] = ch.finish_reason or reasons[ch.index]
            usage = chunk.usage or usage
    else:
        r = c.completions.create(**kw)
        texts = [ch.text for ch in r.choices]
        lps = [ch.logprobs.token_logprobs for ch in r.choices]
        reasons = [ch.finish_reason for ch in r.choices]
        usage = r.usage
        # the two most likely tokens of the first position, as strings (ids past the tokenizer are never sampled)
        want = {TOK.decode_bytes([a]).decode("utf-8", "replace"): b for a, b in ref[1].top_logprobs[0].items()
                if a < TOK.n_vocab}
        assert r.choices[1].logprobs.top_logprobs[0] == pytest.approx(want, abs=1e-5)
    assert texts == [answer_text(s) for s in ref]
    assert reasons[0] == "stop" and reasons == [{"max_tokens": "length"}.get(s.stop_reason, "stop") for s in ref]
    for got, s in zip(lps, ref):
        assert got == pytest.approx(s.logprobs, abs=1e-5)
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == sum(len(s.tokens) for s in ref)
    assert usage.total_tokens == len(ids) + usage.completion_tokens
    want = [kv_figures(s, "memento") for s in ref]
    summed = {k: sum(w[k] for w in want) for k in want[0]}
    assert summed["blocks_evicted"] >= 2  # the prompt's block, evicted in each choice
    assert {k: usage.memento[k] for k in summed} == summed and usage.memento["mode"] == "memento"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_equals_the_offline_engine(server, model, stream):
    """A conversation in ChatML (its assistant turn holds a block, evicted), seed 5."""
    turns = [("user", "sum 3 blocks from 4"), ("assistant", BLOCK + "</think>\n7"), ("user", "and again")]
    messages = [{"role": r, "content": t} for r, t in turns[:2]] + [{"role": "user", "content": [{"type": "text",
                                                                                                 "text": "and again"}]}]
    ids = TOK.encode("".join(f"<|im_start|>{r}\n{t}<|im_end|>\n" for r, t in turns) + "<|im_start|>assistant\n")
    ref = offline(model, [(ids, SamplingParams(max_tokens=20, seed=request_seed(5, 0)), "memento", None)])[0]
    c = client(server)
    name = c.models.list().data[0].id
    if stream:
        text, usage, roles = "", None, []
        for chunk in c.chat.completions.create(model=name, messages=messages, max_tokens=20, seed=5, stream=True,
                                               stream_options={"include_usage": True}):
            for ch in chunk.choices:
                text += ch.delta.content or ""
                roles += [ch.delta.role] if ch.delta.role else []
            usage = chunk.usage or usage
        assert roles == ["assistant"]
    else:
        r = c.chat.completions.create(model=name, messages=messages, max_tokens=20, seed=5)  # the paper's sampling defaults
        text, usage = r.choices[0].message.content, r.usage
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert text == answer_text(ref)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(ref.tokens))
    assert {k: usage.memento[k] for k in kv_figures(ref, "memento")} == kv_figures(ref, "memento")
    assert usage.memento["blocks_evicted"] >= 1


def test_a_list_of_prompts_is_prompt_major(server, model):
    """Two prompts with n=2: choice p * 2 + k is prompt p sampled with seed request_seed(S, p * 2 + k),
    as generate.py --num-samples 2 --seed S numbers its requests; prompt_tokens counts each prompt once."""
    texts = ["sum 3 blocks from 1", "sum 6 blocks from 9"]
    ids = [TOK.encode(t) for t in texts]
    ref = offline(model, [(ids[j // 2], SamplingParams(max_tokens=10, seed=request_seed(21, j)), "memento", None)
                          for j in range(4)])
    r = client(server).completions.create(model=client(server).models.list().data[0].id, prompt=texts, n=2,
                                          max_tokens=10, seed=21)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [answer_text(s) for s in ref]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == sum(len(s.tokens) for s in ref)


def test_memento_modes_equal_the_engines_modes(server, model):
    """memento_mode memento / full / restart, sampled and teacher-forced (memento_replay): the
    same tokens and KV figures as Engine.add(mode=...); compaction really held less."""
    rng = random.Random(4)
    prompt = TOK.chat_prompt("sum 4 blocks from 2") + BLOCK
    trace = memento_text(rng, n_blocks=4)
    c = client(server)
    name = c.models.list().data[0].id
    got = {}
    for mode in ("memento", "full", "restart"):
        for replay in (None, trace):
            body = {"memento_mode": mode} | ({"memento_replay": replay} if replay else {})
            # a replay runs to its end: max_tokens is refused with it
            r = c.completions.create(model=name, prompt=prompt, temperature=1.0, seed=9, extra_body=body,
                                     **({} if replay else {"max_tokens": 16}))
            sp = SamplingParams(temperature=1.0, max_tokens=16, seed=request_seed(9, 0))
            ref = offline(model, [(TOK.encode(prompt), sp, mode, None if replay is None else TOK.encode(replay))])[0]
            assert r.choices[0].text == answer_text(ref)
            assert r.usage.completion_tokens == len(ref.tokens)
            assert {k: r.usage.memento[k] for k in kv_figures(ref, mode)} == kv_figures(ref, mode)
            assert r.usage.memento["mode"] == mode
            got[mode, replay is not None] = r.usage.memento
    assert got["full", True]["peak_kv_tokens"] == got["full", True]["full_cache_peak_kv_tokens"]
    assert got["memento", True]["peak_kv_tokens"] < got["full", True]["peak_kv_tokens"]
    assert got["memento", True]["blocks_evicted"] == 5 and got["restart", True]["blocks_evicted"] == 5


# ------------------------------------------------------------------ load, preemption, disconnects


async def _stream(http: httpx.AsyncClient, body: dict) -> tuple[str, dict, bool]:
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        events, done = read_sse([line async for line in r.aiter_lines()])
    usage = next(e["usage"] for e in events if e.get("usage"))
    return "".join(c["text"] for e in events for c in e["choices"]), usage, done


def test_32_concurrent_streams_through_a_pool_that_preempts(server, model):
    """32 streaming clients at once through a 1,200-token pool: sequences are preempted, every
    stream ends with [DONE] and equals its offline run, and every page comes back."""
    before = wait_idle(server)
    prompts = [TOK.encode(TOK.chat_prompt(f"sum {3 + i % 4} blocks from {i % 10}")) for i in range(32)]
    params = [SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=i % 2 == 0, seed=request_seed(100 + i, 0))
              for i in range(32)]
    ref = offline(model, [(p, sp, "memento", None) for p, sp in zip(prompts, params)])

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as http:
            bodies = [{"prompt": p, "max_tokens": 40, "temperature": 0.8, "ignore_eos": sp.ignore_eos, "seed": 100 + i,
                       "stream": True, "stream_options": {"include_usage": True}}
                      for i, (p, sp) in enumerate(zip(prompts, params))]
            return await asyncio.wait_for(asyncio.gather(*(_stream(http, b) for b in bodies)), 120)

    results = asyncio.run(main())
    for (text, usage, done), s in zip(results, ref):
        assert done and text == answer_text(s)
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(s.prompt), len(s.tokens))
        assert {k: usage["memento"][k] for k in kv_figures(s, "memento")} == kv_figures(s, "memento")
    m = wait_idle(server)
    assert m["memento_num_preemptions_total"] > before["memento_num_preemptions_total"]
    assert sum(usage["memento"]["preemptions"] for _, usage, _ in results) > 0
    assert m["memento_kv_pages_used"] == 0 and m["memento_kv_pages_total"] == POOL // PAGE
    assert m["memento_time_to_first_token_seconds_count"] >= 32 + before["memento_time_to_first_token_seconds_count"]
    generated = m["memento_generation_tokens_total"] - before["memento_generation_tokens_total"]
    assert generated == sum(len(s.tokens) for s in ref)


def test_a_client_that_disconnects_is_aborted_and_frees_its_pages(server, model):
    """Three streams; one reads three chunks of a long response and hangs up: the engine aborts
    it (its pages come back, the pool ends empty), the other two equal their offline runs. A
    client that stops waiting for a JSON answer is aborted as well."""
    before = wait_idle(server)
    prompts = [TOK.encode(TOK.chat_prompt(f"sum {n} blocks from 1")) for n in (3, 4, 5)]
    ref = offline(model, [(p, SamplingParams(max_tokens=30, seed=request_seed(7 + i, 0)), "memento", None)
                          for i, p in enumerate(prompts[:2])])

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as http:
            async def leaver():
                body = {"prompt": prompts[2], "max_tokens": 900, "ignore_eos": True, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    n = 0
                    async for line in r.aiter_lines():
                        n += line.startswith("data: ")
                        if n == 3:
                            break  # leaving the block closes the connection mid-stream
            normal = [_stream(http, {"prompt": p, "max_tokens": 30, "seed": 7 + i, "stream": True,
                                     "stream_options": {"include_usage": True}}) for i, p in enumerate(prompts[:2])]
            return await asyncio.wait_for(asyncio.gather(leaver(), *normal), 60)

    _, *results = asyncio.run(main())
    for (text, usage, done), s in zip(results, ref):
        assert done and text == answer_text(s) and usage["completion_tokens"] == len(s.tokens)
    m = wait_idle(server)
    assert aborted(m) == aborted(before) + 1
    assert m["memento_kv_pages_used"] == 0
    # a client waiting for a JSON answer that gives up is noticed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                   json={"prompt": prompts[2], "max_tokens": 1500, "ignore_eos": True})
    m = wait_idle(server)
    assert aborted(m) == aborted(before) + 2 and m["memento_kv_pages_used"] == 0


def test_a_request_past_its_timeout_is_aborted(servers):
    """--request-timeout 0.3: a long answer gets 504 with an error object (JSON), or an error
    event then [DONE] (stream); both are aborted in the engine, whose pool ends empty."""
    slow = servers["slow"]
    body = {"prompt": "x", "max_tokens": 1000, "ignore_eos": True}
    auth = {"Authorization": "Bearer k2"}
    r = httpx.post(f"{slow.url}/v1/completions", json=body, headers=auth, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    with httpx.stream("POST", f"{slow.url}/v1/completions", json={**body, "stream": True}, headers=auth, timeout=30) as r:
        events, done = read_sse(list(r.iter_lines()))
    assert done and "timed out" in events[-1]["error"]["message"]
    m = wait_idle(slow, "k2")
    assert aborted(m) == 2 and m["memento_kv_pages_used"] == 0


# ------------------------------------------------------------------ access and bad input


def test_api_key(servers):
    """$MEMENTO_API_KEY and --api-key: no header or a wrong key get 401 with an error object on
    every endpoint but /health; the right key works, its scheme in any case (RFC 7235)."""
    for srv, key in ((servers["main"], KEY), (servers["slow"], "k2")):
        for path in ("/v1/models", "/metrics", "/v1/completions"):
            for headers in ({}, {"Authorization": f"Bearer {key}x"}, {"Authorization": key}):
                r = httpx.request("POST" if path == "/v1/completions" else "GET", srv.url + path, headers=headers,
                                  json={"prompt": "x", "max_tokens": 1}, timeout=10)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        ok = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert ok.status_code == 200 and ok.json()["data"][0]["max_model_len"] == MAX_POS
        for scheme in ("bearer", "BEARER", "bEaReR"):
            r = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"{scheme} {key}"}, timeout=10)
            assert r.status_code == 200 and r.json() == ok.json(), scheme
        for wrong in (f"Basic {key}", f"Bearer{key}", f"Bearer {key} {key}"):
            assert httpx.get(f"{srv.url}/v1/models", headers={"Authorization": wrong}, timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(servers["main"], key="wrong").models.list()


def test_bad_input_gets_an_error_object_and_the_server_keeps_serving(server, model):
    """Each bad request gets its status and an OpenAI error object (the message naming the
    figures where there are some); then a normal request still equals its offline run."""
    auth = {"Authorization": f"Bearer {KEY}"}
    name = client(server).models.list().data[0].id
    cases = [  # (path, body: dict or raw bytes, status, param, words the message holds)
        ("completions", b'{"prompt": "x",', 400, None, ["not valid JSON"]),
        ("completions", b'[1, 2]', 400, None, ["JSON object"]),
        ("completions", {"max_tokens": 4}, 400, "prompt", ["prompt"]),
        ("chat/completions", {"max_tokens": 4}, 400, "messages", ["messages"]),
        ("chat/completions", {"messages": [{"role": "user"}]}, 400, "messages", ["content"]),
        ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", ["gpt-4"]),
        ("completions", {"prompt": "a" * 2100}, 400, "prompt", ["2100", str(MAX_POS)]),
        ("completions", {"prompt": "a" * 1300}, 400, "prompt", ["1300", str(POOL)]),
        ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ["max_tokens"]),
        ("completions", {"prompt": "x", "max_tokens": MAX_POS}, 400, "max_tokens", [str(MAX_POS)]),
        ("completions", {"prompt": "x", "n": 0}, 400, "n", ["n=0"]),
        ("completions", {"prompt": "x", "n": 5}, 400, "n", ["--max-n 4"]),
        ("completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature", ["temperature"]),
        ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", ["number"]),
        ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p", ["top_p"]),
        ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", ["top_p"]),
        ("completions", {"prompt": "x", "memento_mode": "lossy"}, 400, "memento_mode", ["lossy"]),
        ("completions", {"prompt": "x", "echo": True}, 400, "echo", ["echo"]),
        ("completions", {"prompt": "a" * 9000}, 413, None, ["8192"]),
        ("nowhere", {}, 404, None, []),
    ]
    for path, body, status, param, words in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": {"model": name, **body}}
        r = httpx.post(f"{server.url}/v1/{path}", headers={**auth, "Content-Type": "application/json"}, timeout=30, **kw)
        err = r.json()["error"]
        assert r.status_code == status and set(err) == {"message", "type", "param", "code"}, (body, r.text)
        assert err["param"] == param and all(w in err["message"] for w in words), (body, err)
    # a chunked body (no Content-Length) is counted as it arrives
    r = httpx.post(f"{server.url}/v1/completions", headers={**auth, "Content-Type": "application/json"},
                   content=(b"x" * 1000 for _ in range(10)), timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    ids = TOK.encode("hello")
    ref = offline(model, [(ids, SamplingParams(max_tokens=8, seed=request_seed(2, 0)), "memento", None)])[0]
    assert client(server).completions.create(model=name, prompt="hello", max_tokens=8, seed=2).choices[0].text == \
        answer_text(ref)
    assert wait_idle(server)["memento_kv_pages_used"] == 0


def test_a_missing_checkpoint_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "serve.py"), "--checkpoint", str(tmp_path / "none")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "--checkpoint" in p.stderr


# ------------------------------------------------------------------ the data pipeline's client


def test_the_data_pipeline_can_use_the_server(server, model, tmp_path):
    """data.pipeline's ChatClient gets the offline greedy answer; `python -m data.pipeline
    --base-url` runs against the server (a random model writes no valid JSON: the pipeline's
    own validation reports a malformed reply, after the HTTP exchange worked)."""
    from data.pipeline.llm import ChatClient

    name = client(server).models.list().data[0].id
    msg = [{"role": "user", "content": "score these"}]
    ref = offline(model, [(TOK.encode(TOK.chat_prompt("score these")), SamplingParams(temperature=0, max_tokens=12),
                           "memento", None)])[0]
    chat = ChatClient(f"{server.url}/v1", name, api_key=KEY, temperature=0.0, max_tokens=12, max_retries=0)
    assert chat.chat(msg) == answer_text(ref)
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"cot": "<think>First we add. Then we check the sum. It is seven.</think> 7",
                               "problem": "3 + 4", "task_id": "t1"}) + "\n")
    p = subprocess.run([sys.executable, "-m", "data.pipeline", "--input", str(raw), "--output", str(tmp_path / "o.jsonl"),
                        "--base-url", f"{server.url}/v1", "--model", name, "--api-key-env", "SERVE_TEST_KEY",
                        "--min-trace-tokens", "0", "--max-tokens", "8", "--retries", "0", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "SERVE_TEST_KEY": KEY})
    assert p.returncode == 2 and "malformed reply" in p.stderr and "HTTP" not in p.stderr, p.stderr


# ------------------------------------------------------------------ the pieces


def test_engine_abort_drops_a_waiting_and_a_running_request():
    """Engine.abort: a running request's pages go back to the pool, a waiting one leaves the
    queue, both finish with "abort" through on_finish; the others get the tokens they get alone.
    Engine.release forgets a finished request (what the server does after answering)."""
    model = tiny_model(layers=1)
    prompts = [TOK.encode(TOK.chat_prompt(f"sum {i} blocks")) for i in range(4)]
    params = [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True, seed=i) for i in range(4)]
    finished = []
    eng = Engine(model, TOK, EngineConfig(MementoConfig(0), max_num_seqs=2, page_size=4, kv_cache_tokens=512),
                 on_finish=finished.append)
    seqs = [eng.add(p, sp) for p, sp in zip(prompts, params)]
    for _ in range(3):
        eng.step()
    running, waiting = seqs[0], seqs[3]
    assert running in eng.running and waiting in eng.waiting and running.tokens
    held, own = eng.cache.held_page_count(), len(eng.cache.seqs[running.id].pages)
    assert eng.abort(running) is running and eng.abort(waiting.id) is waiting
    assert eng.cache.held_page_count() == held - own and running.id not in eng.cache.seqs
    assert running not in eng.running and waiting not in eng.waiting and finished == [running, waiting]
    assert all(s.done and s.stop_reason == "abort" for s in (running, waiting))
    assert running.text == TOK.decode(running.tokens) and waiting.tokens == []
    eng.run()
    alone, _ = generate(model, TOK, prompts[1:3], EngineConfig(MementoConfig(0)), params[1:3])
    assert [s.tokens for s in seqs[1:3]] == [s.tokens for s in alone]
    assert eng.cache.held_page_count() == 0
    assert eng.abort(seqs[1]).stop_reason == "max_tokens" and len(finished) == 4  # finished: left as it is
    with pytest.raises(KeyError):
        eng.abort(99)
    with pytest.raises(ValueError, match="still"):  # Engine.release: finished requests only
        eng.release(eng.add(prompts[0], params[0]))
    eng.release(running)
    assert eng.sequences[running.id] is None and eng.sequences[seqs[1].id] is seqs[1]
    with pytest.raises(KeyError):
        eng.abort(running.id)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, TOK.n_vocab - 1), max_size=30), st.integers(0, 4), st.data())
def test_streamed_pieces_join_to_the_final_text(ids, hold, data):
    """TextStream over any token stream (cut UTF-8 characters, invalid bytes, special tokens),
    fed in random groups: what it has sent is always a prefix of the text decoded at once, and
    `finish` completes it exactly."""
    from serve import TextStream

    text = TOK.decode(ids)
    ts = TextStream(TOK, ("x" * (hold + 1),) if hold else ())
    sent, i = "", 0
    while i < len(ids):
        k = data.draw(st.integers(1, len(ids) - i))
        sent += ts.push(ids[i:i + k])
        i += k
        assert text.startswith(sent)
    assert sent + ts.finish(text) == text
    assert len(text) - len(sent) <= hold + 4 or not ids  # only the held bytes (and a cut character) wait


def test_chat_messages_are_the_checkpoints_chatml():
    """serve.chat_turns through Tokenizer.chat_ids equals Tokenizer.chat_prompt for one user
    turn and the saved ChatML template (rendered by jinja2) for a conversation, text parts
    joined."""
    import jinja2

    from serve import chat_turns

    assert TOK.chat_ids(chat_turns([{"role": "user", "content": "sum 3"}])) == TOK.encode(TOK.chat_prompt("sum 3"))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    want = TOK.encode(jinja2.Template(CHATML_TEMPLATE).render(messages=msgs, add_generation_prompt=True))
    assert TOK.chat_ids(chat_turns(msgs)) == want
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:1]}, {"type": "text", "text": m["content"][1:]}]}
             for m in msgs]
    assert TOK.chat_ids(chat_turns(parts)) == want


def test_http_benchmark_runs(tmp_path):
    """bench/bench_http.py --quick end to end: a server on a free loopback port, both modes
    over HTTP and in process, every request's whole trace back (the real run is minutes)."""
    r = subprocess.run([sys.executable, "bench/bench_http.py", "--quick", "--out", str(tmp_path / "http.txt")], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "every request returned its whole trace in both paths" in r.stdout and "server overhead" in r.stdout
