"""The vision-language back-end interface, and reading a choice from an answer.

A back end takes chat requests (OpenAI-style messages whose user turn mixes text and images)
and returns, per request, the answer's text and - where the back end gives them - the
log-probabilities of the candidate answers as the *first* answer token::

    req = ChatRequest(messages, choices=("A", "B", "C"))       # or ("1", ..., "5")
    [reply] = backend.complete([req])
    reply.choice_logprobs    # {"A": -0.2, "B": -1.9, "C": -3.1}, or None (no log-probs)
    reply.text               # "A" (or "A: sharper and better lit" with a rationale)
    reply.error              # '' or why this request failed (after retries)

Images in messages are parts ``{"type": "image", "image": <encoded bytes>}``; each back end
turns them into what its model takes (data URLs, PIL images). :func:`choice_distribution`
turns a reply into a probability per choice: renormalised over the choices from the
log-probabilities when there are any (no parsing, so no parse failures), else read from the
text (the first word, or ``answer: X``), else none (``unparsed``).

Back ends (:func:`make_backend`): ``openai`` (:mod:`aligner.judge.openai_vlm`),
``transformers`` (:mod:`aligner.judge.transformers_vlm`), ``vllm``
(:mod:`aligner.judge.vllm_vlm`), or ``package.module:Class``.
"""

from __future__ import annotations

import importlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class BackendError(RuntimeError):
    """A back end could not answer a request (after its retries), or answered nonsense."""


@dataclass(frozen=True)
class ChatRequest:
    """One question to a VLM.

    Attributes:
        messages: OpenAI-style chat messages; image parts are ``{"type": "image", "image":
            bytes}``.
        choices: the candidate answers whose first-token log-probabilities are wanted.
        max_tokens: tokens to generate (1: the choice only; more: a rationale follows).
    """

    messages: list[dict[str, Any]]
    choices: tuple[str, ...]
    max_tokens: int = 1


@dataclass
class ChatReply:
    """A back end's answer to one :class:`ChatRequest`.

    Attributes:
        text: the generated text ('' on failure).
        choice_logprobs: log P(first answer token is the choice) per choice the back end could
            see (a choice outside an API's top log-probs is missing); None when the back end
            gives no log-probabilities.
        error: why the request failed ('' when it did not).
    """

    text: str = ""
    choice_logprobs: dict[str, float] | None = None
    error: str = ""


class VLMBackend(ABC):
    """A vision-language model behind one call: :meth:`complete` a batch of requests.

    ``complete`` never raises for one bad request: that request's reply carries ``error``.
    """

    name: str = "base"

    @property
    @abstractmethod
    def model(self) -> str:
        """The model's name (part of the judge's name)."""

    @abstractmethod
    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        """One reply per request, in order."""

    def describe(self) -> dict[str, Any]:
        """What answered (for manifests); never holds a secret."""
        return {"backend": self.name, "model": self.model}


def normalise_token(token: str) -> str:
    """A token's text as a choice: stripped of spaces, quotes, markdown and punctuation
    (``" A"``, ``"**A"``, ``"A:"`` -> ``"a"``), lower-cased."""
    return token.strip().strip("*_`\"'()[]{}.,:;!").strip().lower()


def logsumexp(values: Iterable[float]) -> float:
    """log(sum(exp(v))) of finite values (-inf when there are none)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return -math.inf
    m = max(v)
    return m + math.log(sum(math.exp(x - m) for x in v))


def choice_logprobs_from_top(top: Iterable[tuple[str, float]],
                             choices: Sequence[str]) -> dict[str, float]:
    """Log-probabilities of ``choices`` from a list of (token text, logprob) alternatives at
    the first answer position: tokens that normalise to the same choice (``"A"``, ``" A"``)
    are summed; choices absent from the list are left out."""
    want = {normalise_token(c): c for c in choices}
    found: dict[str, list[float]] = {}
    for token, lp in top:
        c = want.get(normalise_token(str(token)))
        if c is not None:
            found.setdefault(c, []).append(float(lp))
    return {c: logsumexp(v) for c, v in found.items()}


_ANSWER = re.compile(r"(?:answer|choice|score|rating|row)\s*(?:is|:|=)?\s*[\"'*(]*"
                     r"([A-Za-z0-9]+)", re.IGNORECASE)
_FIRST = re.compile(r"^[\s\"'*_`(\[]*([A-Za-z0-9]+)")


def parse_choice(text: str, choices: Sequence[str]) -> str | None:
    """The choice an answer's text names: its first word (``"B: sharper"``), else the word
    after ``answer`` / ``score`` / ``row`` (``"The answer is B"``); None when neither is a
    choice."""
    want = {normalise_token(c): c for c in choices}
    m = _FIRST.match(text or "")
    if m and normalise_token(m.group(1)) in want:
        return want[normalise_token(m.group(1))]
    for m in _ANSWER.finditer(text or ""):
        if normalise_token(m.group(1)) in want:
            return want[normalise_token(m.group(1))]
    return None


def rationale_of(text: str) -> str:
    """The reason after the choice in ``"<choice>: <reason>"`` (the whole text when there is
    no separator after a short first word)."""
    text = (text or "").strip()
    m = re.match(r"^[\s\"'*_`(\[]*[A-Za-z0-9]+[\s\"'*_`)\]]*[:\-.,]\s*(.*)$", text, re.DOTALL)
    return " ".join((m.group(1) if m else text).split())


def choice_distribution(reply: ChatReply, choices: Sequence[str]) -> tuple[dict[str, float], str]:
    """A probability per choice and how it was read.

    Returns:
        ``(probs, "logprobs")``: the choices' probabilities renormalised over the choices
        (those the back end did not list count as 0) when at least one is listed;
        ``(one-hot, "text")``: the choice parsed from the text otherwise;
        ``({}, "unparsed")``: neither.
    """
    lps = reply.choice_logprobs or {}
    finite = {c: lp for c, lp in lps.items() if c in choices and math.isfinite(lp)}
    if finite:
        z = logsumexp(finite.values())
        return {c: (math.exp(finite[c] - z) if c in finite else 0.0) for c in choices}, "logprobs"
    c = parse_choice(reply.text, choices)
    if c is not None:
        return {x: float(x == c) for x in choices}, "text"
    return {}, "unparsed"


BACKENDS = {
    "openai": "aligner.judge.openai_vlm:OpenAIVLM",
    "transformers": "aligner.judge.transformers_vlm:TransformersVLM",
    "vllm": "aligner.judge.vllm_vlm:VLLMVLM",
}


def make_backend(backend: str, **kw: Any) -> VLMBackend:
    """Build a back end by name (``openai``, ``transformers``, ``vllm``) or
    ``package.module:Class``; keyword arguments go to its constructor (imported lazily).

    Raises:
        ValueError: an unknown name.
    """
    target = BACKENDS.get(backend, backend)
    if ":" not in target:
        raise ValueError(f"unknown VLM back end {backend!r}: one of {sorted(BACKENDS)} or "
                         "package.module:Class")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(**kw)
