"""The rephraser interface, the faithfulness check and the fallback logic.

Every back end (template, local LLM, OpenAI-compatible endpoint, vLLM) turns a batch of
search queries into rephrased queries with explicit aesthetic expectations. An LLM's answer
is only used when it stays faithful to the query (:func:`check_rephrase`); otherwise the row
falls back to the deterministic template rephrase, and the reason is kept per row::

    r = make_rephraser("local", prompt="detail")
    r.version                        # 'local:smollm2-135m/detail.v2'
    r.rephrase_batch(["two red circles on grass"])
    rows = r.rephrase_rows(queries)  # [Rephrase(text, rephraser, fallback, reason), ...]
"""

from __future__ import annotations

import importlib
import logging
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from aligner.rephrase.prompt import PromptTemplate, load_prompt

log = logging.getLogger(__name__)

# Words that carry no content of their own: articles, prepositions, pronouns, conjunctions and
# the medium ("a photo of"). Count words ("two", "pair", "single") are content and not here.
STOPWORDS = frozenset("""
a an the this that these those some any each every of in on at to from by for with without
into onto over under above below behind beside besides between among near next against
across along around through inside outside upon atop front top bottom off out up down
and or but nor so as than then there here it its it's they them their he she his her we our
you your i me my is are was were be been being has have had do does did very just also
photo photos photograph photographs picture pictures image images shot shots pic pics
""".split())
COUNT_WORDS = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve dozen single pair couple
trio triplet twin both several few many lone solitary multiple half
""".split())
# Words an aesthetic tail must not bring in (strict check): a number or a basic colour the
# query does not have changes what is searched for ("..., two stars on the left", "light blue").
COLOUR_WORDS = frozenset("""
red orange yellow green blue purple pink black white grey gray brown violet cyan magenta teal
turquoise indigo crimson scarlet navy lilac mauve beige maroon
""".split())
_TOKEN = re.compile(r"[a-z0-9]+")
_LABEL = re.compile(r"^\s*(?:rephrased(?:\s+query)?|rephrasing|rephrase|rewritten(?:\s+query)?|"
                    r"rewrite|output|answer|result|new\s+query|query|assistant)\s*[:=\-]\s*",
                    re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
_QUOTES = " \t\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"


def normalise(token: str) -> str:
    """Lower-case a token and undo a simple English plural (``boxes`` -> ``box``)."""
    t = token.lower()
    if len(t) <= 3 or t.isdigit() or t in COUNT_WORDS:
        return t
    if t.endswith("ies") and len(t) > 4:
        return t[:-3] + "y"
    if t.endswith(("sses", "xes", "ches", "shes", "zes")):
        return t[:-2]
    if t.endswith("s") and not t.endswith(("ss", "us", "is")):
        return t[:-1]
    return t


def tokens(text: str) -> list[str]:
    """Normalised word tokens: lower-cased, apostrophes dropped, split on anything else."""
    return [normalise(t) for t in _TOKEN.findall(text.lower().replace("'", "").replace("\u2019", ""))]


def content_words(text: str) -> list[str]:
    """The content words of ``text`` in order, once each (stopwords out, counts kept)."""
    seen: dict[str, None] = {}
    for t in tokens(text):
        if t not in STOPWORDS:
            seen.setdefault(t, None)
    return list(seen)


def missing_content(query: str, rephrased: str) -> list[str]:
    """Content words of ``query`` that ``rephrased`` does not contain."""
    have = set(tokens(rephrased))
    return [w for w in content_words(query) if w not in have]


def default_max_chars(query: str, factor: float = 4.0, floor: int = 300) -> int:
    """The default length limit of a rephrase: ``max(factor * len(query), floor)``."""
    return max(int(factor * len(query)), floor)


def added_content(query: str, rephrased: str) -> list[str]:
    """Count words, numbers and basic colour names in ``rephrased`` that ``query`` lacks."""
    have = set(tokens(query))
    return [w for w in content_words(rephrased) if w not in have
            and (w in COUNT_WORDS or w in COLOUR_WORDS or w.isdigit())]


def check_rephrase(query: str, rephrased: str | None, max_chars: int | None = None,
                   strict: bool = False) -> str | None:
    """Why ``rephrased`` is not a faithful rephrase of ``query``, or None when it is.

    Reasons (the part before ':' is the category counted in manifests):
    ``empty``; ``too_long: N > limit`` (limit ``max_chars`` or :func:`default_max_chars`);
    ``drops_content: w1, w2`` (a content word of the query, counts included, is missing after
    lower-casing, stripping punctuation and plural normalisation); ``echo`` (adds no word);
    with ``strict``, ``adds_content: w`` (:func:`added_content`: a new count or colour).
    """
    text = (rephrased or "").strip()
    if not text:
        return "empty"
    limit = max_chars if max_chars is not None else default_max_chars(query)
    if len(text) > limit:
        return f"too_long: {len(text)} > {limit}"
    missing = missing_content(query, text)
    if missing:
        return "drops_content: " + ", ".join(missing)
    if not set(content_words(text)) - set(content_words(query)):
        return "echo"
    added = added_content(query, text) if strict else []
    if added:
        return "adds_content: " + ", ".join(added)
    return None


def reason_kind(reason: str) -> str:
    """The category of a fallback reason (``'drops_content: red'`` -> ``'drops_content'``)."""
    return reason.split(":", 1)[0].strip()


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    """Fallbacks by category, most frequent first (empty reasons are not fallbacks)."""
    return dict(Counter(reason_kind(r) for r in reasons if r).most_common())


def clean_output(text: str | None) -> str:
    """Clean an LLM answer: first non-empty line, no label, list marker or wrapping quotes.

    ``'Rephrased: "a cat on a sofa, soft light"\\nI hope this helps'`` ->
    ``'a cat on a sofa, soft light'``. An opened ``{`` is closed and anything after the first
    ``}`` dropped; trailing separators are removed; whitespace is collapsed.
    """
    if not text:
        return ""
    lines = [ln for ln in str(text).splitlines() if ln.strip(_QUOTES)]
    if not lines:
        return ""
    line = lines[0]
    for _ in range(2):  # 'Answer: - "..."'
        line = _BULLET.sub("", _LABEL.sub("", line.strip(_QUOTES)))
    line = " ".join(line.strip(_QUOTES).split())
    if "{" in line:
        close = line.find("}", line.find("{"))
        line = line[:close + 1] if close >= 0 else line.rstrip(" ,;:") + "}"
    return line.rstrip(" ,;:-").strip(_QUOTES)


class Failed(NamedTuple):
    """A back end's failure for one row (the row falls back to the template)."""

    reason: str


