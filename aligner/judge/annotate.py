"""VisionPrefer-style annotation: an LMM rates each (query, image) 1-5 per aspect, and
preference pairs are derived per aspect.

:class:`LMMAnnotator` asks one question per aspect of the prompt file (``annotate.v1``:
prompt-following, aesthetics, fidelity, harmlessness), each shown the query and one image.
The ``rating`` is the most probable digit under the digits' log-probabilities renormalised
over 1-5 (the answer the model would give; parsed from the text only without
log-probabilities), and ``expected`` keeps the expectation ``sum(k p(k))``. With
``rationale`` (the default) each answer is ``<digit>: <short reason>`` and the reason is kept.

:func:`derive_pairs` turns ratings into preference rows (:mod:`aligner.data.preferences`):
within each (query, aspect), every two images whose ratings differ by at least ``min_gap``
give a pair, the higher-rated one chosen; equal ratings (ties) give none. ``source`` is
``lmm``, ``aspect`` keeps the aspect, ``teacher`` the annotator, and ``weight`` is
``gap / 4`` (1 for a 5-vs-1 pair). Pairs of different aspects may disagree about two images;
the preference builder's contradiction pass drops such pairs (or annotate fewer aspects).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from aligner.judge.backend import ChatRequest, VLMBackend, choice_distribution, rationale_of
from aligner.judge.prompts import JudgePrompt, load_judge_prompt


@dataclass
class RatingItem:
    """One (query, image) to rate; ``image`` is the PNG shown (None: it could not be read,
    with ``error`` saying why)."""

    query_id: str
    query: str
    image_id: str
    image: bytes | None
    error: str = ""


class LMMAnnotator:
    """Rate (query, image) pairs per aspect with a VLM back end (see the module docstring).

    Args:
        backend: a :class:`~aligner.judge.backend.VLMBackend`.
        prompt: a rating prompt name, id or file (``annotate``).
        aspects: the aspects to rate (default: every question of the prompt).
        rationale: ask for a short reason after the rating.
        rationale_tokens: tokens generated when a reason is asked for.
    """

    def __init__(self, backend: VLMBackend, prompt: str | JudgePrompt = "annotate",
                 aspects: Sequence[str] = (), rationale: bool = True,
                 rationale_tokens: int = 48) -> None:
        self.backend = backend
        self.prompt = prompt if isinstance(prompt, JudgePrompt) else load_judge_prompt(prompt)
        if self.prompt.style != "rating":
            raise ValueError(f"prompt {self.prompt.id} has style {self.prompt.style!r}, not "
                             "rating")
        unknown = [a for a in aspects if a not in self.prompt.questions]
        if unknown:
            raise ValueError(f"aspects {unknown} are not in prompt {self.prompt.id} "
                             f"({list(self.prompt.aspects)})")
        self.aspects = tuple(aspects) or self.prompt.aspects
        self.rationale, self.rationale_tokens = rationale, max(2, rationale_tokens)
        self.choices = tuple(self.prompt.choices)

    @property
    def name(self) -> str:
        """``lmm:<back end>:<model>/<prompt id>`` (the ratings' ``annotator``)."""
        return f"lmm:{self.backend.name}:{self.backend.model}/{self.prompt.id}"

    def _request(self, item: RatingItem, aspect: str) -> ChatRequest:
        msgs = self.prompt.messages(item.query, [[item.image or b""]], aspect,
                                    rationale=self.rationale)
        return ChatRequest(msgs, self.choices, self.rationale_tokens if self.rationale else 1)

    def rate(self, items: Sequence[RatingItem]) -> list[dict[str, Any]]:
        """Ratings-table rows (:mod:`aligner.data.ratings`): one per item and aspect."""
        todo = [(it, a) for it in items if it.image is not None for a in self.aspects]
        replies = self.backend.complete([self._request(it, a) for it, a in todo])
        got = {(id(it), a): r for (it, a), r in zip(todo, replies, strict=True)}
        out = []
        for it in items:
            for a in self.aspects:
                row: dict[str, Any] = {"query_id": it.query_id, "query": it.query,
                                       "image_id": it.image_id, "aspect": a,
                                       "annotator": self.name}
                reply = got.get((id(it), a))
                if reply is None or reply.error:
                    out.append({**row, "status": "failed",
                                "error": it.error or (reply.error if reply else "no reply")})
                    continue
                probs, read = choice_distribution(reply, self.choices)
                if not probs:
                    out.append({**row, "status": "failed", "decision": read,
                                "error": f"unparsed: no rating in {reply.text[:60]!r}"})
                    continue
                best = max(probs, key=probs.__getitem__)
                expected = (sum(float(self.prompt.choices[c]) * p for c, p in probs.items())
                            if read == "logprobs" else math.nan)
                out.append({**row, "status": "ok", "rating": int(self.prompt.choices[best]),
                            "expected": expected, "decision": read,
                            "rationale": rationale_of(reply.text) if self.rationale else ""})
        return out

    def describe(self) -> dict[str, Any]:
        return {"annotator": self.name, "prompt": self.prompt.id, "aspects": list(self.aspects),
                "rationale": self.rationale, "backend": self.backend.describe()}


def derive_pairs(ratings: pa.Table, min_gap: int = 1) -> tuple[list[dict[str, Any]], dict]:
    """Per-aspect preference rows from a ratings table (see the module docstring).

    Returns:
        (preference row dicts for :func:`aligner.data.preferences.rows_to_table`, counts:
        pairs and ties per aspect, failed ratings skipped).

    Raises:
        ValueError: ``min_gap`` < 1, or one image rated twice on an aspect for a query.
    """
    if min_gap < 1:
        raise ValueError("min_gap must be >= 1 (equal ratings are ties, never pairs)")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    skipped = 0
    for r in ratings.to_pylist():
        if r["status"] != "ok":
            skipped += 1
            continue
        groups.setdefault((r["query_id"], r["aspect"]), []).append(r)
    rows: list[dict[str, Any]] = []
    counts: dict[str, Any] = {"pairs": {}, "ties": {}, "below_gap": {},
                              "failed_ratings_skipped": skipped}
    for (qid, aspect), items in groups.items():
        ids = [r["image_id"] for r in items]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"query {qid!r}, aspect {aspect!r}: images rated twice {dup[:5]}")
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                x, y = items[i], items[j]
                gap = int(x["rating"]) - int(y["rating"])
                if gap == 0:
                    counts["ties"][aspect] = counts["ties"].get(aspect, 0) + 1
                    continue
                if abs(gap) < min_gap:
                    counts["below_gap"][aspect] = counts["below_gap"].get(aspect, 0) + 1
                    continue
                hi, lo = (x, y) if gap > 0 else (y, x)
                rows.append({"query_id": qid, "query": hi["query"], "chosen_id": hi["image_id"],
                             "rejected_id": lo["image_id"], "source": "lmm",
                             "weight": abs(gap) / 4.0, "teacher": hi["annotator"],
                             "aspect": aspect, "kind": ""})
                counts["pairs"][aspect] = counts["pairs"].get(aspect, 0) + 1
    return rows, counts
