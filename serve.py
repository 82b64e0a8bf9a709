"""An OpenAI-compatible HTTP server over the compacting engine (paper §6.1 serving).

    python serve.py --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--kv-cache-tokens N]

GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics
(Prometheus). Requests take OpenAI's fields and vLLM's extras (top_k, min_p, ignore_eos,
stop_token_ids), and two of this repository: `memento_mode` ("memento", "full" or "restart":
how the request uses its KV cache, engine.Mode) and `memento_replay` (a response to
teacher-force instead of sampling, as generate.py --replay). `usage.memento` holds the
request's KV figures (§A.3.1, kv_cache.curve_stats of its curve).

One engine.Engine runs in one background thread. Handlers put new requests and aborts into a
thread-safe queue; between two Engine.step calls the thread calls Engine.add / Engine.abort,
and after each step it hands every request the step's tokens in one call to its asyncio queue.
Sampling, stop strings and per-request metrics are the engine's; the server parses and formats.
It binds to loopback unless --host says otherwise; --api-key (or MEMENTO_API_KEY) guards every
endpoint but /health. Examples: docs/serving.md, "Serving over HTTP".
"""
from __future__ import annotations

import asyncio
import codecs
import dataclasses
import hmac
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from cli import (DEFAULT_CHECKPOINT, ArgumentParser, add_generation_args, engine_config, kv_cache_budget, load_or_exit,
                 nonnegative_int, positive_float, positive_int)
from engine import Engine, Mode, check_mode
from kv_cache import curve_stats
from sampling import SamplingParams, request_seed

log = logging.getLogger("memento.serve")
FINISH = {"stop token": "stop", "stop string": "stop", "end of trace": "stop", "abort": "abort"}  # else "length"
# OpenAI fields that change what is generated and that this server does not implement: refused, never ignored
UNSUPPORTED = {"echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}), "best_of": (None, 1),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
               "tools": (None, [])}


class APIError(Exception):
    """A request that gets an OpenAI error object {"error": {message, type, param, code}} with
    an HTTP status (paper §6.1 serving): 4xx for the client's mistakes, 5xx for the server's."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """The error object, as a dict."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error object as a JSON response with its status."""
        return JSONResponse(self.body(), status_code=self.status)


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass(eq=False)
class Job:
    """One HTTP request's work for the engine (paper §6.1 serving): a (prompt ids, SamplingParams)
    pair per choice, its Mode, a response to teacher-force (or None), how to answer. `queue`
    receives lists of events from the engine thread: ("accepted",), ("error", status, message),
    ("token", choice, id, logprob, top) and ("finish", choice, result); `seqs` is the engine
    thread's, `finished` the event loop's."""

    choices: list[tuple[list[int], SamplingParams]]
    mode: Mode
    forced: list[int] | None
    chat: bool
    stream: bool
    stream_usage: bool
    logprobs: int | None
    n: int = 1
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None
    seqs: list = dataclasses.field(default_factory=list)
    finished: int = 0


def _field(body: dict, name: str, kinds: tuple, what: str, default=None):
    """body[name] if it is one of `kinds` (a bool is never a number), `default` when absent or
    null. Raises APIError 400 naming the field otherwise."""
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(v)[:40]}", name)
    return v


