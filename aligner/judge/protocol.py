"""The order-consistent pairwise protocol every row judge follows (the paper's LMM judge).

A judge compares two rows of images for one query on three aspects, as the paper's LMM judge
and its HPIR raters did: **accuracy** (do the images show what the query asks for),
**aesthetics** and **diversity**, plus an overall winner. LMM judges have order effects, so
every pair is judged twice with the rows swapped; a side wins (overall and per aspect) only
when both orders agree, otherwise the result is "similar" (:func:`combine_orders`,
:func:`order_consistent`). Two "similar" verdicts agree; "a" in one order and "similar" in the
other do not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Side = Literal["a", "b", "similar"]
SIDES: tuple[Side, ...] = ("a", "b", "similar")
ASPECTS = ("accuracy", "aesthetics", "diversity")
R = TypeVar("R")


@dataclass
class Judgment:
    """A judge's decision on rows a and b (in the order they were shown).

    Attributes:
        winner: overall "a", "b" or "similar".
        aspects: per aspect "a", "b" or "similar" (only the aspects this judge judges).
        rationale: the judge's reason in words ('' when none was asked for).
        details: the numbers behind the decision (choice probabilities, expected scores,
            proxy means), kept for the judgments table.
    """

    winner: Side
    aspects: dict[str, Side] = field(default_factory=dict)
    rationale: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def swap(s: Side) -> Side:
    """The same verdict seen from the other order: a <-> b, similar stays."""
    return {"a": "b", "b": "a", "similar": "similar"}[s]


def swapped(j: Judgment) -> Judgment:
    """A judgment of (b, a) re-expressed in terms of (a, b)."""
    return Judgment(swap(j.winner), {k: swap(v) for k, v in j.aspects.items()}, j.rationale,
                    j.details)


def combine_orders(first: Judgment, second: Judgment) -> tuple[Judgment, bool]:
    """Combine the judgment of (a, b) with that of (b, a) (still in (b, a) terms).

    A side wins overall, and per aspect, only when both orders name it; otherwise the result
    is "similar". Returns the combined judgment (in (a, b) terms) and whether the two overall
    verdicts agreed (two "similar" verdicts agree).
    """
    back = swapped(second)
    agree = first.winner == back.winner
    winner: Side = first.winner if agree else "similar"
    aspects: dict[str, Side] = {}
    for k in dict.fromkeys([*first.aspects, *back.aspects]):
        x, y = first.aspects.get(k, "similar"), back.aspects.get(k, "similar")
        aspects[k] = x if x == y else "similar"
    rationale = first.rationale
    if back.rationale and back.rationale != first.rationale:
        rationale = f"{first.rationale} | swapped order: {back.rationale}".strip(" |")
    if not agree:
        rationale = (rationale + " | " if rationale else "") + \
            f"orders disagreed ({first.winner} vs {back.winner}): similar"
    details = {"first": first.details, "second": second.details,
               "first_winner": first.winner, "second_winner": back.winner}
    return Judgment(winner, aspects, rationale, details), agree


def order_consistent(judge: Callable[[R, R], Judgment], a: R, b: R) -> tuple[Judgment, bool]:
    """Judge (a, b) and (b, a) with ``judge`` and combine them (:func:`combine_orders`)."""
    return combine_orders(judge(a, b), judge(b, a))
