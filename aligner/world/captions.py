"""Captions and queries in varied natural wording.

Captions are alt text: they always describe the content, and for most images also a few
notable things about the look. Look phrases are truthful about the factor they name, and the
*choice* of what to mention leans on overall beauty the way web alt text does: a lovely picture
tends to be described by its virtues ("crisp", "warm golden light"), an ugly one by its flaws
("blurry", "dark"). That correlation is what makes "query + good look words" a useful teacher.
"""

from __future__ import annotations

import numpy as np

from aligner.world.render import Factors, goodness
from aligner.world.taste import DEFAULT_TASTE, Taste
from aligner.world.vocab import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    COUNT_WORDS,
    LOOK_WORDS,
    OVERALL_WORDS,
    PHOTO_NOUNS,
    SHAPE_WORDS,
    Words,
)


def _pick(rng: np.random.Generator, words: Words, heldout: bool = False) -> str:
    pool = words.heldout if heldout else words.train
    return pool[int(rng.integers(len(pool)))]


def content_phrase(rng: np.random.Generator, shape: str, colour: str, count: int | None,
                   background: str | None, heldout: bool = False) -> str:
    """E.g. "two scarlet discs on a lawn" (``count=None``: plural without a number)."""
    plural = count is None or count > 1
    noun = _pick(rng, SHAPE_WORDS[shape][1 if plural else 0], heldout)
    col = _pick(rng, COLOUR_WORDS[colour], heldout)
    if count is None:
        head = f"{col} {noun}"
    else:
        num = _pick(rng, COUNT_WORDS[count], heldout)
        if num == "a" and col[0] in "aeiou":
            num = "an"
        head = f"{num} {col} {noun}"
    if background is None:
        return head
    prep = ("on", "against", "over", "in front of")[int(rng.integers(4))]
    if background == "sky":
        prep = ("against", "under", "in front of")[int(rng.integers(3))]
    return f"{head} {prep} {_pick(rng, BACKGROUND_WORDS[background], heldout)}"


def look_phrases(rng: np.random.Generator, f: Factors, beauty: float, max_phrases: int = 3,
                 bias: float = 2.5, heldout: bool = False,
                 taste: Taste = DEFAULT_TASTE) -> list[str]:
    """Pick 1-``max_phrases`` truthful look phrases, favouring virtues of beautiful images.

    A factor is *notable* when its look is far from plain (``g``: the factor's goodness in the
    built-in words, :func:`~aligner.world.render.goodness`, which also picks the phrase: a dark
    image is called dark in every world); its chance of being mentioned is
    ``|g|^2 * exp(bias * beauty * sign(t))`` with ``t`` the factor's goodness under the world's
    ``taste``: people describe a picture they love by what they love in it, so the polarity of
    what is said follows the world's hidden taste while every single phrase stays true of its
    factor. With the default taste ``t`` is ``g``.
    """
    g = goodness(f)
    t = g if taste is DEFAULT_TASTE else taste.goodness(f.as_dict())
    names = list(g)
    weights = np.array([abs(g[k]) ** 2 * np.exp(bias * beauty * np.sign(t[k])) for k in names])
    weights = np.where(np.array([abs(g[k]) for k in names]) < 0.3, 0.0, weights)
    if weights.sum() <= 0:
        return []
    n = int(rng.integers(1, max_phrases + 1))
    n = min(n, int((weights > 0).sum()))
    chosen = rng.choice(len(names), size=n, replace=False, p=weights / weights.sum())
    out = []
    for i in sorted(chosen):
        k = names[i]
        if g[k] > 0:
            key = (k, "good")
        elif k == "exposure":
            key = (k, "dark" if f.exposure < 0 else "bright")
        else:
            key = (k, "bad")
        out.append(_pick(rng, LOOK_WORDS[key], heldout))
    return out


def heldout_look_phrases(rng: np.random.Generator, good: bool, n: int) -> list[str]:
    """``n`` look phrases of one polarity, in held-out words (for paraphrase queries)."""
    keys = [k for k in LOOK_WORDS if (k[1] == "good") == good]
    picks = rng.choice(len(keys), size=min(n, len(keys)), replace=False)
    return [_pick(rng, LOOK_WORDS[keys[int(i)]], heldout=True) for i in sorted(picks)]


def _join_adjectives(words: list[str]) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def make_caption(rng: np.random.Generator, f: Factors, beauty: float, p_look: float = 0.8,
                 p_overall: float = 0.35, taste: Taste = DEFAULT_TASTE) -> str:
    """One alt-text caption for an image with factors ``f`` and oracle score ``beauty`` (under
    the world's ``taste``, which only steers which true things are said)."""
    content = content_phrase(rng, f.shape, f.colour, f.count,
                             f.background if rng.random() < 0.85 else None)
    looks = look_phrases(rng, f, beauty, taste=taste) if rng.random() < p_look else []
    if rng.random() < p_overall and abs(beauty) > 0.35:
        looks.insert(0, _pick(rng, OVERALL_WORDS["good" if beauty > 0 else "bad"]))
    return compose(rng, content, looks)


def compose(rng: np.random.Generator, content: str, looks: list[str],
            heldout_nouns: bool = False) -> str:
    """Put content and look phrases together in one of several sentence shapes."""
    noun = _pick(rng, PHOTO_NOUNS, heldout_nouns)
    adjectives = [w for w in looks if not w.startswith(("with ", "in "))]
    trailing = [w for w in looks if w.startswith(("with ", "in "))]
    art_noun = "an" if noun[0] in "aeiou" else "a"
    if not looks:
        return f"{art_noun} {noun} of {content}" if rng.random() < 0.5 else content
    form = int(rng.integers(3))
    if form == 0 and adjectives:  # "a blurry, dark photo of two red circles ..."
        art = "an" if adjectives[0][0] in "aeiou" else "a"
        text = f"{art} {', '.join(adjectives)} {noun} of {content}"
        return text + (" " + " ".join(trailing) if trailing else "")
    if form == 1:  # "two red circles on grass, blurry and dark"
        return f"{content}, {_join_adjectives(looks)}"
    # "a photo of two red circles on grass - crisp, vivid"
    return f"{art_noun} {noun} of {content}: {', '.join(looks)}"