def chat_text(messages) -> str:
    """OpenAI chat messages as the ChatML this repository trains with (paper §3, no system prompt
    added): one `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then the assistant turn
    opened; for one user message exactly Tokenizer.chat_prompt. Content is a string or a list
    of text parts. Raises APIError 400 for a missing or malformed list."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] needs a string 'role' and a text 'content'", "messages")
        out.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
    return "".join(out) + "<|im_start|>assistant\n"


def prompt_ids(prompt, tok) -> list[list[int]]:
    """The token ids of each prompt of a completions request: a string, a list of strings, a
    list of token ids or a list of such lists (special tokens written in text become their
    ids, as in generate.py; paper §6.1 serving). Raises APIError 400 for anything else."""
    is_ids = lambda x: isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)  # noqa: E731
    if isinstance(prompt, str):
        return [tok.encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if is_ids(prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return [tok.encode(p) for p in prompt]
        if all(is_ids(p) for p in prompt):
            return prompt
    raise APIError(400, "'prompt' is required: a string, a list of strings, token ids, or lists of token ids", "prompt")


def parse_request(body, chat: bool, srv: Server) -> Job:
    """A Job from a (chat) completions request body, every field checked (paper §6.1 serving).
    Choice k of prompt p samples with seed request_seed(seed, p * n + k), as generate.py's
    request of that index. Raises APIError: 404 for another model, 400 for the rest."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = _field(body, "model", (str,), "a string", srv.name)
    if model != srv.name:
        raise APIError(404, f"the model `{model}` does not exist; this server serves `{srv.name}`", "model",
                       "model_not_found")
    bad = [k for k, ok in UNSUPPORTED.items() if body.get(k) not in ok]
    if bad:
        raise APIError(400, f"'{bad[0]}' is not supported by this server", bad[0])
    prompts = [srv.tok.encode(chat_text(body.get("messages")))] if chat else prompt_ids(body.get("prompt"), srv.tok)
    n = _field(body, "n", (int,), "an integer", 1)
    if not 1 <= n * len(prompts) <= srv.max_n:
        raise APIError(400, f"n={n} for {len(prompts)} prompt(s): use n >= 1 and at most --max-n {srv.max_n} "
                            "choices per request", "n")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, name, (int,), "an integer")
    if max_tokens is not None and max_tokens > srv.max_tokens_limit:
        raise APIError(400, f"{name}={max_tokens} is above this server's --max-tokens-limit {srv.max_tokens_limit}", name)
    if chat:
        k = _field(body, "top_logprobs", (int,), "an integer", 0) if _field(body, "logprobs", (bool,), "a boolean") else None
    else:
        k = _field(body, "logprobs", (int,), "an integer")
    if k is not None and k > srv.max_logprobs:
        raise APIError(400, f"{k} top log-probabilities asked; this server gives at most --max-logprobs {srv.max_logprobs}",
                       "top_logprobs" if chat else "logprobs")
    replay = _field(body, "memento_replay", (str, list), "a string or a list of token ids")
    replay = srv.tok.encode(replay) if isinstance(replay, str) else replay
    if replay is not None and not (replay and all(isinstance(t, int) and not isinstance(t, bool) for t in replay)):
        raise APIError(400, "'memento_replay' must be a non-empty string or list of token ids", "memento_replay")
    if replay is not None and k is not None:
        raise APIError(400, "log-probabilities are not computed for a teacher-forced response (memento_replay)", "logprobs")
    try:
        mode = check_mode(_field(body, "memento_mode", (str,), "a string", "memento"), srv.loop.engine.config.masking)
    except ValueError as e:
        raise APIError(400, str(e), "memento_mode") from None
    number, what = (int, float), "a number"
    given = {"temperature": _field(body, "temperature", number, what), "top_p": _field(body, "top_p", number, what),
             "top_k": _field(body, "top_k", (int,), "an integer"), "min_p": _field(body, "min_p", number, what),
             "stop": _field(body, "stop", (str, list), "a string or a list of strings"),
             "stop_token_ids": _field(body, "stop_token_ids", (list,), "a list of token ids"),
             "ignore_eos": _field(body, "ignore_eos", (bool,), "a boolean"), "max_tokens": max_tokens, "logprobs": k}
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in given["stop_token_ids"] or ()):
        raise APIError(400, "'stop_token_ids' must be a list of token ids", "stop_token_ids")
    seed = _field(body, "seed", (int,), "an integer")
    stream = _field(body, "stream", (bool,), "a boolean", False)
    options = _field(body, "stream_options", (dict,), "an object", {})
    try:
        base = dataclasses.replace(srv.sampling, **{f: v for f, v in given.items() if v is not None})
        # without max_tokens a response may run to the last position, as in generate.py
        default = lambda p: max(1, min(base.max_tokens, srv.max_tokens_limit, srv.max_pos - len(p)))  # noqa: E731
        choices = [(p, dataclasses.replace(base, seed=request_seed(seed, i * n + j), max_tokens=max_tokens or default(p)))
                   for i, p in enumerate(prompts) for j in range(n)]
    except (ValueError, TypeError) as e:  # SamplingParams names the field: "SamplingParams: top_p=2 (...)"
        m = re.search(r"(\w+)=", str(e))
        raise APIError(400, str(e), m.group(1) if m else None) from None
    return Job(choices, mode, replay, chat, stream, bool(options.get("include_usage")), k, n)


