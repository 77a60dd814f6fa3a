"""The teacher: how a pool of candidates is scored for aesthetics (steps 2-3 of building pairs).

For each query's pool of candidate images (:mod:`aligner.preferences.candidates`):

* **semantic score**: cosine of each candidate to the *original* query;
* **aesthetic score**: named teacher components, each z-scored within the pool, combined with
  weights (:func:`teacher_components`, :func:`aesthetic_score`):

  - ``scorer``: the embeddings' ``aesthetic`` column (the pixel scorer, e.g. low-level);
  - ``rephrase``: cos(image, rephrased query) - cos(image, original query);
  - ``contrast``: cos(image, good rephrase) - cos(image, bad rephrase) - the CLIP-IQA
    antonym-prompt idea (Wang et al. 2023); the good rephrase is the rephrased query, the bad
    one comes from a callable (default :data:`DEFAULT_BAD_TEMPLATE`);
  - ``reward``: a trained reward model's score of (query, image)
    (:class:`aligner.reward.teacher.PoolRewards`), learnt from votes: human or simulated raters,
    or LMM labels - unlike the others it needs labelled data.

The default negatives are generic: :data:`DEFAULT_BAD_TEMPLATE` is photo-critique vocabulary a
photographer would write for real photographs, sharing no word with the built-in world's
vocabulary, and the degraded copies default to
:data:`aligner.preferences.degrade.DEFAULT_DEGRADE_KINDS`. The former defaults, written knowing
the built-in world's hidden look factors (its colour rule included), survive only as an
ablation: :data:`ORACLE_AWARE_BAD_TEMPLATE`, ``ORACLE_AWARE_DEGRADE_KINDS`` and the teacher
preset ``"both+degraded:oracle_aware"`` (:data:`ABLATION_PRESETS`).

Nothing here reads an oracle or imports torch (text encoding is a callable).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from aligner.preferences.degrade import DEFAULT_DEGRADE_KINDS, ORACLE_AWARE_DEGRADE_KINDS

TEACHER_COMPONENTS = ("scorer", "rephrase", "contrast", "reward")
#: The antonym ("bad") prompt of ``contrast``: generic photo-critique vocabulary for real
#: photographs (quality, focus, noise, exposure, colour, framing, compression), no particular
#: colour cast, and no word of the built-in world's vocabulary (its look phrases included:
#: ``tests/unit/test_prompt_vocab.py``). Worded as
#: ``TemplateRephraser(style="reorg", polarity="bad")`` words it.
DEFAULT_BAD_TEMPLATE = ("a low-quality, unfocused, grain-ridden, poorly exposed, colourless, "
                        "clumsily framed photo of {q} with compression artefacts")
#: ABLATION ONLY. The former default, written knowing the built-in world's hidden look factors:
#: it lists exactly those factors, including that world's particular colour rule (a sickly
#: green tint). Using it tells the teacher the hidden taste, so it must only be used to measure
#: what that knowledge is worth (preset ``"both+degraded:oracle_aware"``), never as a default.
ORACLE_AWARE_BAD_TEMPLATE = ("a blurry, grainy, dark, dull, off-centre photo of {q} with a "
                             "sickly green tint")

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

def zscore(x: np.ndarray, pool: np.ndarray | None = None) -> np.ndarray:
    """``(x - mean) / std`` with the mean and standard deviation of the finite entries of
    ``pool`` (default: ``x`` itself); NaN -> 0; fewer than two finite pool entries or a
    constant pool -> zeros."""
    x = np.asarray(x, np.float64)
    ref = x if pool is None else np.asarray(pool, np.float64)
    ok = np.isfinite(ref)
    out = np.zeros(x.shape, np.float64)
    if ok.sum() >= 2:
        sd = ref[ok].std()
        if sd > 1e-12:
            fin = np.isfinite(x)
            out[fin] = (x[fin] - ref[ok].mean()) / sd
    return out.astype(np.float32)


def teacher_components(cand: np.ndarray, q_orig: np.ndarray, q_reph: np.ndarray | None = None,
                       q_bad: np.ndarray | None = None,
                       scorer: np.ndarray | None = None,
                       reward: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Raw per-candidate scores of one pool: ``sem`` and every available teacher component.

    Args:
        cand: ``[K, D]`` normalised candidate image embeddings.
        q_orig: ``[D]`` original query vector.
        q_reph: ``[D]`` rephrased ("good") query vector, if any.
        q_bad: ``[D]`` antonym ("bad") rephrase vector, if any.
        scorer: ``[K]`` pixel-scorer values (NaN where unscored), if any.
        reward: ``[K]`` reward-model scores of the candidates with the query, if any.

    Returns:
        ``{"sem": [K], "scorer": [K], "rephrase": [K], "contrast": [K], "reward": [K]}``
        (components whose
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
    if reward is not None:
        out["reward"] = np.asarray(reward, np.float32)
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


def _preset(aesthetic: list[str], degraded: bool, bad_template: str = DEFAULT_BAD_TEMPLATE,
            degrade_kinds: Sequence[str] = DEFAULT_DEGRADE_KINDS) -> dict[str, Any]:
    return {"aesthetic": list(aesthetic), "aesthetic_weights": [1.0] * len(aesthetic),
            "degraded": degraded, "bad_template": bad_template,
            "degrade_kinds": list(degrade_kinds)}


#: Named teachers (what orders the grid, whether degraded copies are added, and which negatives
#: they use), as the quickstart trains and diagnoses them: ``rephrase`` is the paper's teacher
#: (the rephrased query's view, as antonym contrast), ``scorer`` the low-level pixel scorer,
#: ``both`` the two z-scores summed. Every key is a field of
#: ``aligner.preferences.build.BuildPreferencesConfig`` (``bad_template``; the rest from
#: :class:`aligner.preferences.pairs.PairSettings`), so ``BuildPreferencesConfig(**preset)``
#: builds it. All use the generic negatives (:data:`DEFAULT_BAD_TEMPLATE`,
#: ``DEFAULT_DEGRADE_KINDS``) except the ablations named in :data:`ABLATION_PRESETS`.
TEACHER_PRESETS: dict[str, dict[str, Any]] = {
    "rephrase": _preset(["contrast"], degraded=False),
    "scorer": _preset(["scorer"], degraded=False),
    "both": _preset(["scorer", "contrast"], degraded=False),
    "both+degraded": _preset(["scorer", "contrast"], degraded=True),
    # ABLATION ONLY: "both+degraded" with the former, oracle-aware negatives (a bad prompt and
    # degraded copies written knowing the built-in world's hidden look factors, ``tint``
    # included). It measures how much of a result comes from the teacher knowing the taste.
    "both+degraded:oracle_aware": _preset(["scorer", "contrast"], degraded=True,
                                          bad_template=ORACLE_AWARE_BAD_TEMPLATE,
                                          degrade_kinds=ORACLE_AWARE_DEGRADE_KINDS),
}
#: Presets that are ablations, not teachers to report as results: a job that runs "every
#: teacher" by default should leave these out unless asked for.
ABLATION_PRESETS: tuple[str, ...] = ("both+degraded:oracle_aware",)
