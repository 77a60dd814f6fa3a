"""The teachers' texts share no word with the built-in world's vocabulary.

The rephrase prompts (system text, user template, few-shot examples, answer prefix), the
template rephraser's good and bad lexicons, the contrast teacher's default bad prompt and the
premise check's phrase must be written as for real photographs in general. If they used the
world's content words (its shapes, colour names, counts, backgrounds) or its look phrases
(``crisp``, ``vivid``, ``centred``, ``with warm golden tones`` ...), a teacher would be told
what this world's captions say and what its hidden taste is. The named oracle-aware ablation
(``ORACLE_AWARE_BAD_LEXICON`` / ``ORACLE_AWARE_BAD_TEMPLATE``) is exempt on purpose.

Two checks, both on lowercase text with hyphens read as spaces:

* no CONTENT token: every word of every SHAPE / COLOUR / BACKGROUND / COUNT phrase (train and
  held-out), function words aside, may not appear as a whole word (nor with a plain inflection:
  ``stars``, ``redness``, ``greenish``);
* no LOOK phrase: every LOOK_WORDS / OVERALL_WORDS phrase (train and held-out) may not appear
  as a whole phrase (single-word ones nor with a plain inflection: ``sharpness``, ``cleaner``);
* no word of the world's particular TASTE (``aligner/world/taste.py`` DEFAULT_TASTE: a warm golden tone,
  a centred composition, a green cast as the flaw): ``warm``, ``centre``, ``tint`` ...

The judge prompts (``aligner/judge/prompts``) have no few-shot examples: they ask a judge about
a query and images, not teach a teacher, so they are not checked here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import yaml

from aligner.preferences import teacher as Te
from aligner.rephrase.prompt import PROMPTS_DIR, load_prompt
from aligner.rephrase.template import LEXICON, ORACLE_AWARE_BAD_LEXICON, TemplateRephraser
from aligner.world.vocab import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    COUNT_WORDS,
    LOOK_WORDS,
    OVERALL_WORDS,
    SHAPE_WORDS,
    Words,
)

#: Words of the world's phrases that carry no content of their own.
FUNCTION_WORDS = frozenset("a an the of on in with and set group just".split())
#: Plain English inflections and derivations a banned word may carry and still be that word.
_SUFFIX = r"(?:s|es|ly|ness|er|est|ish|ed)?"


def _norm(text: str) -> str:
    """Lowercase, hyphens and other separators as spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower().replace("-", " ")).split())


def _phrases(groups: Iterable[Words]) -> set[str]:
    return {p for g in groups for p in (*g.train, *g.heldout)}


def content_tokens() -> set[str]:
    """Every word of the world's content phrases (shapes, colours, counts, backgrounds)."""
    groups = [w for pair in SHAPE_WORDS.values() for w in pair]
    groups += [*COLOUR_WORDS.values(), *BACKGROUND_WORDS.values(), *COUNT_WORDS.values()]
    return {t for p in _phrases(groups) for t in _norm(p).split()} - FUNCTION_WORDS


def look_phrases() -> set[str]:
    """Every look and overall phrase of the world (normalised)."""
    return {_norm(p) for p in _phrases([*LOOK_WORDS.values(), *OVERALL_WORDS.values()])}


def _pattern(phrase: str) -> re.Pattern[str]:
    words = phrase.split()
    body = r"\s+".join(map(re.escape, words)) + (_SUFFIX if len(words) == 1 else "")
    return re.compile(rf"(?<![a-z0-9]){body}(?![a-z0-9])")


#: The world's particular taste in words a look phrase need not contain (its tone and
#: composition rules, its colour flaw): generic photographic advice does not say them.
TASTE_WORDS = ("warm", "golden", "amber", "centre", "center", "centred", "centered", "tint",
               "tinted", "greenish", "tone", "tones")

CONTENT = {t: _pattern(t) for t in sorted(content_tokens())}
LOOKS = {p: _pattern(p) for p in sorted(look_phrases())}
TASTE = {t: _pattern(t) for t in TASTE_WORDS}


def offences(texts: dict[str, str]) -> list[tuple[str, str]]:
    """``(source, word)`` for every content token, look phrase or taste word in ``texts``."""
    out = []
    for source, text in texts.items():
        t = _norm(text)
        out += [(source, f"content:{w}") for w, rx in CONTENT.items() if rx.search(t)]
        out += [(source, f"look:{w}") for w, rx in LOOKS.items() if rx.search(t)]
        out += [(source, f"taste:{w}") for w, rx in TASTE.items() if rx.search(t)]
    return out


# ---------------------------------------------------------------- the texts