# ----------------------------------------------------------------------------- the engine thread


class Metrics:
    """Prometheus metrics in a registry of their own (paper §6.1 serving): requests running and
    waiting, KV pool pages used / total, preemptions, prompt and generated tokens, KV tokens
    evicted, finished requests by reason, and histograms (seconds) of time to first token,
    inter-token latency and end-to-end latency, from each request's Sequence.metrics()."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("memento_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("memento_num_requests_waiting", "Requests waiting (new or preempted)", registry=r)
        self.pages_used = Gauge("memento_kv_pages_used", "KV pool pages held by sequences", registry=r)
        self.pages_total = Gauge("memento_kv_pages_total", "KV pool pages (the budget)", registry=r)
        self.preemptions = Counter("memento_num_preemptions", "Sequences preempted (pages freed, queued again)", registry=r)
        self.prompt_tokens = Counter("memento_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("memento_generation_tokens", "Response tokens produced", registry=r)
        self.evicted = Counter("memento_kv_tokens_evicted", "KV tokens finished requests no longer held at their end "
                               "(fed minus held: blocks evicted by compaction)", registry=r)
        self.requests = Counter("memento_request_success", "Finished requests", ["finished_reason"], registry=r)
        b = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
        self.ttft = Histogram("memento_time_to_first_token_seconds", "Arrival to first token", buckets=b, registry=r)
        self.itl = Histogram("memento_inter_token_latency_seconds", "Between consecutive tokens", buckets=b, registry=r)
        self.e2e = Histogram("memento_e2e_request_latency_seconds", "Arrival to finish", buckets=b, registry=r)


class EngineLoop:
    """The one thread that drives the Engine (paper §6.1): takes ("add" | "abort", Job) from a
    thread-safe queue between steps, runs Engine.step while anything waits or runs, and after
    each step hands each Job its events with one loop.call_soon_threadsafe. Idle, it blocks on
    the queue. A finished request's Sequence is dropped from Engine.sequences, which a server
    running for weeks would otherwise keep forever."""

    def __init__(self, model, tok, config, metrics: Metrics):
        self.engine = Engine(model, tok, config, on_token=self._on_token, on_finish=self._on_finish)
        self.tok, self.metrics, self.inbox = tok, metrics, queue.Queue()
        self.jobs: dict[int, tuple[Job, int]] = {}  # sequence id -> (its Job, choice index), while it runs
        self.out: dict[Job, list] = {}              # events of this iteration
        self.preemptions = 0
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def put(self, kind: str, job: Job | None = None) -> None:
        """Queue "add" or "abort" for a Job, or "stop" (the thread ends)."""
        self.inbox.put((kind, job))

    def _run(self) -> None:
        eng = self.engine
        while True:
            items = []
            try:
                items.append(self.inbox.get(block=not (eng.waiting or eng.running)))
                while True:
                    items.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            for kind, job in items:
                if kind == "stop":
                    return
                if kind == "add":
                    self._add(job)
                else:
                    self._abort(job)
            if eng.waiting or eng.running:
                try:
                    eng.step()
                except Exception as e:  # a bug or out of memory: fail what is in flight, keep serving
                    log.exception("engine step failed")
                    for job in {j for j, _ in self.jobs.values()}:
                        self._fail(job, 500, f"the engine failed: {type(e).__name__}: {e}")
            self._flush()

    def _add(self, job: Job) -> None:
        eng = self.engine
        try:
            for prompt, params in job.choices:
                s = eng.add(prompt, params, forced=job.forced, mode=job.mode)
                job.seqs.append(s)
                if s.done:  # refused at once: its prefill can never fit the pool
                    raise ValueError(f"prompt of {len(prompt)} tokens cannot fit the KV pool of "
                                     f"{eng.cache.num_pages * eng.cache.page_size} tokens ({s.stop_reason})")
        except ValueError as e:  # Engine.add refused it, before anything changed
            self._fail(job, 400, str(e))
            return
        except Exception as e:  # a bug: this request fails, the server goes on
            log.exception("Engine.add failed")
            self._fail(job, 500, f"{type(e).__name__}: {e}")
            return
        self.jobs.update((s.id, (job, i)) for i, s in enumerate(job.seqs))
        self._send(job, [("accepted",)])

    def _fail(self, job: Job, status: int, message: str) -> None:
        """End all of a Job's sequences without telling it, then send it one error."""
        for s in job.seqs:
            self.jobs.pop(s.id, None)
        self._abort(job)
        self.out.pop(job, None)
        param = "max_tokens" if "max_tokens" in message else None
        self._send(job, [("error", status, message, param)])

    def _abort(self, job: Job) -> None:
        for s in job.seqs:
            self.engine.release(self.engine.abort(s))

    def _on_token(self, seq_id: int, t: int, kind: str) -> None:
        self.metrics.generation_tokens.inc()
        job, i = self.jobs.get(seq_id, (None, 0))
        if job is not None and job.stream:  # a JSON answer waits for the finish event alone
            s = self.engine.sequences[seq_id]
            # the engine appends a sampled token's log-probability just before it calls on_token
            has = len(s.logprobs) > len(s.tokens)
            top = s.top_logprobs[-1] if has and s.params.logprobs else None
            self.out.setdefault(job, []).append(("token", i, t, s.logprobs[-1] if has else None, top))

    def _on_finish(self, s) -> None:
        self.engine.release(s)
        if s.id not in self.jobs:  # refused by Engine.add, or failed: the client got an error instead
            return
        job, i = self.jobs.pop(s.id)
        self.out.setdefault(job, []).append(("finish", i, self._result(s)))
        m, metrics, curve = s.metrics(), self.metrics, s.curve
        metrics.requests.labels(FINISH.get(s.stop_reason, "length")).inc()
        metrics.prompt_tokens.inc(len(s.prompt))
        metrics.evicted.inc(len(curve) - (curve[-1] if curve else 0))
        for h, x in ((metrics.ttft, m["ttft"]), (metrics.e2e, m["e2e_latency"]), *((metrics.itl, x) for x in s.itl)):
            if x is not None:
                h.observe(x)

    def _result(self, s) -> dict:
        """What a response needs of a finished Sequence: its text (the engine's, less a final stop
        token, which OpenAI's and vLLM's texts leave out), token counts, finish reason, log-probs
        and the §A.3.1 KV figures of its curve."""
        text = self.tok.decode(s.tokens[:-1]) if s.stop_reason == "stop token" else s.text
        st, tr = curve_stats(s.curve, self.engine.cache.bytes_per_token), s.tracker
        kv = {k: st[k] for k in ("peak_kv_tokens", "final_kv_tokens", "kv_auc", "full_cache_peak_kv_tokens",
                                 "full_cache_kv_auc")}
        kv["blocks_evicted"] = 0 if s.mode is Mode.FULL or tr is None else len(tr.completed) - len(tr.unmasked)
        kv["preemptions"] = s.preemptions
        return {"text": text, "tokens": list(s.tokens), "logprobs": list(s.logprobs), "top": list(s.top_logprobs),
                "prompt_tokens": len(s.prompt), "finish_reason": FINISH.get(s.stop_reason, "length"), "memento": kv}

    def _send(self, job: Job, events: list) -> None:
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, events)
        except RuntimeError:  # its event loop is closed: the server is shutting down
            pass

    def _flush(self) -> None:
        for job, events in self.out.items():
            self._send(job, events)
        self.out = {}
        eng, m = self.engine, self.metrics
        m.running.set(len(eng.running))
        m.waiting.set(len(eng.waiting))
        m.pages_used.set(eng.cache.held_page_count())
        m.pages_total.set(eng.cache.num_pages)
        m.preemptions.inc(eng.stats["preemptions"] - self.preemptions)
        self.preemptions = eng.stats["preemptions"]