class Rephrase(NamedTuple):
    """One row's result: the text used, who produced it, and whether it is a fallback."""

    text: str
    rephraser: str
    fallback: bool
    reason: str


def finalise(queries: Sequence[str], outs: Sequence[str | Failed], version: str,
             fallback: Rephraser | None, max_chars: int | None = None,
             strict: bool = True) -> list[Rephrase]:
    """Check each raw answer; a failed or unfaithful row takes ``fallback``'s rephrase.

    Used by :meth:`Rephraser.rephrase_rows` and by the Ray Data processors' outputs. A row with
    no fallback (or an empty query) keeps the query itself, rephraser ``identity``.
    """
    rows = []
    for q, out in zip(queries, outs, strict=True):
        q = "" if q is None else str(q)
        if not q.strip():
            reason: str | None = "empty_query"
        elif isinstance(out, Failed):
            reason = out.reason
        else:
            reason = check_rephrase(q, out, max_chars, strict)
        if reason is None:
            rows.append(Rephrase(str(out), version, False, ""))
        elif reason == "empty_query" or fallback is None:
            rows.append(Rephrase(q, "identity", True, reason))
        else:
            fb = fallback.rephrase_rows([q])[0]
            rows.append(Rephrase(fb.text, fb.rephraser, True, reason))
    return rows


