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

One request never hurts another: every field is checked before anything reaches the engine
(parse_request: 400 naming the field), an exception while the engine handles one sequence ends
that request alone (500 with its id, the traceback in the log), and if the engine thread dies
/health and every request say 503 at once. It binds to loopback unless --host says otherwise;
--api-key (or MEMENTO_API_KEY) guards every endpoint but /health; bodies must be JSON, a Host
must name the server and a browser's cross-site request is refused unless --allowed-hosts /
--allowed-origins say otherwise (BrowserGuard). Examples: docs/serving.md, "Serving over HTTP".
"""
from __future__ import annotations

import asyncio
import codecs
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import os
import queue
import re
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from cli import (DEFAULT_CHECKPOINT, ArgumentParser, add_generation_args, engine_config, kv_cache_budget, load_or_exit,
                 nonnegative_int, positive_float, positive_int)
from engine import Engine, Mode, check_mode
from model_runner import local_config
from sharding import setup_data_parallel, tensor_parallel
from kv_cache import curve_stats
from sampling import SamplingParams, request_seed, show

log = logging.getLogger("memento.serve")
FINISH = {"stop token": "stop", "stop string": "stop", "end of trace": "stop", "abort": "abort"}  # else "length"
INT64 = (-(2**63), 2**63 - 1)  # the range of `seed`, as vLLM's request schema bounds it
# Fields of OpenAI's and vLLM's request schemas that would change the output and are not
# implemented: refused with 400 unless absent, null or one of these no-op values, never ignored.
UNSUPPORTED = {"echo": (False,), "suffix": ("",), "logit_bias": ({},), "best_of": (1,), "use_beam_search": (False,),
               "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,), "length_penalty": (1,),
               "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
               "response_format": ({"type": "text"},), "min_tokens": (0,), "reasoning_effort": (), "audio": (),
               "modalities": (["text"],), "web_search_options": (), "prompt_logprobs": (), "bad_words": ([],),
               "allowed_token_ids": (), "logits_processors": (), "truncate_prompt_tokens": (), "guided_json": (),
               "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
               "include_stop_str_in_output": (False,), "skip_special_tokens": (False,), "add_generation_prompt": (True,),
               "continue_final_message": (False,), "chat_template": (), "chat_template_kwargs": (), "documents": ()}
# Fields that change nothing this server computes (an end user's id, storage and billing hints
# of OpenAI's, tool-call parallelism without tools): accepted and ignored.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
COMMON = {"model", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
          "seed", "stream", "stream_options", "memento_mode", "memento_replay"}
FIELDS = {False: COMMON | {"prompt", "logprobs"} | IGNORED | UNSUPPORTED.keys(),
          True: COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"} | IGNORED | UNSUPPORTED.keys()}
ROLES = ("system", "user", "assistant")  # the ChatML roles of the paper's format (§3)


class APIError(Exception):
    """A request that gets an OpenAI error object {"error": {message, type, param, code}} with
    an HTTP status (paper §6.1 serving): 4xx for the client's mistakes (`param` names the
    request field at fault, where there is one), 5xx for the server's (a generic message and
    the request id: the details go to the server log, never to the client). A message is
    made valid UTF-8 (a lone surrogate a client sent becomes a visible escape). `headers`:
    extra response headers (405's Allow)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        """The error object, as a dict."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error object as a JSON response with its status (and headers)."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def internal_error(rid: str) -> APIError:
    """The 500 a request gets when the server fails on it (paper §6.1 serving): no internal
    detail, its id to find the one traceback in the server log. rid: the response id."""
    return APIError(500, f"the server failed on this request (id {rid}); the details are in the server log", None,
                    "internal_error")


def engine_dead() -> APIError:
    """The 503 every request gets once the engine thread has died (paper §6.1 serving)."""
    return APIError(503, "the engine thread has stopped: this server cannot run requests any more (see its log); "
                         "restart it", None, "engine_dead")


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass(eq=False)
class Job:
    """One HTTP request's work for the engine (paper §6.1 serving): a (prompt ids, SamplingParams)
    pair per choice, its Mode, a response to teacher-force (or None), how to answer. `queue`
    receives lists of events from the engine thread: ("accepted",), ("error", APIError),
    ("token", choice, id, logprob, top) and ("finish", choice, result); `seqs` is the engine
    thread's, `finished` the event loop's. `rid` is the response id (also in the log);
    `prompt_param` / `max_tokens_param` name the fields an engine refusal is about."""

    choices: list[tuple[list[int], SamplingParams]]
    mode: Mode
    forced: list[int] | None
    chat: bool
    stream: bool
    stream_usage: bool
    logprobs: int | None
    n: int = 1
    rid: str = ""
    prompt_param: str = "prompt"
    max_tokens_param: str = "max_tokens"
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
        raise APIError(400, f"'{name}' must be {what}, got {show(v)}", name)
    return v


def check_text(body: dict) -> None:
    """Every string in the body (keys too, at any depth) must be valid Unicode: JSON's
    "\\ud800" escape gives Python a lone surrogate, which has no UTF-8 encoding and used to
    fail deep inside a tokenizer, a stop check or an error message (paper §6.1 serving).
    Walks iteratively (a deep body cannot exhaust the stack). Raises APIError 400 naming the
    top-level field that holds one."""
    stack = [(v, k) for k, v in body.items()] + [(k, k) for k in body]
    while stack:
        v, top = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"'{top}' holds a lone surrogate (an escape such as \\ud800 alone): not valid "
                                    "Unicode text", top) from None
        elif isinstance(v, dict):
            stack.extend((x, top) for x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, top) for x in v)