# ----------------------------------------------------------------------------- responses


class TextStream:
    """One choice's text, streamed (paper §6.1 serving). Token bytes go through an incremental
    UTF-8 decoder, so a character split between tokens comes out whole; the last (longest stop
    string - 1) bytes are held back, because a stop string the engine has not matched yet may
    begin there and the engine's text ends before it. The pieces joined equal the final text:
    `finish(text)` is the rest of it."""

    def __init__(self, tok, stop: tuple[str, ...]):
        self.tok, self.hold = tok, max((len(s.encode()) for s in stop), default=1) - 1
        self.pending, self.sent = bytearray(), 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tokens: list[int]) -> str:
        """The text these tokens add that is safe to send now."""
        self.pending += self.tok.decode_bytes(tokens)
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return ""
        piece = self.decoder.decode(bytes(self.pending[:cut]))
        del self.pending[:cut]
        self.sent += len(piece)
        return piece

    def finish(self, text: str) -> str:
        """What remains of the final text (Sequence.text) after the pieces sent."""
        return text[self.sent:]


def logprobs_object(tok, chat: bool, tokens: list[int], lps: list, tops: list) -> dict:
    """OpenAI's logprobs object for these tokens: chat {"content": [{token, logprob, bytes,
    top_logprobs}]}, completions {tokens, token_logprobs, top_logprobs}. Log-probabilities
    are natural logs under the model's raw distribution (sampling.SamplingParams.logprobs);
    a token the engine forced has none (null). Paper §6.1 serving."""
    piece = lambda t: tok.decode_bytes([t]).decode("utf-8", errors="replace")  # noqa: E731
    lps = [None if lp is None or math.isnan(lp) else lp for lp in lps]
    # the embedding may have rows past the tokenizer's ids: never sampled, so left out
    tops = [{a: b for a, b in (top or {}).items() if a < tok.n_vocab} for top in tops] + [{}] * (len(tokens) - len(tops))
    if chat:
        entry = lambda t, lp: {"token": piece(t), "logprob": lp, "bytes": list(tok.decode_bytes([t]))}  # noqa: E731
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top.items()]}
                            for t, lp, top in zip(tokens, lps, tops)]}
    return {"tokens": [piece(t) for t in tokens], "token_logprobs": lps,
            "top_logprobs": [{piece(a): b for a, b in top.items()} for top in tops]}