def _flatten(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= {f"{prefix}.{k}.key": str(k)} | _flatten(f"{prefix}.{k}", v)
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out |= _flatten(f"{prefix}[{i}]", v)
        return out
    return {prefix: str(value)}


def prompt_texts() -> dict[str, str]:
    """Every shipped rephrase prompt file, every field (system, user template, examples,
    answer prefix, description), read both raw and through ``load_prompt``."""
    files = sorted(PROMPTS_DIR.glob("*.y*ml"))
    assert files, PROMPTS_DIR
    out: dict[str, str] = {}
    for f in files:
        data = yaml.safe_load(f.read_text())
        for key in ("system", "user_template", "answer_prefix", "description", "examples"):
            out |= _flatten(f"{f.name}:{key}", data.get(key) or "")
        p = load_prompt(str(f))
        out[f"{f.name}:loaded.system"] = p.system
        for i, (q, r) in enumerate(p.examples):
            out[f"{f.name}:loaded.example[{i}]"] = f"{q} || {r} || {p.prefix(q)} || {p.user(q)}"
    return out


def lexicon_texts() -> dict[str, str]:
    """Every entry of the template lexicons except the named oracle-aware ablation."""
    out: dict[str, str] = {}
    for polarity, lex in LEXICON.items():
        if lex is ORACLE_AWARE_BAD_LEXICON:
            continue
        out |= _flatten(f"LEXICON[{polarity}]", lex)
    return out


def rendered_texts() -> dict[str, str]:
    """The template rephraser's renderings (good and bad, every style), the default bad
    prompt and the premise phrase, each for a query with no world word, so any world word in
    them comes from the teacher's own text."""
    from aligner.evaluation.oracle import with_good_looks

    q = "a lighthouse at dusk"
    out = {"DEFAULT_BAD_TEMPLATE": Te.DEFAULT_BAD_TEMPLATE,
           "template_rephraser()": Te.template_rephraser()([q])[0],
           "with_good_looks (premise)": with_good_looks(q)}
    for polarity in LEXICON:
        if polarity == "bad_oracle_aware":
            continue
        for style in TemplateRephraser.STYLES:
            r = TemplateRephraser(style=style, polarity=polarity, k=8)
            out[f"template:{polarity}/{style}"] = r.rephrase_one(q)
    return out


def all_texts() -> dict[str, str]:
    return prompt_texts() | lexicon_texts() | rendered_texts()


# ---------------------------------------------------------------- the tests


def test_the_checker_flags_a_known_bad_text():
    bad = {"known bad": "three blue stars on sand, crisp and sharp, centred composition, "
                        "warm tones"}
    found = {w for _, w in offences(bad)}
    assert {"content:three", "content:blue", "content:star", "content:sand", "look:crisp",
            "look:sharp", "look:centred", "taste:warm", "taste:tones"} <= found, found
    # hyphens read as spaces on both sides; whole words only
    assert ("x", "look:well lit") in offences({"x": "a well lit room"})
    assert ("x", "look:well exposed") in offences({"x": "a well-exposed shot"})
    assert ("x", "content:golden") in offences({"x": "golden-hour light"})
    assert not offences({"x": "a lighthouse at dusk, fine detail, low noise, ringside seats"})


def test_the_vocabulary_sets_are_what_they_should_be():
    assert {"one", "single", "lone", "pair", "couple", "trio", "triplet", "twin", "duo",
            "solitary", "two", "three"} <= set(CONTENT)
    assert {"sky", "sand", "grass", "wood", "paper", "beach", "lawn", "table", "golden",
            "circle", "stars"} <= set(CONTENT)
    assert not FUNCTION_WORDS & set(CONTENT)
    assert {"crisp", "well lit", "with warm golden tones", "centred", "balanced", "beautiful",
            "ugly", "poor quality"} <= set(LOOKS)


def test_every_teacher_text_is_gathered():
    texts = all_texts()
    files = {f.name for f in PROMPTS_DIR.glob("*.y*ml")}
    assert files and all(any(k.startswith(f + ":") for k in texts) for f in files)
    for polarity in ("good", "bad"):
        for key in ("adjectives", "tail", "detail", "keywords", "dict"):
            assert any(k.startswith(f"LEXICON[{polarity}].{key}") for k in texts), (polarity, key)
    assert not any("bad_oracle_aware" in k for k in texts)
    assert "DEFAULT_BAD_TEMPLATE" in texts and "with_good_looks (premise)" in texts


def test_teacher_texts_share_no_word_with_the_world():
    found = offences(all_texts())
    assert not found, "world vocabulary in teacher texts:\n" + "\n".join(
        f"  {source}: {word}" for source, word in found)


def test_the_oracle_aware_ablation_still_names_the_world():
    """The ablation is exempt on purpose: it exists to measure what knowing the taste is worth."""
    assert offences({"ablation": Te.ORACLE_AWARE_BAD_TEMPLATE})
    assert offences(_flatten("ablation", ORACLE_AWARE_BAD_LEXICON))