def _ids_ok(x, n_vocab: int) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in x)


def _bad_id(ids: list, n_vocab: int) -> str:
    bad = next(t for t in ids if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab))
    return f"token id {show(bad)} is outside the tokenizer's vocabulary (0..{n_vocab - 1})"


def chat_turns(messages) -> list[tuple[str, str]]:
    """OpenAI chat messages as (role, content) turns for Tokenizer.chat_ids (paper §3: ChatML,
    no system prompt added). A role is one of ROLES; content is a string or a list of
    {"type": "text", "text": str} parts, joined; other keys of a message must be absent or
    null (a `name` or tool call would be ignored otherwise). Raises APIError 400 naming
    `messages` for anything else."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        extra = [k for k, v in m.items() if k not in ("role", "content") and v not in (None, [], "")]
        if extra:
            raise APIError(400, f"messages[{i}].{extra[0]} is not supported by this server (only role and text "
                                "content)", "messages")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                             isinstance(p.get("text"), str) and p.keys() <= {"type", "text"}
                                             for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}] needs a text 'content': a string or a list of "
                                '{"type": "text", "text": ...} parts', "messages")
        if m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {show(m.get('role'))}",
                           "messages")
        out.append((m["role"], content))
    return out


def completion_prompts(prompt, tok) -> list[list[int]]:
    """The token ids of each prompt of a completions request: a string, a list of strings, a
    list of token ids or a list of such lists (special tokens written in text become their
    ids, as in generate.py: a completions prompt is the whole ChatML; paper §6.1 serving).
    Raises APIError 400 naming `prompt` for anything else, an empty prompt, or an id outside
    the tokenizer's vocabulary (the embedding may have more rows, which no text decodes)."""
    is_ids = lambda x: isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)  # noqa: E731
    out = None
    if isinstance(prompt, str):
        out = [tok.encode(prompt)]
    elif isinstance(prompt, list) and prompt:
        if is_ids(prompt):
            out = [prompt]
        elif all(isinstance(p, str) for p in prompt):
            out = [tok.encode(p) for p in prompt]
        elif all(is_ids(p) for p in prompt):
            out = prompt
    if out is None:
        raise APIError(400, "'prompt' is required: a string, a list of strings, token ids, or lists of token ids",
                       "prompt")
    for p in out:
        if not p:
            raise APIError(400, "an empty prompt has no last token to continue from", "prompt")
        if not _ids_ok(p, tok.n_vocab):
            raise APIError(400, f"'prompt': {_bad_id(p, tok.n_vocab)}", "prompt")
    return out


