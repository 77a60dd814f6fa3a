"""The LMM row judge: a VLM back end asked, per aspect, which of two rows is better
(``<ranker>``) or how good each row is (``<scorer>``), in both orders.

Per pair and order, one request per question of the prompt file
(:mod:`aligner.judge.prompts`), each answered by a single choice token:

* **ranker** (``ranker.v1``): accuracy, aesthetics, diversity and overall, each answered
  A / B / C (similar). The decision is the most probable choice under the choice tokens'
  log-probabilities renormalised over the three (the text is parsed only when a back end
  gives no log-probabilities). The overall winner is the ``overall`` answer.
* **scorer** (``scorer.v1``): each row scored 1-5 on accuracy, aesthetics and diversity. The
  score is the *expectation* ``sum(k * p(k))`` over the digits' renormalised probabilities:
  it breaks the many ties an argmax gives and uses the judge's uncertainty; a side wins an
  aspect when its expected score is higher by ``score_margin`` (0.25), and overall when its
  mean over the aspects is.

The two orders are combined by :func:`aligner.judge.protocol.combine_orders` (a win counts
only when both orders agree). With ``rationale`` the ranker's overall question (every
question, for the scorer) asks for ``<choice>: <one sentence>`` and the sentence is kept; the
choice is still read from the first answer token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aligner.judge.backend import (
    BackendError,
    ChatReply,
    ChatRequest,
    VLMBackend,
    choice_distribution,
    rationale_of,
)
from aligner.judge.prompts import JudgePrompt, load_judge_prompt
from aligner.judge.protocol import Judgment, Side, combine_orders


@dataclass
class ShownPair:
    """What the judge is shown for one pair: the query and each row's images (a composed
    grid PNG, or the images; :func:`aligner.judge.images.row_images`)."""

    query: str
    row_a: list[bytes]
    row_b: list[bytes]


def _side(x: float, y: float, margin: float) -> Side:
    if not (math.isfinite(x) and math.isfinite(y)) or abs(x - y) < margin:
        return "similar"
    return "a" if x > y else "b"


def decision_kind(reads: Sequence[str]) -> str:
    """How a judgment was read from its answers: ``logprobs`` / ``text`` when all were read
    that way, ``unparsed`` when any answer named no choice, else ``mixed``."""
    kinds = set(reads)
    if "unparsed" in kinds:
        return "unparsed"
    return kinds.pop() if len(kinds) == 1 else "mixed"


class LMMJudge:
    """Judge pairs of rows with a VLM back end (see the module docstring).

    Args:
        backend: a :class:`~aligner.judge.backend.VLMBackend`.
        prompt: a prompt name, id or file of style ranker or scorer.
        rationale: also ask for a short reason (more tokens per request).
        rationale_tokens: tokens generated when a reason is asked for.
        score_margin: scorer style: expected-score difference below which it is "similar".
    """

    proxy = False

    def __init__(self, backend: VLMBackend, prompt: str | JudgePrompt = "ranker",
                 rationale: bool = False, rationale_tokens: int = 48,
                 score_margin: float = 0.25) -> None:
        self.backend = backend
        self.prompt = prompt if isinstance(prompt, JudgePrompt) else load_judge_prompt(prompt)
        if self.prompt.style not in ("ranker", "scorer"):
            raise ValueError(f"prompt {self.prompt.id} has style {self.prompt.style!r}: a row "
                             "judge needs a ranker or scorer prompt")
        self.rationale, self.rationale_tokens = rationale, max(2, rationale_tokens)
        self.score_margin = score_margin
        self.choices = tuple(self.prompt.choices)

    @property
    def name(self) -> str:
        """``lmm:<back end>:<model>``."""
        return f"lmm:{self.backend.name}:{self.backend.model}"

    @property
    def style(self) -> str:
        return self.prompt.style

    def _questions(self) -> list[tuple[str, str, bool]]:
        """(aspect, scored row label, ask for a rationale) per request of one order."""
        p = self.prompt
        if p.style == "ranker":
            return [(a, "", self.rationale and a == "overall") for a in p.aspects]
        return [(a, label, self.rationale) for a in p.aspects for label in p.labels]

    def requests(self, query: str, first: Sequence[bytes],
                 second: Sequence[bytes]) -> list[ChatRequest]:
        """The requests of one order (``first`` shown as row A, ``second`` as row B)."""
        out = []
        for aspect, label, why in self._questions():
            msgs = self.prompt.messages(query, [first, second], aspect, row=label, rationale=why)
            out.append(ChatRequest(msgs, self.choices, self.rationale_tokens if why else 1))
        return out

    def decide(self, replies: Sequence[ChatReply]) -> Judgment:
        """One order's judgment (in the order shown) from its replies.

        Raises:
            BackendError: a reply that failed (its reason).
        """
        errors = [r.error for r in replies if r.error]
        if errors:
            raise BackendError(errors[0])
        qs = self._questions()
        reads, why, details = [], [], {}
        if self.prompt.style == "ranker":
            sides: dict[str, Side] = {}
            for (aspect, _, asked), reply in zip(qs, replies, strict=True):
                probs, read = choice_distribution(reply, self.choices)
                reads.append(read)
                side: Side = "similar"
                if probs:
                    side = self.prompt.choices[max(probs, key=probs.__getitem__)]
                sides[aspect] = side
                details[aspect] = {"p": {c: round(v, 4) for c, v in probs.items()},
                                   "read": read}
                if asked:
                    why.append(rationale_of(reply.text))
            winner = sides.pop("overall")
            return Judgment(winner, sides, " ".join(w for w in why if w),
                            {**details, "read": decision_kind(reads)})
        scores: dict[str, dict[str, float]] = {}
        for (aspect, label, asked), reply in zip(qs, replies, strict=True):
            probs, read = choice_distribution(reply, self.choices)
            reads.append(read)
            value = (sum(float(self.prompt.choices[c]) * p for c, p in probs.items())
                     if probs else math.nan)
            scores.setdefault(aspect, {})[label] = value
            if asked and reply.text:
                why.append(f"{aspect} {label}: {rationale_of(reply.text)}")
        la, lb = self.prompt.labels
        aspects = {a: _side(s[la], s[lb], self.score_margin) for a, s in scores.items()}
        both = [(s[la], s[lb]) for s in scores.values()
                if math.isfinite(s[la]) and math.isfinite(s[lb])]
        mean_a = sum(x for x, _ in both) / len(both) if both else math.nan
        mean_b = sum(y for _, y in both) / len(both) if both else math.nan
        winner = _side(mean_a, mean_b, self.score_margin)
        details = {a: [round(s[la], 4), round(s[lb], 4)] for a, s in scores.items()}
        details.update(mean=[mean_a, mean_b], read=decision_kind(reads))
        return Judgment(winner, aspects, "; ".join(why), details)

    def judge_pairs(self, pairs: Sequence[ShownPair]) -> list[tuple[Judgment, bool] | str]:
        """Judge every pair in both orders with one batched back-end call.

        Returns:
            Per pair, ``(combined judgment, orders agreed)``, or the reason it failed.
        """
        reqs: list[ChatRequest] = []
        spans = []
        for p in pairs:
            one = self.requests(p.query, p.row_a, p.row_b)
            two = self.requests(p.query, p.row_b, p.row_a)
            spans.append((len(reqs), len(one), len(two)))
            reqs += one + two
        replies = self.backend.complete(reqs)
        if len(replies) != len(reqs):
            raise BackendError(f"the back end returned {len(replies)} replies for "
                               f"{len(reqs)} requests")
        out: list[tuple[Judgment, bool] | str] = []
        for lo, n1, n2 in spans:
            try:
                first = self.decide(replies[lo:lo + n1])
                second = self.decide(replies[lo + n1:lo + n1 + n2])
            except BackendError as e:
                out.append(str(e))
                continue
            both, agree = combine_orders(first, second)
            reads = {first.details.get("read"), second.details.get("read")}
            both.details["read"] = decision_kind([r for r in reads if r])
            out.append((both, agree))
        return out

    def judge_once(self, query: str, row_a: Sequence[bytes], row_b: Sequence[bytes]) -> Judgment:
        """One order only (no consistency check): row_a shown as A.

        Raises:
            BackendError: a failed request.
        """
        return self.decide(self.backend.complete(self.requests(query, row_a, row_b)))

    def describe(self) -> dict[str, Any]:
        return {"judge": self.name, "proxy": False, "style": self.style,
                "prompt": self.prompt.id, "rationale": self.rationale,
                "score_margin": self.score_margin, "backend": self.backend.describe()}
