"""Reward-model evaluation on held-out pairs, in ImageReward's table shape.

The pairs are ``test_pairs.parquet`` of :mod:`aligner.world.votes`: test-split queries over
test-split images, which no reward model, retriever or teacher trained on. Each scorer picks
the image it scores higher (a tie counts 1/2); its **preference accuracy** is the share of
pairs on which it picks the image the world's hidden taste prefers (the noise-free rater
utility of :mod:`aligner.world.raters`; pairs whose utilities differ by less than ``tie`` are
left out). Rows, as in ImageReward's Table 1:

* ``CLIP similarity``: cosine of the image and the query under the base retriever;
* ``aesthetic scorer``: the low-level pixel scorer (blind to the query);
* ``contrast teacher``: the preference builder's LLM-only teacher at pair level,
  ``cos(image, good rephrase) - cos(image, bad rephrase)`` under the base retriever;
* ``single simulated rater``: the first of the two raters who judged each pair (the human
  ceiling ImageReward compares against);
* ``reward model``: the trained model's score.

Every accuracy carries a bootstrap CI over queries (:func:`cluster_ci_dict`), and each row also
gives its accuracy on same-content pairs only (``full``: a pure aesthetic judgement) and its
agreement with the second simulated rater (what a human-labelled test set measures).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from aligner.evaluation.stats import cluster_ci_dict
from aligner.world.generate import World
from aligner.world.raters import CONTENT_KEYS, relevance, utility

log = logging.getLogger(__name__)
TEST_PAIRS_FILE = "test_pairs.parquet"
ROWS = ("CLIP similarity", "aesthetic scorer", "contrast teacher", "single simulated rater",
        "reward model")


def pair_choice(score_a: np.ndarray, score_b: np.ndarray) -> np.ndarray:
    """1 where a scorer prefers image a, 0 where b, 1/2 on a tie."""
    a, b = np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def accuracy_row(choice_a: np.ndarray, truth_a: np.ndarray, groups: np.ndarray,
                 full: np.ndarray, second_a: np.ndarray, **kw: Any) -> dict[str, Any]:
    """Accuracy against ``truth_a`` (CI over ``groups``), on ``full`` pairs, and against the
    second rater."""
    acc = np.where(truth_a, choice_a, 1.0 - choice_a)
    agree2 = np.where(second_a, choice_a, 1.0 - choice_a)
    return {"accuracy": cluster_ci_dict(acc, groups, **kw),
            "accuracy_same_content": cluster_ci_dict(acc[full], groups[full], **kw),
            "agreement_second_rater": cluster_ci_dict(agree2, groups, **kw)}


def oracle_preference(world: World, test: dict[str, list], relevance_weight: float) -> np.ndarray:
    """``u_a - u_b`` of the test pairs under the hidden taste."""
    oracle = world.oracle()
    pos = {i: k for k, i in enumerate(oracle["id"].to_pylist())}
    beauty = np.asarray(oracle["beauty"].to_pylist(), np.float64)
    labels = {k: np.asarray(oracle[k].to_pylist()) for k in CONTENT_KEYS}
    truth = {r["query_id"]: r for r in world.query_truth().to_pylist()}
    du = np.zeros(len(test["query_id"]))
    for q in set(test["query_id"]):
        rows = [k for k, x in enumerate(test["query_id"]) if x == q]
        ia = np.array([pos[test["image_a"][k]] for k in rows])
        ib = np.array([pos[test["image_b"][k]] for k in rows])
        sub = {k: v[np.concatenate([ia, ib])] for k, v in labels.items()}
        u = utility(beauty[np.concatenate([ia, ib])], relevance(truth[q], sub), relevance_weight)
        du[rows] = u[:len(rows)] - u[len(rows):]
    return du


def evaluate_reward(world_dir: str | Path, votes_dir: str | Path,
                    reward_score: Callable[[list[str], list[str]], np.ndarray],
                    base_encode_texts: Callable[[list[str]], np.ndarray],
                    base_encode_images: Callable[[list[str]], np.ndarray],
                    pixels_of: Callable[[list[str]], list[np.ndarray]],
                    relevance_weight: float, good_rephrase: Callable[[Sequence[str], Sequence[str]],
                                                                     list[str]],
                    bad_rephrase: Callable[[Sequence[str]], list[str]],
                    tie: float = 0.02, n_boot: int = 2000) -> dict[str, Any]:
    """The table (module docstring) as ``{"rows": {name: row}, "pairs": n, ...}``.

    Args:
        reward_score: ``(queries, image ids) -> rewards`` row-aligned.
        base_encode_texts / base_encode_images: the base retriever's normalised encoders
            (texts; image ids).
        pixels_of: image ids -> uint8 arrays (for the pixel scorer).
        relevance_weight: the raters' relevance weight (from the votes' config).
        good_rephrase: ``(query ids, queries) -> good rephrases``; bad_rephrase: queries -> bad.
        tie: pairs with ``|u_a - u_b| < tie`` under the hidden taste are left out.
    """
    from aligner.aesthetics.scorer import make_scorer

    path = Path(votes_dir) / TEST_PAIRS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run jobs.rater_votes first")
    t = pq.read_table(path).to_pydict()
    world = World(world_dir)
    du = oracle_preference(world, t, relevance_weight)
    keep = np.abs(du) >= tie
    t = {k: [v for v, m in zip(vals, keep, strict=True) if m] for k, vals in t.items()}
    du = du[keep]
    truth_a = du > 0
    groups = np.asarray(t["query_id"])
    full = np.asarray(t["kind"]) == "full"
    second = np.asarray(t["second_prefers_a"], bool)
    qs, a, b = t["query"], t["image_a"], t["image_b"]
    uq = sorted(set(qs))
    qpos = {q: k for k, q in enumerate(uq)}
    qi = np.array([qpos[q] for q in qs])
    q_emb = base_encode_texts(uq)
    ids = sorted(set(a) | set(b))
    ipos = {i: k for k, i in enumerate(ids)}
    ia, ib = np.array([ipos[i] for i in a]), np.array([ipos[i] for i in b])
    img = base_encode_images(ids)
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sim = (q_emb[qi] * img[ia]).sum(1), (q_emb[qi] * img[ib]).sum(1)
    scores["CLIP similarity"] = sim
    aes = make_scorer("lowlevel").score(pixels_of(ids)).astype(np.float64)
    scores["aesthetic scorer"] = aes[ia], aes[ib]
    qids_u = [t["query_id"][qs.index(q)] for q in uq]
    good = base_encode_texts(good_rephrase(qids_u, uq))
    bad = base_encode_texts(bad_rephrase(uq))
    con = (img @ good.T - img @ bad.T)  # [images, queries]
    scores["contrast teacher"] = con[ia, qi], con[ib, qi]
    rw = reward_score(list(qs) + list(qs), list(a) + list(b))
    scores["reward model"] = rw[:len(a)], rw[len(a):]
    kw = {"n_boot": n_boot}
    rows = {name: accuracy_row(pair_choice(*scores[name]), truth_a, groups, full, second, **kw)
            for name in ("CLIP similarity", "aesthetic scorer", "contrast teacher")}
    rows["single simulated rater"] = accuracy_row(
        np.asarray(t["first_prefers_a"], float), truth_a, groups, full, second, **kw)
    rows["reward model"] = accuracy_row(pair_choice(*scores["reward model"]), truth_a, groups,
                                        full, second, **kw)
    rm, others = rows["reward model"]["accuracy"], [r["accuracy"] for k, r in rows.items()
                                                    if k != "reward model"]
    verdict = {"reward_above_0.8": bool(rm["ci_low"] > 0.8),
               "reward_above_every_baseline": bool(all(rm["mean"] > o["mean"] for o in others)),
               "reward_ci_above_every_baseline_mean": bool(all(rm["ci_low"] > o["mean"]
                                                               for o in others))}
    out = {"rows": {k: rows[k] for k in ROWS}, "pairs": int(len(du)),
           "pairs_same_content": int(full.sum()), "queries": int(len(uq)),
           "ties_left_out": int((~keep).sum()), "tie": tie,
           "truth": "the built-in world's hidden taste (noise-free rater utility)",
           "raters": "simulated raters", "verdict": verdict}
    log.info("reward evaluation on %d held-out pairs:\n%s", len(du), markdown_table(out))
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """ImageReward's Table 1 shape: one row per scorer, accuracies with CIs."""
    def cell(d: dict[str, Any]) -> str:
        return f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"

    lines = ["| scorer | preference accuracy (hidden taste) | same-content pairs | "
             "agreement with a second simulated rater |", "|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {cell(r['accuracy'])} | {cell(r['accuracy_same_content'])} "
                     f"| {cell(r['agreement_second_rater'])} |")
    lines.append("")
    lines.append(f"{result['pairs']} held-out pairs ({result['pairs_same_content']} same-content)"
                 f" over {result['queries']} test queries and test-split images; 95% CIs "
                 "resample queries; raters are simulated.")
    return "\n".join(lines)