class Rephraser(ABC):
    """Rewrite search queries with explicit aesthetic expectations, faithful to their content.

    Subclasses set ``name`` and ``model`` and implement :meth:`generate`; the fallback logic is
    here. ``version`` is ``"<backend>:<model>/<template id>"`` and goes into the ``rephraser``
    column of every row this back end produced.
    """

    name: str = "base"

    strict: bool = True  # LLM answers must not bring in new counts or colours

    def __init__(self, prompt: str | PromptTemplate = "detail", max_chars: int | None = None,
                 fallback: Rephraser | None | str = "template", strict: bool = True) -> None:
        self.prompt = prompt if isinstance(prompt, PromptTemplate) else load_prompt(prompt)
        self.max_chars = max_chars
        self.strict = strict
        if fallback == "template":
            from aligner.rephrase.template import TemplateRephraser

            style = self.prompt.name if self.prompt.name in TemplateRephraser.STYLES else "detail"
            fallback = TemplateRephraser(style=style, max_chars=max_chars)
        self.fallback = fallback if isinstance(fallback, Rephraser) else None

    @property
    def model(self) -> str:
        """The model's short name (part of :attr:`version`)."""
        return "default"

    @property
    def version(self) -> str:
        """Back end + model + prompt template version, e.g. ``local:smollm2-135m/detail.v2``."""
        return f"{self.name}:{self.model}/{self.prompt.id}"

    @abstractmethod
    def generate(self, queries: Sequence[str]) -> list[str | Failed]:
        """Raw (cleaned) rephrases, one per query; a :class:`Failed` for a row that failed."""

    def rephrase_rows(self, queries: Sequence[str]) -> list[Rephrase]:
        """Rephrase a batch; unfaithful or failed rows fall back (reason kept), never raise."""
        queries = ["" if q is None else str(q) for q in queries]
        todo = [i for i, q in enumerate(queries) if q.strip()]
        outs: list[str | Failed] = [Failed("empty_query")] * len(queries)
        if todo:
            try:
                got = self.generate([queries[i] for i in todo])
                if len(got) != len(todo):
                    raise RuntimeError(f"{len(got)} outputs for {len(todo)} queries")
            except Exception as e:  # noqa: BLE001 - a failed batch falls back, never crashes
                log.warning("%s failed on a batch of %d: %s: %s", self.version, len(todo),
                            type(e).__name__, e)
                got = [Failed(f"error: {type(e).__name__}: {e}"[:300])] * len(todo)
            for i, out in zip(todo, got, strict=True):
                outs[i] = out
        return finalise(queries, outs, self.version, self.fallback, self.max_chars, self.strict)

    def rephrase_batch(self, queries: Sequence[str]) -> list[str]:
        """Rephrased queries, one per query (fallbacks included)."""
        return [r.text for r in self.rephrase_rows(queries)]

    def describe(self) -> dict[str, Any]:
        """What produced the rephrases (for manifests)."""
        return {"backend": self.name, "model": self.model,
                "prompt": self.prompt.id if self.prompt is not None else None,
                "version": self.version,
                "fallback": self.fallback.version if self.fallback else None}


BACKENDS = {
    "template": "aligner.rephrase.template:TemplateRephraser",
    "local": "aligner.rephrase.local:LocalLLMRephraser",
    "openai": "aligner.rephrase.openai_compat:OpenAICompatRephraser",
    "vllm": "aligner.rephrase.vllm_batch:VLLMRephraser",
}


def make_rephraser(backend: str, **kw: Any) -> Rephraser:
    """Build a rephraser by back-end name (``template``, ``local``, ``openai``, ``vllm``) or
    ``package.module:Class``; keyword arguments go to its constructor (imported lazily)."""
    target = BACKENDS.get(backend, backend)
    if ":" not in target:
        raise ValueError(f"unknown rephraser back end {backend!r}: one of {sorted(BACKENDS)} "
                         "or package.module:Class")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(**kw)
