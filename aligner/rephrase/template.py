"""The deterministic, rule-based rephraser: tests, the fallback of every LLM, and the antonym.

Each of the paper's prompt styles has a fixed rule over a generic photographic lexicon::

    detail   two red circles on grass, in focus with fine detail, low noise, properly ...
    k_list   two red circles on grass; precise focus, low noise, proper exposure, rich ...
    kw_dict  two red circles on grass {lighting: good natural light, proper exposure, ...}
    reorg    a high-quality, in-focus, finely detailed, properly exposed, richly coloured,
             pleasingly framed photo of two red circles on grass in good natural light
    repeat   two red circles on grass, two red circles on grass, precise focus, ...

``polarity="bad"`` gives the antonym rephrase ("a low-quality, unfocused, grain-ridden, poorly
exposed, colourless, clumsily framed photo of <query> with compression artefacts": the reorg
style is :data:`aligner.preferences.teacher.DEFAULT_BAD_TEMPLATE`), for antonym-contrast
scores in the CLIP-IQA manner: ``sim(image, good) - sim(image, bad)``. Both lexicons are
generic photo-quality vocabulary a photographer would write for real photographs (focus and
detail, noise, exposure and light, colour, framing, compression), with no particular colour
cast, tone or composition rule, and they share no word with the built-in world's vocabulary
(``aligner/world/vocab.py``: its content words and look phrases; checked by
``tests/unit/test_prompt_vocab.py``). The good ``reorg`` rendering is also the evaluation's
premise phrase (:func:`aligner.evaluation.oracle.with_good_looks`).

``polarity="bad_oracle_aware"`` (:data:`ORACLE_AWARE_BAD_LEXICON`) is an ABLATION ONLY: the
former bad lexicon, written knowing the built-in world's hidden look factors, including its
particular colour rule (a sickly green tint). It must only be selected explicitly, to measure
what knowing the taste is worth.

The query is always kept verbatim, so every output passes
:func:`aligner.rephrase.base.check_rephrase`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from aligner.rephrase.base import Failed, Rephraser

# v3: lexicons reworded to share no word with the built-in world's vocabulary (v2 was generic
# in intent but made of that world's look phrases: "crisp", "clean", "well-lit", "vivid",
# "blurry", "noisy", "lifeless" ...). v2: generic lexicons (v1's "good" said "centred" and
# "warm golden light", its "bad" was the oracle-aware lexicon below).
TEMPLATE_VERSION = "v3"

#: ABLATION ONLY: the v1 bad lexicon, written knowing the built-in world's hidden look factors
#: (it names exactly those factors and that world's colour rule, a sickly green tint).
ORACLE_AWARE_BAD_LEXICON: dict[str, Any] = {
    "adjectives": ("blurry", "grainy", "dark", "dull", "off-centre"),
    "tail": "with a sickly green tint",
    "detail": "blurry and out of focus, grainy and noisy, dark and underexposed, "
              "dull washed-out colours, off-centre composition, a sickly green tint",
    "keywords": ("blurry", "grainy", "underexposed", "dull colours", "off-centre composition",
                 "sickly green tint", "no detail", "flat contrast"),
    "dict": {"lighting": "dark, underexposed", "focus": "blurry, out of focus",
             "colour": "dull, sickly green tint", "composition": "off-centre, cluttered"},
}

LEXICON: dict[str, dict[str, Any]] = {
    "good": {
        "adjectives": ("high-quality", "in-focus", "finely detailed", "properly exposed",
                       "richly coloured", "pleasingly framed"),
        "tail": "in good natural light",
        "detail": "in focus with fine detail, low noise, properly exposed, rich natural colour, "
                  "pleasing framing, good natural light",
        "keywords": ("precise focus", "low noise", "proper exposure", "rich natural colour",
                     "pleasing framing", "good natural light", "fine detail", "good contrast"),
        "dict": {"lighting": "good natural light, proper exposure",
                 "focus": "precise, fine detail, low noise",
                 "colour": "rich, natural, true to life",
                 "composition": "pleasing, uncluttered framing"},
    },
    "bad": {
        "adjectives": ("low-quality", "unfocused", "grain-ridden", "poorly exposed", "colourless",
                       "clumsily framed"),
        "tail": "with compression artefacts",
        "detail": "unfocused with no fine detail, grain-ridden, poorly exposed, colourless, "
                  "clumsily framed, compression artefacts, low quality",
        "keywords": ("unfocused", "grain-ridden", "poor exposure", "colourless", "clumsy framing",
                     "compression artefacts", "no detail", "low quality"),
        "dict": {"lighting": "poorly exposed, harsh or muddy", "focus": "unfocused, grain-ridden",
                 "colour": "colourless, unnatural", "composition": "clumsy, cluttered"},
    },
    "bad_oracle_aware": ORACLE_AWARE_BAD_LEXICON,  # ablation only: select it explicitly
}
_MEDIUM = re.compile(r"^(?:an?|the)\s+(?:photo|photograph|picture|image|shot)\s+of\s+",
                     re.IGNORECASE)


class TemplateRephraser(Rephraser):
    """Rule-based rephrases in one of the paper's styles, good or bad (antonym) polarity.

    Args:
        style: ``detail``, ``k_list``, ``kw_dict``, ``reorg`` or ``repeat``.
        polarity: ``good`` (aesthetic expectations) or ``bad`` (their antonyms), both
            generic; ``bad_oracle_aware`` is the oracle-aware ablation lexicon (never a
            default).
        k: keywords for ``k_list`` (1-8).
        lexicon: override entries of :data:`LEXICON` ``[polarity]`` (same keys).
        max_chars: length limit for the faithfulness check (default rule if None).
        prompt: accepted for a uniform ``make_rephraser`` call; a style name or
            ``<style>.<version>`` selects the style when ``style`` is not given.
    """

    name = "template"
    STYLES = ("detail", "k_list", "kw_dict", "reorg", "repeat")

    def __init__(self, style: str | None = None, polarity: str = "good", k: int = 5,
                 lexicon: dict[str, Any] | None = None, max_chars: int | None = None,
                 prompt: str | None = None, **_: Any) -> None:
        style = style or (str(prompt).partition(".")[0] if prompt else "detail")
        if style not in self.STYLES:
            raise ValueError(f"template style {style!r}: one of {list(self.STYLES)}")
        if polarity not in LEXICON:
            raise ValueError(f"polarity {polarity!r}: one of {sorted(LEXICON)}")
        if not 1 <= k <= len(LEXICON[polarity]["keywords"]):
            raise ValueError(f"k must be in 1..{len(LEXICON[polarity]['keywords'])}")
        self.style, self.polarity, self.k = style, polarity, k
        self.lex = {**LEXICON[polarity], **(lexicon or {})}
        self.prompt = None
        self.max_chars = max_chars
        # a user's lexicon (or the oracle-aware ablation) may name a colour cast on purpose
        self.strict = False
        self.fallback = None

    @property
    def model(self) -> str:
        return self.polarity

    @property
    def version(self) -> str:
        """e.g. ``template:good/detail.v3`` or ``template:bad/reorg.v3``."""
        return f"template:{self.polarity}/{self.style}.{TEMPLATE_VERSION}"

    def rephrase_one(self, query: str) -> str:
        """The rule for one query (whitespace collapsed, the query kept verbatim)."""
        q = " ".join(str(query).split()).rstrip(" .,;:")
        lex = self.lex
        if self.style == "detail":
            return f"{q}, {lex['detail']}"
        if self.style == "k_list":
            return f"{q}; " + ", ".join(lex["keywords"][:self.k])
        if self.style == "kw_dict":
            return f"{q} {{" + ", ".join(f"{k}: {v}" for k, v in lex["dict"].items()) + "}"
        if self.style == "reorg":
            core = _MEDIUM.sub("", q)
            return f"a {', '.join(lex['adjectives'])} photo of {core} {lex['tail']}"
        return f"{q}, {q}, " + ", ".join(lex["keywords"][:3])  # repeat

    def generate(self, queries: Sequence[str]) -> list[str | Failed]:
        return [self.rephrase_one(q) for q in queries]