def plot_accuracy(result: dict[str, Any], path: str | Path) -> None:
    """Bar chart of the accuracies with their CIs (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for k, key in enumerate(("accuracy", "accuracy_same_content")):
        m = np.array([result["rows"][n][key]["mean"] for n in names])
        lo = np.array([result["rows"][n][key]["ci_low"] for n in names])
        hi = np.array([result["rows"][n][key]["ci_high"] for n in names])
        x = np.arange(len(names)) + (k - 0.5) * 0.38
        ax.bar(x, m, 0.38, yerr=[m - lo, hi - m], capsize=3,
               label="all pairs" if k == 0 else "same-content pairs")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(np.arange(len(names)), names, rotation=12, fontsize=8)
    ax.set(ylabel="preference accuracy", ylim=(0.4, 1.0),
           title="held-out pairs vs the hidden taste (95% CI over queries)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def votes_relevance_weight(votes_dir: str | Path) -> float:
    """The raters' relevance weight, from the votes' manifest (jobs.rater_votes)."""
    import json

    m = Path(votes_dir) / "manifest.json"
    if not m.is_file():
        raise FileNotFoundError(f"{m} does not exist: the votes must come from jobs.rater_votes")
    cfg = json.loads(m.read_text()).get("config") or {}
    return float((cfg.get("raters") or {}).get("relevance_weight", 1.0))


def evaluate_reward_checkpoint(checkpoint: str | Path, world_dir: str | Path,
                               votes_dir: str | Path, base: Any, rephrased: str = "",
                               out_dir: str | Path | None = None) -> dict[str, Any]:
    """:func:`evaluate_reward` for a reward checkpoint against ``base`` (a ``ModelSpec``);
    writes ``reward_eval.md`` and ``reward_eval.png`` into ``out_dir`` when given.

    The contrast teacher's good side is the rephrased table (``rephrased``: jobs.rephrase
    output) where given, else the template rephraser's; its bad side the builder's default.
    """
    from aligner.data.corpus import read_corpus
    from aligner.data.images import decode_rgb
    from aligner.data.queries import read_rephrasings
    from aligner.preferences.teacher import template_rephraser
    from aligner.rephrase.template import TemplateRephraser
    from aligner.retrieval.models import load_checkpoint, load_retriever, to_pixels
    from aligner.reward.model import RewardModel

    rm = RewardModel.load(checkpoint, device="cpu")
    ref = load_checkpoint(base.checkpoint, device="cpu") if base.checkpoint else \
        load_retriever(base, device="cpu")
    corpus = Path(world_dir) / "corpus"
    cache: dict[str, bytes] = {}

    def blobs(ids: list[str]) -> list[bytes]:
        need = sorted(set(ids) - set(cache))
        if need:
            t = read_corpus(corpus, ["id", "image"], ids=need)
            cache.update(zip(t["id"].to_pylist(), t["image"].to_pylist(), strict=True))
        missing = [i for i in ids if i not in cache]
        if missing:
            raise ValueError(f"{len(missing)} test-pair images are not in {corpus}")
        return [cache[i] for i in ids]

    def encode_images(model: Any, ids: list[str]) -> np.ndarray:
        pix = np.stack([decode_rgb(b, model.image_size) for b in blobs(ids)])
        pre = model.preprocess_cfg
        return model.encode_images(to_pixels(pix, pre["mean"], pre["std"]))

    def reward_score(queries: list[str], ids: list[str]) -> np.ndarray:
        uq = sorted(set(queries))
        pos = {q: k for k, q in enumerate(uq)}
        uid = sorted(set(ids))
        ipos = {i: k for k, i in enumerate(uid)}
        txt = rm.encode_texts(uq)[[pos[q] for q in queries]]
        img = encode_images(rm.retriever, uid)[[ipos[i] for i in ids]]
        return rm.rewards_from_features(txt, img)

    def good(qids: Sequence[str], texts: Sequence[str]) -> list[str]:
        if rephrased:
            table, _ = read_rephrasings(rephrased, qids, texts)
            return [table.get(q, t) for q, t in zip(qids, texts, strict=True)]
        return TemplateRephraser(style="reorg", polarity="good").rephrase_batch(list(texts))

    result = evaluate_reward(
        world_dir, votes_dir, reward_score, ref.encode_texts,
        lambda ids: encode_images(ref, ids),
        lambda ids: [decode_rgb(b) for b in blobs(ids)],
        votes_relevance_weight(votes_dir), good, template_rephraser())
    result["reward_model"] = str(checkpoint)
    result["base"] = ref.describe()
    result["contrast_good_side"] = "rephrased table" if rephrased else "template (reorg, good)"
    if out_dir is not None:
        out = Path(out_dir)
        (out / "reward_eval.md").write_text(markdown_table(result) + "\n")
        plot_accuracy(result, out / "reward_eval.png")
    return result
