"""An OpenAI-compatible chat-completions endpoint as a VLM back end (vLLM, Ray Serve LLM,
hosted VLMs).

Each request is ``POST <base_url>/chat/completions`` with the images as
``data:image/png;base64,...`` URLs in ``image_url`` parts, ``temperature`` 0, and
``logprobs: true`` + ``top_logprobs: N``; the choice is read from the first answer token's
top log-probabilities. Transport follows the rephraser's client
(:mod:`aligner.rephrase.openai_compat`: the same URL rule and retryable statuses): a
per-request timeout, retries with exponential back-off and jitter on connection errors,
time-outs and 408/409/425/429/5xx (``Retry-After`` wins), a cap on requests in flight. A reply
that is not JSON, has no ``choices``, an ``error`` object or malformed log-probabilities is
a :class:`~aligner.judge.backend.BackendError` with the reason; :meth:`OpenAIVLM.complete`
puts it into that request's reply (``error``) instead of raising.

The API key is read from the environment variable ``api_key_env`` at each request; it is
never logged, stored or put into an error message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aligner.judge.backend import (
    BackendError,
    ChatReply,
    ChatRequest,
    VLMBackend,
    choice_logprobs_from_top,
)
from aligner.judge.images import data_url
from aligner.judge.prompts import IMAGE_PART
from aligner.rephrase.openai_compat import chat_url
from aligner.runtime.http import HttpFailure, json_headers, post_json

log = logging.getLogger(__name__)


def openai_messages(messages: Sequence[dict[str, Any]], detail: str = "") -> list[dict[str, Any]]:
    """Messages with image parts as OpenAI ``image_url`` parts holding data URLs."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == IMAGE_PART:
                    url: dict[str, Any] = {"url": data_url(p["image"])}
                    if detail:
                        url["detail"] = detail
                    parts.append({"type": "image_url", "image_url": url})
                else:
                    parts.append(p)
            content = parts
        out.append({**m, "content": content})
    return out


def parse_reply(got: Any, choices: Sequence[str]) -> ChatReply:
    """A chat-completions JSON body -> :class:`ChatReply`.

    Raises:
        BackendError: an ``error`` object, no ``choices``, content that is not text, or
            log-probabilities that are not the OpenAI shape.
    """
    if not isinstance(got, dict):
        raise BackendError(f"bad_response: expected a JSON object, got {type(got).__name__}")
    if got.get("error"):
        raise BackendError(f"server_error: {str(got['error'])[:200]}")
    options = got.get("choices")
    if not isinstance(options, list) or not options:
        raise BackendError(f"bad_response: no 'choices' in the reply (keys {sorted(got)[:8]})")
    first = options[0]
    try:
        text = first["message"]["content"]
    except (KeyError, TypeError) as e:
        raise BackendError(f"bad_response: choices[0] has no message content ({e!r})") from e
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise BackendError(f"bad_response: content is {type(text).__name__}, not text")
    lp = first.get("logprobs")
    if not lp:
        return ChatReply(text, None)
    try:
        content = lp["content"]
        if not content:
            return ChatReply(text, None)
        pos = content[0]
        top = pos.get("top_logprobs") or [{"token": pos["token"], "logprob": pos["logprob"]}]
        pairs = [(str(t["token"]), float(t["logprob"])) for t in top]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BackendError(f"bad_response: malformed logprobs ({type(e).__name__}: "
                           f"{str(e)[:80]})") from e
    return ChatReply(text, choice_logprobs_from_top(pairs, choices))


class OpenAIVLM(VLMBackend):
    """Ask an OpenAI-compatible chat endpoint.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (or the full ``.../chat/completions``).
        model: the model name the server expects.
        api_key_env: environment variable holding the key ('' or unset: no auth header).
        timeout_s: per-request timeout.
        max_retries: retries of a request on a connection error, time-out or 408/429/5xx.
        backoff_s: first retry wait, doubled each retry (with jitter; ``Retry-After`` wins).
        max_concurrency: requests in flight at once.
        logprobs: ask for log-probabilities (a server that refuses them: false; the choice is
            then parsed from the text).
        top_logprobs: alternatives per position (OpenAI allows up to 20).
        image_detail: the ``detail`` of image parts ('' leaves it out; ``low`` / ``high``).
        extra_body: more fields merged into each request body (e.g. vLLM's
            ``guided_choice``).
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 0.5,
                 max_concurrency: int = 8, logprobs: bool = True, top_logprobs: int = 20,
                 image_detail: str = "", extra_body: dict[str, Any] | None = None) -> None:
        if not base_url or not model:
            raise ValueError("the openai judge back end needs base_url and model")
        self.url, self._model = chat_url(base_url), model
        self.api_key_env, self.timeout_s = api_key_env, timeout_s
        self.max_retries, self.backoff_s = max(0, max_retries), backoff_s
        self.max_concurrency = max(1, max_concurrency)
        self.logprobs, self.top_logprobs = logprobs, max(1, top_logprobs)
        self.image_detail = image_detail
        self.extra_body = dict(extra_body or {})
        self.stats = {"requests": 0, "retries": 0, "failed": 0}
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return self._model

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _headers(self) -> dict[str, str]:
        return json_headers(self.api_key_env)

    def payload(self, req: ChatRequest) -> dict[str, Any]:
        """The request body of one request."""
        body: dict[str, Any] = {"model": self._model,
                                "messages": openai_messages(req.messages, self.image_detail),
                                "max_tokens": req.max_tokens, "temperature": 0.0}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        body.update(self.extra_body)
        return body

    def post(self, body: dict[str, Any]) -> Any:
        """POST one body, retrying what can be retried; the parsed JSON reply.

        Raises:
            BackendError: a non-retryable status, retries used up, or a body that is not JSON.
        """
        try:
            return post_json(self.url, body, self._headers(), self.timeout_s, self.max_retries,
                             self.backoff_s, self._count)
        except HttpFailure as e:
            raise BackendError(str(e)) from None

    def complete_one(self, req: ChatRequest) -> ChatReply:
        """One request; raises :class:`BackendError` on failure."""
        return parse_reply(self.post(self.payload(req)), req.choices)

    def _safe(self, req: ChatRequest) -> ChatReply:
        try:
            return self.complete_one(req)
        except BackendError as e:
            self._count("failed")
            return ChatReply(error=str(e))

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        if len(requests) <= 1 or self.max_concurrency == 1:
            return [self._safe(r) for r in requests]
        with ThreadPoolExecutor(min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(self._safe, requests))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url, "api_key_env": self.api_key_env,
                "timeout_s": self.timeout_s, "max_retries": self.max_retries,
                "max_concurrency": self.max_concurrency, "logprobs": self.logprobs,
                "top_logprobs": self.top_logprobs}
