"""The teacher: how a pool of candidates is scored for aesthetics (steps 2-3 of building pairs).

For each query's pool of candidate images (:mod:`aligner.preferences.candidates`):

* **semantic score**: cosine of each candidate to the *original* query;
* **aesthetic score**: named teacher components, each z-scored within the pool, combined with
  weights (:func:`teacher_components`, :func:`aesthetic_score`):

  - ``scorer``: the embeddings' ``aesthetic`` column (the pixel scorer, e.g. low-level);
  - ``rephrase``: cos(image, rephrased query) - cos(image, original query);
  - ``contrast``: cos(image, good rephrase) - cos(image, bad rephrase) - the CLIP-IQA
    antonym-prompt idea (Wang et al. 2023); the good rephrase is the rephrased query, the bad
    one comes from a callable (default :data:`DEFAULT_BAD_TEMPLATE`).

Nothing here reads an oracle or imports torch (text encoding is a callable).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

TEACHER_COMPONENTS = ("scorer", "rephrase", "contrast")
DEFAULT_BAD_TEMPLATE = "a blurry, grainy, dark, dull, off-centre photo of {q} with a sickly green tint"

EncodeTexts = Callable[[list[str]], np.ndarray]  # texts -> [N, D] L2-normalised
RephraseBatch = Callable[[Sequence[str]], list[str]]  # queries -> rephrases, one each



def template_rephraser(template: str = DEFAULT_BAD_TEMPLATE) -> RephraseBatch:
    """A batch rephraser from a ``{q}`` template (the default antonym for ``contrast``).

    ``aligner.rephrase.TemplateRephraser(style, polarity="bad").rephrase_batch`` or any LLM
    rephraser's ``rephrase_batch`` plugs in the same way.
    """
    if "{q}" not in template:
        raise ValueError(f"template {template!r} has no {{q}} placeholder")

    def rephrase(queries: Sequence[str]) -> list[str]:
        return [template.replace("{q}", " ".join(str(q).split()).rstrip(" .,;:"))
                for q in queries]

    return rephrase


# ----------------------------------------------------------------------------- teacher

def zscore(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over the finite entries; NaN -> 0; a constant vector -> zeros."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    out = np.zeros(x.shape, np.float64)
    if ok.sum() >= 2:
        sd = x[ok].std()
        if sd > 1e-12:
            out[ok] = (x[ok] - x[ok].mean()) / sd
    return out.astype(np.float32)


def teacher_components(cand: np.ndarray, q_orig: np.ndarray, q_reph: np.ndarray | None = None,
                       q_bad: np.ndarray | None = None,
                       scorer: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Raw per-candidate scores of one pool: ``sem`` and every available teacher component.

    Args:
        cand: ``[K, D]`` normalised candidate image embeddings.
        q_orig: ``[D]`` original query vector.
        q_reph: ``[D]`` rephrased ("good") query vector, if any.
        q_bad: ``[D]`` antonym ("bad") rephrase vector, if any.
        scorer: ``[K]`` pixel-scorer values (NaN where unscored), if any.

    Returns:
        ``{"sem": [K], "scorer": [K], "rephrase": [K], "contrast": [K]}`` (components whose
        inputs are missing are left out). ``contrast`` uses the original query as the good
        side when there is no rephrase.
    """
    sem = cand @ q_orig
    out = {"sem": sem.astype(np.float32)}
    if scorer is not None:
        out["scorer"] = np.asarray(scorer, np.float32)
    if q_reph is not None:
        out["rephrase"] = (cand @ q_reph - sem).astype(np.float32)
    if q_bad is not None:
        good = cand @ q_reph if q_reph is not None else sem
        out["contrast"] = (good - cand @ q_bad).astype(np.float32)
    return out


def aesthetic_score(components: Mapping[str, np.ndarray], names: Sequence[str],
                    weights: Sequence[float]) -> np.ndarray:
    """``sum_k w_k * zscore(component_k)`` over the pool: ``[K]`` float32.

    Raises:
        ValueError: a name that is not in ``components``, or names/weights of unequal length.
    """
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} aesthetic components but {len(weights)} weights")
    total = None
    for name, w in zip(names, weights, strict=True):
        if name not in components:
            raise ValueError(f"aesthetic component {name!r} is not available here "
                             f"(have {sorted(k for k in components if k != 'sem')})")
        z = float(w) * zscore(components[name])
        total = z if total is None else total + z
    if total is None:
        raise ValueError("no aesthetic components given")
    return total.astype(np.float32)


def teacher_name(names: Sequence[str], weights: Sequence[float]) -> str:
    """``"scorer*1+contrast*1"``: the teacher string recorded with each pair."""
    return "+".join(f"{n}*{w:g}" for n, w in zip(names, weights, strict=True))


#: Named teachers (what orders the grid, and whether degraded copies are added), as the
#: quickstart trains and diagnoses them: ``rephrase`` is the paper's teacher (the rephrased
#: query's view, as antonym contrast), ``scorer`` the low-level pixel scorer, ``both`` the two
#: z-scores summed. Each maps onto :class:`aligner.preferences.pairs.PairSettings` fields.
TEACHER_PRESETS: dict[str, dict[str, Any]] = {
    "rephrase": {"aesthetic": ["contrast"], "aesthetic_weights": [1.0], "degraded": False},
    "scorer": {"aesthetic": ["scorer"], "aesthetic_weights": [1.0], "degraded": False},
    "both": {"aesthetic": ["scorer", "contrast"], "aesthetic_weights": [1.0, 1.0],
             "degraded": False},
    "both+degraded": {"aesthetic": ["scorer", "contrast"], "aesthetic_weights": [1.0, 1.0],
                      "degraded": True},
}
