"""Any OpenAI-compatible chat-completions endpoint: a vLLM server, Ray Serve LLM, a hosted API.

A small stdlib client (``urllib`` + a thread pool), on purpose rather than Ray's
``HttpRequestProcessorConfig``: in Ray 2.60 that stage retries only 408/429/502/503/504 (not
500), raises - failing the whole dataset - on a non-JSON body or when retries run out (the HTTP
stage has no ``should_continue_on_error``), and has no per-request timeout except through a
custom aiohttp session factory. Here every row either gets an answer or a :class:`Failed`
reason and falls back to the template; nothing a server does can crash a job.

The API key is read from the environment variable named by ``api_key_env`` when a request is
made; it is never logged, stored in a manifest or put into an error message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aligner.rephrase.base import Failed, Rephraser, clean_output
from aligner.rephrase.prompt import PromptTemplate
from aligner.runtime.http import HttpFailure, json_headers, post_json

log = logging.getLogger(__name__)


def chat_url(base_url: str) -> str:
    """``http://host:8000/v1`` (the OpenAI-client convention) -> ``.../v1/chat/completions``."""
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class OpenAICompatRephraser(Rephraser):
    """Rephrase through an OpenAI-compatible ``POST /v1/chat/completions`` endpoint.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (or the full ``.../chat/completions``).
        model: the model name the server expects.
        prompt: template style, id or file.
        api_key_env: environment variable holding the key ('' or unset: no auth header).
        timeout_s: per-request timeout.
        max_retries: retries of a request on a connection error, timeout, 408/429/5xx.
        backoff_s: first retry wait, doubled each retry (with jitter; ``Retry-After`` wins).
        max_concurrency: requests in flight at once (per rephraser, i.e. per actor).
        temperature, max_tokens: sampling parameters sent with each request.
        prefill: send the template's answer prefix as a final assistant message with
            ``continue_final_message`` (vLLM servers); the answer then continues it.
        extra_body: more fields merged into each request body.
        max_chars, fallback, strict: see :class:`aligner.rephrase.base.Rephraser`.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, prompt: str | PromptTemplate = "detail",
                 api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 30.0,
                 max_retries: int = 3, backoff_s: float = 0.5, max_concurrency: int = 8,
                 temperature: float = 0.0, max_tokens: int = 64, prefill: bool = False,
                 extra_body: dict[str, Any] | None = None, max_chars: int | None = None,
                 fallback: Rephraser | None | str = "template", strict: bool = True) -> None:
        super().__init__(prompt, max_chars=max_chars, fallback=fallback, strict=strict)
        if not base_url or not model:
            raise ValueError("the openai back end needs base_url and model")
        self.url, self._model = chat_url(base_url), model
        self.api_key_env, self.timeout_s = api_key_env, timeout_s
        self.max_retries, self.backoff_s = max(0, max_retries), backoff_s
        self.max_concurrency = max(1, max_concurrency)
        self.temperature, self.max_tokens, self.prefill = temperature, max_tokens, prefill
        self.extra_body = dict(extra_body or {})
        self.stats = {"requests": 0, "retries": 0, "failed": 0}
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    @property
    def model(self) -> str:
        return self._model

    def _headers(self) -> dict[str, str]:
        return json_headers(self.api_key_env)

    def payload(self, query: str) -> dict[str, Any]:
        """The request body for one query."""
        messages = self.prompt.messages(query)
        body: dict[str, Any] = {"model": self._model, "temperature": self.temperature,
                                "max_tokens": self.max_tokens}
        prefix = self.prompt.prefix(query) if self.prefill else ""
        if prefix:
            messages.append({"role": "assistant", "content": prefix})
            body.update(continue_final_message=True, add_generation_prompt=False)
        body["messages"] = messages
        body.update(self.extra_body)
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any] | Failed:
        try:
            return post_json(self.url, body, self._headers(), self.timeout_s, self.max_retries,
                             self.backoff_s, self._count)
        except HttpFailure as e:
            return Failed(str(e))

    def rephrase_one(self, query: str) -> str | Failed:
        """One request; the cleaned answer, or the reason it failed."""
        body = self.payload(query)
        got = self._post(body)
        if isinstance(got, Failed):
            self._count("failed")
            return got
        try:
            text = got["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (KeyError, IndexError, TypeError) as e:
            self._count("failed")
            return Failed(f"bad_response: {type(e).__name__}: {str(e)[:80]}")
        prefix = body["messages"][-1]["content"] if body.get("continue_final_message") else ""
        if prefix and not text.startswith(prefix):
            text = prefix + text
        return clean_output(text)

    def generate(self, queries: Sequence[str]) -> list[str | Failed]:
        if len(queries) <= 1 or self.max_concurrency == 1:
            return [self.rephrase_one(q) for q in queries]
        with ThreadPoolExecutor(min(self.max_concurrency, len(queries))) as pool:
            return list(pool.map(self.rephrase_one, queries))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url, "api_key_env": self.api_key_env,
                "timeout_s": self.timeout_s, "max_retries": self.max_retries,
                "max_concurrency": self.max_concurrency, "prefill": self.prefill}