def parse_request(body, chat: bool, srv: Server, rid: str = "") -> Job:
    """A Job from a (chat) completions request body, every field checked before anything
    reaches the engine (paper §6.1 serving): the fields the schema knows (others: 400), the
    unsupported ones at their no-op values, types, ranges (SamplingParams'), token ids below
    the tokenizer's vocabulary, lengths against max_position_embeddings, the server's limits.
    Choice k of prompt p samples with seed request_seed(seed, p * n + k), as generate.py's
    request of that index. Raises APIError: 404 for another model, 400 naming the field for
    the rest."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_text(body)
    model = _field(body, "model", (str,), "a string", srv.name)
    if model != srv.name:
        raise APIError(404, f"the model {show(model)} does not exist; this server serves `{srv.name}`", "model",
                       "model_not_found")
    unknown = sorted(k for k in body if k not in FIELDS[chat])
    if unknown:
        raise APIError(400, f"unknown field {show(unknown[0])}: this server does not implement it", unknown[0])
    bad = [k for k, ok in UNSUPPORTED.items() if body.get(k) is not None and body[k] not in ok]
    if bad:
        allowed = " or ".join(json.dumps(v) for v in UNSUPPORTED[bad[0]])
        raise APIError(400, f"'{bad[0]}' is not supported by this server" + (f" (leave it out or send {allowed})"
                                                                              if allowed else ""), bad[0])
    tok, pname = srv.tok, "messages" if chat else "prompt"
    prompts = [tok.chat_ids(chat_turns(body.get("messages")))] if chat else completion_prompts(body.get("prompt"), tok)
    for p in prompts:
        if len(p) >= srv.max_pos:
            raise APIError(400, f"prompt of {len(p)} tokens does not fit max_position_embeddings={srv.max_pos} "
                                "(a response needs at least one position); shorten it", pname)
    n = _field(body, "n", (int,), "an integer", 1)
    if not 1 <= n * len(prompts) <= srv.max_n:
        raise APIError(400, f"n={show(n)} for {len(prompts)} prompt(s): use n >= 1 and at most --max-n {srv.max_n} "
                            "choices per request", "n")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if name != "max_tokens" and body.get("max_tokens") not in (None, body[name]):
        raise APIError(400, "'max_tokens' and 'max_completion_tokens' differ: send one of them", "max_tokens")
    max_tokens = _field(body, name, (int,), "an integer")
    if max_tokens is not None:
        if max_tokens > srv.max_tokens_limit:
            raise APIError(400, f"{name}={show(max_tokens)} is above this server's --max-tokens-limit "
                                f"{srv.max_tokens_limit}", name)
        longest = max(map(len, prompts))
        if max_tokens >= 1 and longest + max_tokens > srv.max_pos:
            raise APIError(400, f"prompt of {longest} tokens + {name} {max_tokens} exceeds max_position_embeddings="
                                f"{srv.max_pos}; lower {name} to {srv.max_pos - longest} or less", name)
    lp_name = "top_logprobs" if chat else "logprobs"
    if chat:
        want = _field(body, "logprobs", (bool,), "a boolean", False)
        k = _field(body, "top_logprobs", (int,), "an integer")
        if k is not None and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        k = (k or 0) if want else None
    else:
        k = _field(body, "logprobs", (int,), "an integer")
    if k is not None and not 0 <= k <= srv.max_logprobs:
        raise APIError(400, f"{lp_name}={show(k)}: use 0 to at most --max-logprobs {srv.max_logprobs} top "
                            "log-probabilities", lp_name)
    replay = _field(body, "memento_replay", (str, list), "a string or a list of token ids")
    if replay is not None:
        replay = tok.encode(replay) if isinstance(replay, str) else replay  # a trace: its memento tokens are tokens
        if not replay or not all(isinstance(t, int) and not isinstance(t, bool) for t in replay):
            raise APIError(400, "'memento_replay' must be a non-empty string or list of token ids", "memento_replay")
        if not _ids_ok(replay, tok.n_vocab):
            raise APIError(400, f"'memento_replay': {_bad_id(replay, tok.n_vocab)}", "memento_replay")
        # A replay runs to the end of the response it was given: the fields that would end it
        # earlier or score it are refused rather than ignored (truncate the replay instead).
        if k is not None:
            raise APIError(400, "log-probabilities are not computed for a teacher-forced response (memento_replay)",
                           "logprobs")
        for f in ("max_tokens", "max_completion_tokens", "stop", "stop_token_ids"):
            if body.get(f) not in (None, [], ""):
                raise APIError(400, f"'{f}' does not apply to a teacher-forced response (memento_replay), which runs "
                                    "to its end: leave it out (truncate the replay to stop it earlier)", f)
        longest = max(map(len, prompts))
        if longest + len(replay) > srv.max_pos:
            raise APIError(400, f"prompt + memento_replay = {longest + len(replay)} tokens exceeds "
                                f"max_position_embeddings={srv.max_pos}; truncate the trace", "memento_replay")
    try:
        mode = check_mode(_field(body, "memento_mode", (str,), "a string", "memento"), srv.loop.engine.config.masking)
    except ValueError as e:
        raise APIError(400, str(e), "memento_mode") from None
    stop = _field(body, "stop", (str, list), "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None:
        if not all(isinstance(x, str) for x in stop):
            raise APIError(400, "'stop' must be a string or a list of strings", "stop")
        if len(stop) > srv.max_stop:
            raise APIError(400, f"{len(stop)} stop sequences: at most --max-stop-sequences {srv.max_stop}", "stop")
        if any(len(x) > srv.max_stop_length for x in stop):
            raise APIError(400, f"a stop sequence of {max(map(len, stop))} characters: at most "
                                f"--max-stop-sequence-length {srv.max_stop_length}", "stop")
    stop_ids = _field(body, "stop_token_ids", (list,), "a list of token ids")
    if stop_ids is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise APIError(400, "'stop_token_ids' must be a list of token ids", "stop_token_ids")
    if stop_ids is not None and not _ids_ok(stop_ids, tok.n_vocab):
        raise APIError(400, f"'stop_token_ids': {_bad_id(stop_ids, tok.n_vocab)}", "stop_token_ids")
    number, what = (int, float), "a number"
    given = {"temperature": _field(body, "temperature", number, what), "top_p": _field(body, "top_p", number, what),
             "top_k": _field(body, "top_k", (int,), "an integer"), "min_p": _field(body, "min_p", number, what),
             "stop": stop, "stop_token_ids": stop_ids, "ignore_eos": _field(body, "ignore_eos", (bool,), "a boolean"),
             "max_tokens": max_tokens, "logprobs": k}
    seed = _field(body, "seed", (int,), "an integer")
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise APIError(400, f"seed={show(seed)}: use an integer in [-2**63, 2**63 - 1]", "seed")
    stream = _field(body, "stream", (bool,), "a boolean", False)
    options = _field(body, "stream_options", (dict,), "an object", {})
    if options and not stream:
        raise APIError(400, "'stream_options' needs 'stream': true", "stream_options")
    if options.keys() - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "'stream_options' takes one key, include_usage (a boolean)", "stream_options")
    try:
        base = dataclasses.replace(srv.sampling, **{f: v for f, v in given.items() if v is not None})
        # without max_tokens a response may run to the last position, as in generate.py
        default = lambda p: max(1, min(base.max_tokens, srv.max_tokens_limit, srv.max_pos - len(p)))  # noqa: E731
        choices = [(p, dataclasses.replace(base, seed=request_seed(seed, i * n + j), max_tokens=max_tokens or default(p)))
                   for i, p in enumerate(prompts) for j in range(n)]
    except ValueError as e:  # SamplingParams names the field: "SamplingParams: top_p=2 (...)"
        m = re.search(r"(\w+)=", str(e))
        field = m.group(1) if m else None
        field = {"logprobs": lp_name, "max_tokens": name}.get(field, field)
        raise APIError(400, str(e), field) from None
    return Job(choices, mode, replay, chat, stream, bool(options.get("include_usage")), k, n, rid, pname, name)


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
    running for weeks would otherwise keep forever.

    Failures stay with their request: a sequence the Engine ended with an error fails its Job
    alone (500, its other choices aborted after the step); a step that raises (batch-wide: a
    forward out of memory, say) fails the Jobs in flight with 500 and the thread goes on. If
    the thread itself dies, its one traceback is logged, `dead` is set, every Job in flight or
    queued gets 503 and `put` refuses new ones at once (503), so nothing waits for a thread
    that is gone."""

    def __init__(self, model, tok, config, metrics: Metrics):
        self.engine = Engine(model, tok, config, on_token=self._on_token, on_finish=self._on_finish)
        self.tok, self.metrics, self.inbox = tok, metrics, queue.Queue()
        tp = getattr(model, "tensor_parallel", None)
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.said: list = []  # under tensor parallelism: the engine calls since the last step, for the others
        if self.tp is not None:
            self.engine.add, self.engine.abort, self.engine.release = (
                self._recorded(name) for name in ("add", "abort", "release"))
        self.jobs: dict[int, tuple[Job, int]] = {}  # sequence id -> (its Job, choice index), while it runs
        self.out: dict[Job, list] = {}              # events of this iteration
        self.failed: list[Job] = []                 # Jobs a sequence of which ended in an error this iteration
        self.preemptions = 0
        self.dead = False
        self.lock = threading.Lock()                # orders `put` against the thread's death
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def alive(self) -> bool:
        """Whether the engine thread runs and has not begun to die (paper §6.1 serving; /health)."""
        return not self.dead and self.thread.is_alive()

    def put(self, kind: str, job: Job | None = None) -> None:
        """Queue "add" or "abort" for a Job, or "stop" (the thread ends). Raises APIError 503
        for an "add" once the thread has died (an abort is then a no-op)."""
        with self.lock:
            if self.dead:
                if kind == "add":
                    raise engine_dead()
                return
            self.inbox.put((kind, job))

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 -- a bug in this loop: say so once, fail fast from now on
            log.critical("the engine thread died; every request gets 503 from now on", exc_info=e)
            with self.lock:
                self.dead = True
            err = [("error", engine_dead())]
            for job in {j for j, _ in self.jobs.values()}:
                self._send(job, err)
            while True:
                try:
                    kind, job = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    self._send(job, err)

    def _serve(self) -> None:
        eng = self.engine
        while True:
            items = []
            try:
                # idle under tensor parallelism: wake up now and then to keep the other processes' wait alive
                items.append(self.inbox.get(block=not eng.busy, timeout=60 if self.tp else None))
                while True:
                    items.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            for kind, job in items:
                if kind == "stop":
                    self._tell([("stop", (), {})])
                    return
                if kind == "add":
                    self._add(job)
                else:
                    self._abort(job)
            self._tell([("step", (), {})] if eng.busy else [])
            if eng.busy:
                try:
                    eng.step()
                except Exception as e:  # noqa: BLE001 -- batch-wide (out of memory, a bug): what is in flight fails
                    jobs = {j for j, _ in self.jobs.values()}
                    log.error(f"engine step failed; {len(jobs)} request(s) in flight get 500: "
                              f"{', '.join(sorted(j.rid for j in jobs))}", exc_info=e)
                    for job in jobs:
                        self._fail(job, internal_error(job.rid))
                    for s in [*eng.running, *eng.waiting]:  # of no request: none, unless a bug lost one
                        eng.release(eng.abort(s))
            for job in dict.fromkeys(self.failed):
                self._fail(job, internal_error(job.rid))
            self.failed = []
            self._flush()

    def _recorded(self, name: str):
        """The engine's `name` method, each call also recorded (by sequence id) for the other
        processes of the tensor-parallel group, which replay it before the next step."""
        real = getattr(self.engine, name)

        def call(*args, **kw):
            self.said.append((name, tuple(a.id if hasattr(a, "id") and not isinstance(a, list) else a for a in args),
                              kw))
            return real(*args, **kw)
        return call

    def _tell(self, then: list) -> None:
        """Under tensor parallelism, send the other processes this iteration's engine calls and
        what follows ("step", "stop", or nothing), so that their engines stay this one's twin."""
        if self.tp is None:
            return
        msg = [self.said + then]
        self.said = []
        torch.distributed.broadcast_object_list(msg, src=self.tp.src, group=self.tp.group)

    def _add(self, job: Job) -> None:
        eng = self.engine
        try:
            for prompt, params in job.choices:
                s = eng.add(prompt, params, forced=job.forced, mode=job.mode)
                job.seqs.append(s)
                if s.done and s.stop_reason.startswith("error"):
                    raise RuntimeError(f"Engine.add ended it at once: {s.stop_reason}")
                if s.done:  # refused at once: its prefill can never fit the pool
                    raise ValueError(f"prompt of {len(prompt)} tokens cannot fit the KV pool of "
                                     f"{eng.cache.num_pages * eng.cache.page_size} tokens ({s.stop_reason})")
        except ValueError as e:  # Engine.add refused it, before anything changed (parse_request checks first)
            msg = str(e)
            param = ("memento_replay" if "replay" in msg or "forced" in msg else
                     job.max_tokens_param if "max_tokens" in msg else "stop_token_ids" if "stop_token_ids" in msg else
                     "logprobs" if "logprobs" in msg else job.prompt_param)
            self._fail(job, APIError(400, msg, param))
            return
        except Exception as e:  # noqa: BLE001 -- a bug: this request fails, the server goes on
            log.error(f"{job.rid}: Engine.add failed", exc_info=e)
            self._fail(job, internal_error(job.rid))
            return
        self.jobs.update((s.id, (job, i)) for i, s in enumerate(job.seqs))
        self._send(job, [("accepted",)])

    def _fail(self, job: Job, error: APIError) -> None:
        """End all of a Job's sequences without telling it, then send it one error (between
        steps: Engine.abort must not run inside one)."""
        for s in job.seqs:
            self.jobs.pop(s.id, None)
        self._abort(job)
        self.out.pop(job, None)
        self._send(job, [("error", error)])

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
        if s.stop_reason.startswith("error"):  # the engine logged its traceback; this says whose it was
            log.error(f"{job.rid}: choice {i} (engine request {s.id}) ended with {s.stop_reason}; the request gets 500")
            self.metrics.requests.labels("error").inc()
            self.failed.append(job)
            return
        try:
            self.out.setdefault(job, []).append(("finish", i, self._result(s)))
        except Exception as e:  # noqa: BLE001 -- a bug building this answer: this request alone fails
            log.error(f"{job.rid}: choice {i}: its answer could not be built", exc_info=e)
            self.failed.append(job)
            return
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
        self.max_stop, self.max_stop_length = args.max_stop_sequences, args.max_stop_sequence_length
        self.max_tokens_limit = args.max_tokens_limit or self.max_pos
        self.max_request_bytes, self.created = args.max_request_bytes, int(time.time())

    async def read_json(self, request: Request):
        """The request body as JSON. Raises APIError 415 unless it is sent as application/json
        (a browser sends text/plain and form bodies to any site without a CORS preflight),
        413 past --max-request-bytes (counted as it arrives, whatever Content-Length claims),
        400 when it is not JSON (or nests deeper than the parser's recursion limit)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"send the body as JSON with `Content-Type: application/json` (got {show(kind or None)})",
                           None, "unsupported_media_type")
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
        except (ValueError, RecursionError) as e:  # RecursionError: [[[[...]]]] deeper than the parser goes
            raise APIError(400, f"the request body is not valid JSON ({show(str(e), 120)})") from None

    async def next_events(self, job: Job, deadline: float, request: Request | None = None) -> list:
        """The Job's next list of events. Raises APIError 504 at the deadline (--request-timeout)
        or the engine thread's error for this Job; with `request`, ConnectionError once the
        client left."""
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
                    raise e[1]
                job.finished += e[0] == "finish"
            return events

    async def complete(self, request: Request, chat: bool):
        """One (chat) completions request: parse, queue, answer as JSON or as server-sent events.
        The request is aborted in the engine if it times out or the client disconnects. A bug
        on the way gets the generic 500 with the request id; its traceback is logged once."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            return await self._complete(request, chat, rid)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 -- our bug: this request alone fails, without internal detail
            log.error(f"{rid}: failed", exc_info=e)
            return internal_error(rid).response()

    async def _complete(self, request: Request, chat: bool, rid: str):
        if not self.loop.alive():
            raise engine_dead()
        job = parse_request(await self.read_json(request), chat, self, rid)
        job.loop, job.queue = asyncio.get_running_loop(), asyncio.Queue()
        deadline = time.monotonic() + self.timeout
        head = {"id": rid, "created": int(time.time()), "model": self.name,
                "object": "chat.completion.chunk" if chat and job.stream else "chat.completion" if chat else
                "text_completion"}
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
        except Exception as e:  # noqa: BLE001 -- our bug, after the headers went: an error event, then [DONE]
            log.error(f"{job.rid}: failed while streaming", exc_info=e)
            yield f"data: {json.dumps(internal_error(job.rid).body())}\n\n"
        finally:
            if job.finished < len(job.choices):
                self.loop.put("abort", job)
        yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- the app


