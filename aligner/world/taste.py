"""The world's hidden taste: which end of each look factor is beautiful, and how much it counts.

A built-in world's "human" values an image by its six look factors (:mod:`aligner.world.render`:
blur, noise, exposure, saturation, tone, composition). Each factor has a **look axis** in
[-1, 1] that says what the image looks like, whatever anyone thinks of it
(:func:`look_axes`: +1 is the factor's first end, -1 its second):

==============  ===============  ===============
factor          first end (+1)   second end (-1)
==============  ===============  ===============
blur            sharp            soft
noise           clean            grainy
exposure        bright           dark
saturation      vivid            muted
tone            warm             cool
composition     centred          off_centre
==============  ===============  ===============

A :class:`Taste` gives every factor a weight and the end it prefers (``exposure`` may also
prefer ``balanced``: well exposed, neither end), plus the weight of one interaction (vivid
colours in the preferred light: the product of the saturation and tone goodness). Beauty is
``(sum_k w_k g_k + interaction * g_saturation * g_tone) / sum_k w_k`` with ``g_k`` the
factor's goodness under the taste (:meth:`Taste.goodness`), so it lies in about [-1, 1].

:data:`DEFAULT_TASTE` is the built-in world's taste since the start (sharp, clean, balanced,
vivid, warm, centred: what a generic photographic prior likes); its beauty is the same number,
bit for bit, as before tastes were a setting. :data:`TASTES` names the presets a world can be
made with (``jobs.make_world taste=...``); a world records its taste only in its hidden
``eval/taste.json`` (:func:`write_taste` / :func:`read_taste`), which only evaluation and the
simulated raters read. Captions never change meaning with the taste: the words that describe
a look (``blurry``, ``dark``, ``off-centre``) go with that look in every world
(:mod:`aligner.world.captions`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aligner.world.vocab import FACTORS

TASTE_FILE = "taste.json"
#: Each factor's two ends, first end first (the look axis is +1 at the first end).
ENDS: dict[str, tuple[str, str]] = {
    "blur": ("sharp", "soft"),
    "noise": ("clean", "grainy"),
    "exposure": ("bright", "dark"),
    "saturation": ("vivid", "muted"),
    "tone": ("warm", "cool"),
    "composition": ("centred", "off_centre"),
}
#: Preferences besides the two ends: ``exposure`` may prefer neither (well exposed).
MIDDLES: dict[str, tuple[str, ...]] = {"exposure": ("balanced",)}


def _clip(x: Any) -> Any:
    return np.clip(x, -1.0, 1.0)


def look_axes(f: Mapping[str, Any]) -> dict[str, Any]:
    """Each look factor's axis in [-1, 1], +1 at its first end (:data:`ENDS`).

    ``f`` maps factor names to raw values (a :class:`~aligner.world.render.Factors` as a dict,
    or the oracle's columns as arrays: the result then holds arrays). The formulas are those of
    the built-in world's goodness (``render.goodness``): blur 0 and noise 0 are sharp and clean,
    saturation 1 is vivid, tone +1 warm, composition 0 centred; exposure is ``exposure / 0.7``
    clipped (bright +1, dark -1).
    """
    blur = np.asarray(f["blur"], np.float64)
    noise = np.asarray(f["noise"], np.float64)
    return {
        "blur": 1.0 - 2.0 * np.minimum(blur / 1.6, 1.0),
        "noise": 1.0 - 2.0 * np.minimum(noise / 22.0, 1.0),
        "exposure": _clip(np.asarray(f["exposure"], np.float64) / 0.7),
        "saturation": _clip((np.asarray(f["saturation"], np.float64) - 0.6) / 0.4),
        "tone": _clip(np.asarray(f["tone"], np.float64)),
        "composition": 1.0 - 2.0 * np.minimum(np.asarray(f["composition"], np.float64) / 0.6,
                                              1.0),
    }


def balanced_exposure(exposure: Any) -> Any:
    """Goodness of ``exposure`` for a taste that prefers it well exposed: +1 at 0, -1 from
    0.7 stops either way (the built-in world's default)."""
    return 1.0 - 2.0 * np.minimum(np.abs(np.asarray(exposure, np.float64)) / 0.7, 1.0)


@dataclass(frozen=True)
class FactorTaste:
    """How one look factor counts: its weight (>= 0) and the end (or middle) it prefers."""

    weight: float
    prefer: str


@dataclass(frozen=True)
class Taste:
    """A hidden human's taste over the six look factors (module docstring).

    Args:
        factors: per factor, its weight and preferred end; every factor of
            :data:`aligner.world.vocab.FACTORS` must be there.
        interaction: weight of ``g_saturation * g_tone`` (0: none).
        name: a label for logs and reports.
    """

    factors: dict[str, FactorTaste]
    interaction: float = 0.0
    name: str = "custom"

    def __post_init__(self) -> None:
        missing = [k for k in FACTORS if k not in self.factors]
        extra = [k for k in self.factors if k not in FACTORS]
        if missing or extra:
            raise ValueError(f"a taste names every look factor {list(FACTORS)} once "
                             f"(missing {missing}, unknown {extra})")
        for k, ft in self.factors.items():
            allowed = ENDS[k] + MIDDLES.get(k, ())
            if ft.prefer not in allowed:
                raise ValueError(f"taste for {k}: prefer must be one of {list(allowed)}, got "
                                 f"{ft.prefer!r}")
            if not np.isfinite(ft.weight) or ft.weight < 0:
                raise ValueError(f"taste for {k}: weight must be finite and >= 0, got "
                                 f"{ft.weight}")
        if sum(ft.weight for ft in self.factors.values()) <= 0:
            raise ValueError("a taste needs at least one factor with a weight above 0")
        if not np.isfinite(self.interaction):
            raise ValueError(f"interaction must be finite, got {self.interaction}")

    def goodness(self, f: Mapping[str, Any]) -> dict[str, Any]:
        """Each factor's goodness in [-1, 1] under this taste (+1: the preferred look)."""
        axes = look_axes(f)
        out: dict[str, Any] = {}
        for k in FACTORS:
            prefer = self.factors[k].prefer
            if prefer == "balanced":
                out[k] = balanced_exposure(f["exposure"])
            elif prefer == ENDS[k][0]:
                out[k] = axes[k]
            else:
                out[k] = -axes[k]
        return out

    def beauty(self, f: Mapping[str, Any]) -> Any:
        """``(sum_k w_k g_k + interaction * g_saturation * g_tone) / sum_k w_k``: a float for
        one image, an array for the oracle's columns."""
        g = self.goodness(f)
        w = {k: self.factors[k].weight for k in FACTORS}
        total = sum(w[k] * g[k] for k in FACTORS)
        total = total + self.interaction * g["saturation"] * g["tone"]
        out = total / sum(w.values())
        return float(out) if np.ndim(out) == 0 else np.asarray(out, np.float64)

    def with_weights(self, scale: Mapping[str, float], name: str | None = None) -> Taste:
        """The same preferred ends with each factor's weight multiplied by ``scale[k]``
        (missing: 1): a rater whose taste spreads around this one."""
        return Taste({k: FactorTaste(ft.weight * float(scale.get(k, 1.0)), ft.prefer)
                      for k, ft in self.factors.items()}, self.interaction,
                     name or self.name)

    def disagrees_with(self, other: Taste) -> list[str]:
        """The factors whose preferred end differs from ``other``'s."""
        return [k for k in FACTORS if self.factors[k].prefer != other.factors[k].prefer]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "interaction": self.interaction,
                "factors": {k: {"weight": self.factors[k].weight,
                                "prefer": self.factors[k].prefer} for k in FACTORS}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Taste:
        """The inverse of :meth:`to_dict` (clear errors for a malformed taste)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("factors"), Mapping):
            raise ValueError("a taste is {'factors': {factor: {'weight', 'prefer'}}, "
                             "'interaction': float}")
        fs = {}
        for k, v in d["factors"].items():
            if not isinstance(v, Mapping) or "prefer" not in v or "weight" not in v:
                raise ValueError(f"taste for {k}: give 'weight' and 'prefer'")
            fs[str(k)] = FactorTaste(float(v["weight"]), str(v["prefer"]))
        return cls(fs, float(d.get("interaction", 0.0)), str(d.get("name", "custom")))


#: The built-in world's taste since the start (``render.ORACLE_WEIGHTS`` and its interaction).
DEFAULT_TASTE = Taste({
    "blur": FactorTaste(0.8, "sharp"), "noise": FactorTaste(0.7, "clean"),
    "exposure": FactorTaste(0.8, "balanced"), "saturation": FactorTaste(0.5, "vivid"),
    "tone": FactorTaste(0.8, "warm"), "composition": FactorTaste(0.8, "centred"),
}, interaction=0.4, name="default")

#: A community that likes moody low-key light and off-centre framing: it disagrees with the
#: generic photographic prior (and with the default taste) on two of the six factors and
#: agrees on the other four, with the same weights.
DIVERGENT_TASTE = Taste({
    **DEFAULT_TASTE.factors,
    "exposure": FactorTaste(0.8, "dark"), "composition": FactorTaste(0.8, "off_centre"),
}, interaction=0.4, name="divergent")

TASTES: dict[str, Taste] = {"default": DEFAULT_TASTE, "divergent": DIVERGENT_TASTE}


def resolve_taste(spec: str) -> Taste:
    """A preset name of :data:`TASTES`, or the path of a JSON file in :meth:`Taste.to_dict`'s
    form."""
    if spec in TASTES:
        return TASTES[spec]
    path = Path(spec)
    if spec.endswith(".json") and path.is_file():
        return Taste.from_dict(json.loads(path.read_text()))
    raise ValueError(f"taste {spec!r}: one of {list(TASTES)} or a JSON file "
                     "({'factors': {factor: {'weight', 'prefer'}}, 'interaction'})")


def write_taste(eval_dir: str | Path, taste: Taste) -> Path:
    """Record a world's taste in its hidden ``eval/`` folder."""
    path = Path(eval_dir) / TASTE_FILE
    path.write_text(json.dumps(taste.to_dict(), indent=2) + "\n")
    return path


def read_taste(eval_dir: str | Path) -> Taste:
    """A world's taste from its hidden ``eval/`` folder; a world made before tastes were a
    setting has none there and has the default taste."""
    path = Path(eval_dir) / TASTE_FILE
    if not path.is_file():
        return DEFAULT_TASTE
    return Taste.from_dict(json.loads(path.read_text()))