def usage(job: Job, results: list[dict]) -> dict:
    """prompt_tokens (each prompt once), completion_tokens (all choices), total_tokens, and
    `memento`: the KV figures (§A.3.1) summed over choices (one choice: its own), with the mode."""
    prompt = sum(r["prompt_tokens"] for r in results[::job.n])  # choices are prompt-major
    completion = sum(len(r["tokens"]) for r in results)
    memento = {"mode": job.mode.value, **{k: sum(r["memento"][k] for r in results) for k in results[0]["memento"]}}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "memento": memento}


class Server:
    """What the HTTP handlers share (paper §6.1 serving): the engine thread, the tokenizer, the
    served name, default SamplingParams and the request limits (see main's flags)."""

    def __init__(self, model, tok, config, args):
        self.metrics = Metrics()
        self.loop = EngineLoop(model, tok, config, self.metrics)
        self.tok, self.sampling, self.max_pos = tok, config.sampling, model.config.max_position_embeddings
        path = Path(args.checkpoint)  # a directory is named by its name, a hub id by itself
        self.name = args.served_model_name or (path.resolve().name if path.exists() else args.checkpoint)
        self.max_n, self.max_logprobs, self.timeout = args.max_n, args.max_logprobs, args.request_timeout
        self.max_tokens_limit = args.max_tokens_limit or self.max_pos
        self.max_request_bytes, self.created = args.max_request_bytes, int(time.time())

    async def read_json(self, request: Request):
        """The request body as JSON. Raises APIError 413 past --max-request-bytes (counted as
        it arrives, whatever Content-Length claims), 400 when it is not JSON."""
        limit, raw = self.max_request_bytes, bytearray()
        size = request.headers.get("content-length", "")
        too_big = APIError(413, f"request body over --max-request-bytes {limit}", None, "request_too_large")
        if size.isdigit() and int(size) > limit:
            raise too_big
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise too_big
        try:
            return json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

    async def next_events(self, job: Job, deadline: float, request: Request | None = None) -> list:
        """The Job's next list of events. Raises APIError 504 at the deadline (--request-timeout)
        or for an engine error its status; with `request`, ConnectionError once the client left."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise APIError(504, f"request timed out after --request-timeout {self.timeout:g} s", None, "timeout")
            try:
                events = await asyncio.wait_for(job.queue.get(), min(left, 0.5) if request else left)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise ConnectionError("client disconnected") from None
                continue
            for e in events:
                if e[0] == "error":
                    raise APIError(e[1], e[2], e[3])
                job.finished += e[0] == "finish"
            return events

    async def complete(self, request: Request, chat: bool):
        """One (chat) completions request: parse, queue, answer as JSON or as server-sent events.
        The request is aborted in the engine if it times out or the client disconnects."""
        job = parse_request(await self.read_json(request), chat, self)
        job.loop, job.queue = asyncio.get_running_loop(), asyncio.Queue()
        deadline = time.monotonic() + self.timeout
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.name, "object": "chat.completion.chunk" if chat and job.stream else
                "chat.completion" if chat else "text_completion"}
        self.loop.put("add", job)
        streaming = False  # from then on the stream aborts the request when it ends early
        try:
            await self.next_events(job, deadline, request)  # ("accepted",), or an error raised
            if job.stream:
                streaming = True
                return StreamingResponse(self.stream(job, deadline, head), media_type="text/event-stream")
            results = {}
            while job.finished < len(job.choices):
                results.update((e[1], e[2]) for e in await self.next_events(job, deadline, request) if e[0] == "finish")
        except ConnectionError:
            return Response(status_code=499)
        finally:
            if job.finished < len(job.choices) and not streaming:
                self.loop.put("abort", job)
        results = [results[i] for i in range(len(job.choices))]
        lps = [None if job.logprobs is None else logprobs_object(self.tok, chat, r["tokens"], r["logprobs"], r["top"])
               for r in results]
        choices = [{"index": i, "finish_reason": r["finish_reason"], "logprobs": lps[i],
                    **({"message": {"role": "assistant", "content": r["text"]}} if chat else {"text": r["text"]})}
                   for i, r in enumerate(results)]
        return JSONResponse({**head, "choices": choices, "usage": usage(job, results)})

    async def stream(self, job: Job, deadline: float, head: dict):
        """Server-sent events: a chunk per choice per engine step that produced text (or
        log-probs, or its end), an error object if one comes, then `data: [DONE]`. Cancelled
        when the client disconnects: the request is aborted then."""
        texts = [TextStream(self.tok, p.stop) for _, p in job.choices]
        results = {}

        def chunk(i, piece="", lp=None, finish=None, role=False):
            c = {"index": i, "logprobs": lp, "finish_reason": finish}
            if job.chat:
                c["delta"] = {"role": "assistant", "content": ""} if role else {"content": piece} if piece else {}
            else:
                c["text"] = piece
            return f"data: {json.dumps({**head, 'choices': [c]})}\n\n"

        try:
            if job.chat:  # the assistant's role first, as OpenAI sends it
                for i in range(len(job.choices)):
                    yield chunk(i, role=True)
            while job.finished < len(job.choices):
                events, per_choice = await self.next_events(job, deadline), {}
                for e in events:
                    per_choice.setdefault(e[1], []).append(e)
                for i, evs in sorted(per_choice.items()):
                    toks = [e for e in evs if e[0] == "token"]
                    end = next((e[2] for e in evs if e[0] == "finish"), None)
                    piece = texts[i].finish(end["text"]) if end else texts[i].push([e[2] for e in toks])
                    lp = None if job.logprobs is None or not toks else logprobs_object(
                        self.tok, job.chat, [e[2] for e in toks], [e[3] for e in toks], [e[4] for e in toks])
                    if end:
                        results[i] = end
                    if piece or lp or end:
                        yield chunk(i, piece, lp, end and end["finish_reason"])
            if job.stream_usage:
                done = [results[i] for i in range(len(job.choices))]
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(job, done)})}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            if job.finished < len(job.choices):
                self.loop.put("abort", job)
        yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- the app


class APIKeyGuard:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <key>`, compared in
    constant time (hmac.compare_digest); 401 with an error object otherwise (paper §6.1 serving)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, b"Bearer " + key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", None, "invalid_api_key")
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(srv: Server, api_key: str | None) -> FastAPI:
    """The FastAPI app over a Server (paper §6.1 serving); no interactive docs (they would be
    endpoints outside the API key's guard)."""
    app = FastAPI(title="memento", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        app.add_middleware(APIKeyGuard, key=api_key)
    app.add_exception_handler(APIError, lambda request, e: e.response())
    app.add_exception_handler(HTTPException, lambda request, e: APIError(e.status_code, str(e.detail)).response())
    app.add_exception_handler(Exception, lambda request, e: APIError(500, f"{type(e).__name__}: {e}").response())

    @app.get("/health")
    async def health():
        """200 while the engine thread lives, else 503 (no key needed)."""
        return Response(status_code=200 if srv.loop.thread.is_alive() else 503)

    @app.get("/metrics")
    async def metrics():
        """The server's Prometheus registry in text format."""
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        """The one model served, by its --served-model-name."""
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "memento", "max_model_len": srv.max_pos}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        """OpenAI's completions: prompts as text or token ids."""
        return await srv.complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """OpenAI's chat completions: messages rendered as the checkpoint's ChatML."""
        return await srv.complete(request, chat=True)

    return app


def main(argv=None):
    """The command line (paper §6.1 serving): load the checkpoint, start the engine thread, serve
    until interrupted. A bad flag or checkpoint ends it with one line on stderr (cli.py)."""
    ap = ArgumentParser(prog="serve.py", description=__doc__)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint dir, training run dir or hub id")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind; the default lets only this machine connect")
    ap.add_argument("--port", type=positive_int, default=8000, help="TCP port")
    ap.add_argument("--served-model-name", default=None, help="the `model` requests name (default: the checkpoint's name)")
    ap.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $MEMENTO_API_KEY if set)")
    ap.add_argument("--max-request-bytes", type=positive_int, default=1 << 20, help="request body limit (413 above)")
    ap.add_argument("--max-n", type=positive_int, default=16, help="choices per request (n x prompts) at most")
    ap.add_argument("--max-tokens-limit", type=positive_int, default=None,
                    help="max_tokens a request may ask at most (default: max_position_embeddings)")
    ap.add_argument("--max-logprobs", type=nonnegative_int, default=20, help="top log-probabilities per token at most")
    ap.add_argument("--request-timeout", type=positive_float, default=600.0, help="seconds before a request is aborted")
    ap.add_argument("--uvicorn-log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_generation_args(ap, max_new_tokens=2048)
    args = ap.parse_args(argv)
    if args.port > 65535:
        ap.error(f"--port {args.port}: use a port in 1..65535")
    api_key = args.api_key or os.environ.get("MEMENTO_API_KEY") or None
    config = engine_config(ap, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tok = load_or_exit("serve.py", args.checkpoint, args.device, getattr(torch, args.dtype))
    config = kv_cache_budget(ap, args, config, model.config)
    torch.manual_seed(args.seed)  # requests without a seed draw theirs from torch's generator
    srv = Server(model, tok, config, args)
    srv.loop.thread.start()
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(f"serve.py: listening on {args.host} without --api-key: anyone who can reach it may use it")
    try:
        uvicorn.run(build_app(srv, api_key), host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                    timeout_graceful_shutdown=5)
    finally:
        srv.loop.put("stop")


if __name__ == "__main__":
    main()