class APIKeyGuard:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <key>` (the scheme
    in any case, RFC 7235; the key compared in constant time, hmac.compare_digest); 401 with
    an error object otherwise (paper §6.1 serving)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            right_key = hmac.compare_digest(token.strip(b" "), self.expected)
            if scheme.lower() != b"bearer" or not right_key:
                err = APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", None, "invalid_api_key")
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name of a Host header value or --host, lower case, without port, brackets or a
    final dot: "[::1]:8000" -> "::1", "LocalHost.:80" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


class BrowserGuard:
    """ASGI middleware against requests a web page makes the browser send (paper §6.1 serving).

    Host: a DNS-rebinding page reaches a loopback server under its own name (evil.example
    resolving to 127.0.0.1), so a request is served only when its Host names an IP address
    (a page cannot be served from one that is this server), `localhost`, the --host value or
    one of --allowed-hosts ("*": any); 403 otherwise. The port is not compared, so that an
    ssh tunnel to another local port still works. Origin: a browser sends it with every
    cross-site request; one not in --allowed-origins ("*": any) gets 403 before anything is
    read. Paired with the JSON content type that read_json requires, no page can post to the
    server unless --allowed-origins lets its origin in (with CORS headers, CORSMiddleware)."""

    def __init__(self, app, hosts: list[str], origins: list[str]):
        self.app = app
        self.hosts = {_host_name(h) for h in hosts}
        self.origins = {o.strip().lower().rstrip("/") for o in origins}

    def host_ok(self, host: str) -> bool:
        """Whether a Host header value (str, e.g. "localhost:8000") may be served (see the
        class; paper §6.1 serving). Raises nothing."""
        name = _host_name(host)
        if "*" in self.hosts or name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host, origin = headers.get(b"host"), headers.get(b"origin")
            err = None
            if host is not None and not self.host_ok(host.decode("latin-1")):
                err = APIError(403, f"Host {show(host.decode('latin-1'))} is not this server's name: a request must name "
                                    "it by an IP address, localhost, --host or one of --allowed-hosts (against DNS "
                                    "rebinding)", None, "host_not_allowed")
            elif origin is not None and "*" not in self.origins and \
                    origin.decode("latin-1").strip().lower().rstrip("/") not in self.origins:
                err = APIError(403, f"requests from the web page origin {show(origin.decode('latin-1'))} are refused; "
                                    "start the server with --allowed-origins to allow one", None, "origin_not_allowed")
            if err is not None:
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


def follow(model, tok, config) -> None:
    """A tensor-parallel process other than the first (paper §6.1 serving): its engine holds its
    share of the model and the KV heads and replays, in order, the engine calls the first
    process broadcasts (add, abort, release by sequence id; step; stop), so the group's engines
    make the same decisions and feed the same tokens (the first process samples; sampling
    broadcasts the ids). Returns at "stop". Raises what the collectives raise."""
    tp = model.tensor_parallel
    eng = Engine(model, tok, config)
    while True:
        msg = [None]
        torch.distributed.broadcast_object_list(msg, src=tp.src, group=tp.group)
        for name, args, kw in msg[0]:
            if name == "stop":
                return
            if name == "step":
                eng.step()
            elif name == "add":
                try:
                    eng.add(*args, **kw)
                except ValueError:  # refused here as there: the first process's next calls say what follows
                    pass
            elif eng.sequences[args[0]] is not None:  # abort / release by id
                getattr(eng, name)(eng.sequences[args[0]], **kw)


def build_app(srv: Server, api_key: str | None, allowed_hosts: list[str] = (), allowed_origins: list[str] = (),
              host: str = "127.0.0.1") -> FastAPI:
    """The FastAPI app over a Server (paper §6.1 serving); no interactive docs (they would be
    endpoints outside the API key's guard). From the outside in: BrowserGuard (Host and
    Origin; `host` is the bound address), CORS headers only for `allowed_origins`, the API
    key, the routes. Errors are OpenAI error objects; a 405 names the allowed methods."""
    app = FastAPI(title="memento", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        app.add_middleware(APIKeyGuard, key=api_key)
    if allowed_origins:  # outside the key's guard: a preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BrowserGuard, hosts=["localhost", host, *allowed_hosts], origins=list(allowed_origins))
    app.add_exception_handler(APIError, lambda request, e: e.response())
    app.add_exception_handler(HTTPException, lambda request, e: APIError(e.status_code, str(e.detail),
                                                                         headers=e.headers).response())

    def crash(request, e):  # a bug outside the handlers: no detail to the client, one traceback in the log
        rid = f"req-{uuid.uuid4().hex}"
        log.error(f"{rid}: {request.method} {request.url.path} failed", exc_info=e)
        return internal_error(rid).response()

    app.add_exception_handler(Exception, crash)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        """200 while the engine thread lives, else 503 (no key needed)."""
        return Response(status_code=200 if srv.loop.alive() else 503)

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
    ap.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                    help="Host names served besides IP addresses, localhost and --host (DNS rebinding); * = any")
    ap.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                    help="web page origins (scheme://host:port) allowed to call the API, with CORS headers; * = any "
                         "(default: none, requests carrying an Origin get 403)")
    ap.add_argument("--max-request-bytes", type=positive_int, default=1 << 20, help="request body limit (413 above)")
    ap.add_argument("--max-n", type=positive_int, default=16, help="choices per request (n x prompts) at most")
    ap.add_argument("--max-tokens-limit", type=positive_int, default=None,
                    help="max_tokens a request may ask at most (default: max_position_embeddings)")
    ap.add_argument("--max-logprobs", type=nonnegative_int, default=20, help="top log-probabilities per token at most")
    ap.add_argument("--max-stop-sequences", type=nonnegative_int, default=4,
                    help="stop strings per request at most (OpenAI's limit is 4)")
    ap.add_argument("--max-stop-sequence-length", type=positive_int, default=256,
                    help="characters per stop string at most")
    ap.add_argument("--request-timeout", type=positive_float, default=600.0, help="seconds before a request is aborted")
    ap.add_argument("--uvicorn-log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_generation_args(ap, max_new_tokens=2048)
    args = ap.parse_args(argv)
    if args.port > 65535:
        ap.error(f"--port {args.port}: use a port in 1..65535")
    api_key = args.api_key or os.environ.get("MEMENTO_API_KEY") or None
    config = engine_config(ap, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tp = None
    if args.tensor_parallel_size > 1:  # one engine over the processes of torchrun; the first serves HTTP
        try:
            dp = setup_data_parallel(args.device, args.tensor_parallel_size)
        except ValueError as e:
            sys.exit(f"serve.py: {e}")
        if dp.size != 1:
            sys.exit(f"serve.py: one server is one engine: run --nproc_per_node {args.tensor_parallel_size} (the "
                     f"--tensor-parallel-size), not {dp.processes}")
        tp, args.device = dp.tp, str(dp.device)
    model, tok = load_or_exit("serve.py", args.checkpoint, args.device, getattr(torch, args.dtype))
    if tp is not None:
        try:
            tensor_parallel(model, tp)
        except ValueError as e:
            sys.exit(f"serve.py: {e}")
    config = kv_cache_budget(ap, args, config, local_config(model))  # --kv-cache-gib is per process
    torch.manual_seed(args.seed)  # requests without a seed draw theirs from torch's generator
    if tp is not None and tp.rank > 0:
        follow(model, tok, config)
        return
    srv = Server(model, tok, config, args)
    srv.loop.thread.start()
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(f"serve.py: listening on {args.host} without --api-key: anyone who can reach it may use it")
    try:
        uvicorn.run(build_app(srv, api_key, args.allowed_hosts, args.allowed_origins, args.host), host=args.host,
                    port=args.port, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5)
    finally:
        srv.loop.put("stop")


if __name__ == "__main__":
    main()
