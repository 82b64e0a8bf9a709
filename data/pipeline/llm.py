"""A minimal client for OpenAI-compatible chat-completions endpoints (paper §3).

POST {base_url}/chat/completions with {"model", "messages", "temperature", ...}; the reply's
choices[0].message.content is the text. Works with hosted APIs and local servers (vLLM,
llama.cpp server, Ollama's /v1). Standard library only.

Retried with exponential backoff (backoff * 2**attempt seconds, capped): connection errors,
timeouts, HTTP 429 and 5xx, replies that are not valid chat-completions JSON, and (in
`chat_json`) content that fails the caller's strict JSON parsing/validation. Other HTTP
errors (400, 401, 404, ...) fail at once: retrying cannot fix a wrong key, model or URL.
Every failure ends in one `LLMError` whose message is one line naming the endpoint, what
went wrong and what to do.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["LLMError", "ChatClient", "parse_json_content"]


class LLMError(RuntimeError):
    """The LLM endpoint failed in a way retries did not fix (message: one line, with the fix)."""


_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)\n?\s*```", re.S)
_THINK = re.compile(r"^\s*<think>.*?</think>", re.S)


def parse_json_content(content: str) -> Any:
    """Parse a model reply that must be exactly one JSON value.

    Tolerated around the JSON (nothing else): surrounding whitespace, a leading
    <think>...</think> section (reasoning models served without a reasoning parser) and
    one enclosing ```json fence. Raises ValueError (json.JSONDecodeError) otherwise.
    """
    text = _THINK.sub("", content, count=1).strip()
    m = _FENCE.fullmatch(text)
    if m:
        text = m.group(1).strip()
    return json.loads(text)


class _Retry(Exception):
    pass


@dataclass
class ChatClient:
    """Chat-completions client with retries (see module docstring).

    Attributes: base_url (e.g. "http://127.0.0.1:8000/v1"), model, api_key (sent as a
    Bearer token when not None), timeout (seconds per request), max_retries (extra attempts
    after the first), backoff / max_backoff (seconds), temperature, max_tokens (None: the
    server's default), extra (more request fields, e.g. {"top_p": 0.95}).
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    temperature: float = 0.0
    max_tokens: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The full chat-completions URL: {base_url}/chat/completions."""
        return self.base_url.rstrip("/") + "/chat/completions"

    def _post(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"),
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace").replace("\n", " ")
            if e.code == 429 or e.code >= 500:
                raise _Retry(f"HTTP {e.code} {detail}")
            hint = {401: "check the API key (--api-key-env)", 403: "check the API key (--api-key-env)",
                    404: "check --base-url (it should end in /v1 for most servers) and --model"
                    }.get(e.code, "check --base-url, --model and the server log")
            raise LLMError(f"LLM endpoint {self.url} answered HTTP {e.code} ({detail.strip()}); {hint}")
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Retry(f"no reply within --timeout {self.timeout:g} s")
            raise _Retry(f"cannot connect ({type(reason).__name__}: {reason})")
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry(f"reply is not chat-completions JSON: {raw[:120]!r}")

    def chat_json(self, messages: list[dict], validate: Callable[[Any], Any] | None = None) -> Any:
        """Send `messages`, parse the reply with `parse_json_content`, validate, return.

        Args: messages: OpenAI chat messages; validate: obj -> result, raising ValueError
            on a reply of the wrong shape (then retried like malformed JSON).
        Returns: validate(obj), or obj when validate is None.
        Raises: LLMError after 1 + max_retries failed attempts or on a non-retryable error.
        """
        return self._call(messages, lambda text: (validate or (lambda o: o))(parse_json_content(text)))

    def chat(self, messages: list[dict]) -> str:
        """Send `messages`, return the reply text (retries as in the module docstring).

        Raises: LLMError after 1 + max_retries failed attempts or on a non-retryable error.
        """
        return self._call(messages, lambda text: text)

    def _call(self, messages, parse):
        last = ""
        connect_only = True
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                text = self._post(messages)
            except _Retry as e:
                last = str(e)
                connect_only = connect_only and last.startswith("cannot connect")
                continue
            connect_only = False
            try:
                return parse(text)
            except (ValueError, TypeError, KeyError) as e:
                last = f"malformed reply ({type(e).__name__}: {str(e)[:120]}): {text[:120]!r}"
        last = last.replace("\n", " ")
        tries = self.max_retries + 1
        if connect_only:
            raise LLMError(f"LLM endpoint {self.url} is unreachable after {tries} attempts ({last}); "
                           f"start the server or fix --base-url")
        raise LLMError(f"LLM endpoint {self.url} failed after {tries} attempts, last error: {last}; "
                       f"check the server log and --model, or raise --retries/--timeout")
