"""A fast reward model: ImageReward's head on FROZEN backbone embeddings (LAION-aesthetic style).

:mod:`aligner.training.reward` fine-tunes the top of the backbone on Ray Train (minutes). This
module fits only :class:`~aligner.reward.model.RewardHead` on embeddings computed once, in
process, in seconds, which is what a learning-curve or active-learning experiment needs (tens
of reward models):

* :func:`load_features` embeds the voted corpus images (decoded exactly as
  :class:`~aligner.reward.teacher.PoolRewards` decodes them) and the query texts with the base
  checkpoint, frozen, and caches both on disk (keyed by the checkpoint's weights and the
  corpus files), so a second fit reads them back;
* :func:`train_heads` minimises the Bradley-Terry loss
  :func:`~aligner.reward.model.bradley_terry_loss` over ``joint_features(image, text)``,
  weighted by the pairs' ``weight`` (``settings.weighted``), with AdamW, warm-up then cosine,
  seeded; with ``settings.ensemble = n`` it fits ``n`` heads, the first on every pair and the
  others on bootstrap resamples, whose disagreement is an uncertainty estimate
  (:class:`HeadEnsemble`, :mod:`aligner.feedback.active`);
* :func:`fit_reward_head` does both from a preferences table and writes a standard reward
  checkpoint: a copy of the base checkpoint (the backbone, unchanged) plus
  ``reward_head.safetensors`` (the first head) and ``reward.json`` with the score
  normalisation, which :meth:`RewardModel.load` and :class:`PoolRewards` load unchanged; the
  ensemble's other heads go to ``head_ensemble.safetensors`` (:func:`load_ensemble`).

Because the backbone is frozen, the scores of a loaded checkpoint equal the fit's own (the
same decode, the same encoders).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from aligner.reward.model import (
    ACTIVATIONS,
    HEAD_FILE,
    REWARD_FILE,
    HeadSpec,
    Normalisation,
    PairIndex,
    RewardHead,
    bradley_terry_loss,
    joint_features,
    save_reward_parts,
)

log = logging.getLogger(__name__)
ENSEMBLE_FILE = "head_ensemble.safetensors"
FIT_KIND = "head_fit (frozen backbone)"


@dataclass
class HeadFitSettings:
    """How the head is fitted (defaults chosen on a dev world, docs/votes_used_well.md)."""

    steps: int = 100
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 20
    min_lr_ratio: float = 0.0
    activation: str = "none"
    weighted: bool = True
    ensemble: int = 1
    val_fraction: float = 0.1
    seed: int = 0
    max_norm_items: int = 4096

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("lr must be > 0; weight_decay and warmup >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {self.ensemble}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_norm_items < 2:
            raise ValueError("max_norm_items must be >= 2")


# --------------------------------------------------------------------------- features

@dataclass
class FrozenFeatures:
    """Normalised frozen-backbone embeddings: images by corpus id, queries by text.

    Attributes:
        image_ids, image_emb: ``[N]`` ids and their ``[N, D]`` embeddings.
        texts, text_emb: ``[Q]`` query texts and their ``[Q, D]`` embeddings.
        checkpoint_hash: the backbone's weights hash (what the embeddings belong to).
    """

    image_ids: list[str]
    image_emb: np.ndarray
    texts: list[str]
    text_emb: np.ndarray
    checkpoint_hash: str = ""

    def __post_init__(self) -> None:
        self._img_pos = {i: k for k, i in enumerate(self.image_ids)}
        self._txt_pos = {t: k for k, t in enumerate(self.texts)}

    @property
    def dim(self) -> int:
        return int(self.image_emb.shape[1])

    def image_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of ``ids`` in ``image_emb`` (KeyError naming a missing id)."""
        try:
            return np.fromiter((self._img_pos[i] for i in ids), np.int64, len(ids))
        except KeyError as e:
            raise KeyError(f"image {e.args[0]!r} has no embedding (not loaded)") from None

    def text_rows(self, texts: Sequence[str]) -> np.ndarray:
        """Rows of ``texts`` in ``text_emb`` (KeyError naming a missing text)."""
        try:
            return np.fromiter((self._txt_pos[t] for t in texts), np.int64, len(texts))
        except KeyError as e:
            raise KeyError(f"query {e.args[0]!r} has no embedding (not loaded)") from None


def _corpus_fingerprint(corpus: str | Path) -> str:
    """Identity of a local corpus' files (names, sizes, mtimes); the path for a URI."""
    from aligner.data.io import is_uri, parquet_files

    if is_uri(corpus):
        return f"uri:{corpus}"
    h = hashlib.sha256()
    for f in parquet_files(corpus, "corpus"):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:24]


def _read_cache(path: Path) -> tuple[list[str], np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return [str(x) for x in z["keys"]], np.asarray(z["emb"], np.float32)
    except (OSError, ValueError, KeyError):
        log.warning("head_fit: unreadable embedding cache %s, recomputing", path)
        return None


def _write_cache(path: Path, keys: list[str], emb: np.ndarray) -> None:
    from aligner.data.io import atomic_write

    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, keys=np.asarray(keys, dtype=str), emb=emb.astype(np.float32))


def _cached(path: Path | None, want: Sequence[str], compute) -> dict[str, np.ndarray]:
    """``{key: embedding}`` for ``want``, reading ``path`` and adding what it lacks."""
    have: dict[str, np.ndarray] = {}
    got = _read_cache(path) if path is not None else None
    if got is not None:
        have = dict(zip(got[0], got[1], strict=True))
    need = sorted(set(want) - set(have))
    if need:
        emb = compute(need)
        have.update(zip(need, emb, strict=True))
        if path is not None:
            keys = sorted(have)
            _write_cache(path, keys, np.stack([have[k] for k in keys]))
    return {k: have[k] for k in want}


def load_features(corpus: str | Path, base_checkpoint: str | Path,
                  image_ids: Sequence[str] | None = None, texts: Sequence[str] = (),
                  cache: bool = True, cache_root: str | Path | None = None,
                  retriever: Any = None) -> FrozenFeatures:
    """Frozen embeddings of corpus images and query texts under ``base_checkpoint``, cached.

    Args:
        corpus: the corpus the image ids come from.
        base_checkpoint: the backbone (a retriever or reward checkpoint directory).
        image_ids: the images to embed (None: every image of the corpus).
        texts: the query texts to embed.
        cache: read and extend the on-disk cache (``$ALIGNER_CACHE/head_fit/``); a second
            call with the same checkpoint and corpus files embeds only what is new.
        retriever: the loaded backbone, when the caller has it (else loaded on CPU).

    Raises:
        ValueError: image ids that are not in the corpus, or a corpus without images.
    """
    from aligner.data.corpus import corpus_columns, read_corpus
    from aligner.data.images import decode_rgb
    from aligner.retrieval.models import load_checkpoint, to_pixels
    from aligner.retrieval.textcache import cache_dir

    t0 = time.time()
    r = retriever if retriever is not None else load_checkpoint(base_checkpoint, device="cpu")
    ck = r.checkpoint_hash or hashlib.sha256(str(base_checkpoint).encode()).hexdigest()[:16]
    if "image" not in corpus_columns(corpus):
        raise ValueError(f"corpus {corpus} has no image column")
    if image_ids is None:
        image_ids = read_corpus(corpus, ["id"])["id"].to_pylist()
    ids = list(dict.fromkeys(image_ids))
    root = Path(cache_root) if cache_root else cache_dir() / "head_fit"
    img_path = root / f"img-{ck}-{_corpus_fingerprint(corpus)}.npz" if cache else None
    txt_path = root / f"txt-{ck}.npz" if cache else None
    pre = r.preprocess_cfg
    counts = {"images": 0, "texts": 0}

    def embed_images(need: list[str]) -> np.ndarray:
        t = read_corpus(corpus, ["id", "image"], ids=need)
        blobs = dict(zip(t["id"].to_pylist(), t["image"].to_pylist(), strict=True))
        missing = [i for i in need if i not in blobs]
        if missing:
            raise ValueError(f"{len(missing)} images are not in the corpus {corpus}, e.g. "
                             f"{missing[:3]}")
        out = []
        for lo in range(0, len(need), 512):
            pix = np.stack([decode_rgb(blobs[i], r.image_size) for i in need[lo:lo + 512]])
            out.append(r.encode_images(to_pixels(pix, pre.get("mean"), pre.get("std"))))
        counts["images"] = len(need)
        return np.concatenate(out)

    def embed_texts(need: list[str]) -> np.ndarray:
        counts["texts"] = len(need)
        return r.encode_texts(need)

    img = _cached(img_path, ids, embed_images) if ids else {}
    txts = list(dict.fromkeys(texts))
    txt = _cached(txt_path, txts, embed_texts) if txts else {}
    d = r.embed_dim
    feats = FrozenFeatures(
        ids, np.stack([img[i] for i in ids]) if ids else np.zeros((0, d), np.float32),
        txts, np.stack([txt[t] for t in txts]) if txts else np.zeros((0, d), np.float32), ck)
    log.info("head_fit features: %d images (%d embedded now), %d texts (%d now) in %.1f s",
             len(ids), counts["images"], len(txts), counts["texts"], time.time() - t0)
    return feats


# --------------------------------------------------------------------------- training

def _lr_at(step: int, s: HeadFitSettings) -> float:
    if s.warmup and step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(1, s.steps - s.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - s.warmup) / span)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cos)


def _train_one(txt: torch.Tensor, img: torch.Tensor, p: PairIndex, s: HeadFitSettings,
               spec: HeadSpec, seed: Sequence[int]) -> RewardHead:
    torch.manual_seed(int(np.random.default_rng(list(seed)).integers(2 ** 31)))
    head = RewardHead(spec)
    decay = [q for n, q in head.named_parameters() if q.ndim >= 2]
    other = [q for n, q in head.named_parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=s.lr)
    rng = np.random.default_rng([*seed, 31])
    q = torch.from_numpy(p.query)
    c = torch.from_numpy(p.chosen)
    r = torch.from_numpy(p.rejected)
    w = torch.from_numpy(p.weight.astype(np.float32)) if s.weighted else None
    n = len(p)
    full = n <= s.batch_size
    head.train()
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, s)
        sel = slice(None) if full else torch.from_numpy(rng.choice(n, s.batch_size,
                                                                   replace=False))
        qs = txt[q[sel]]
        rw = head(joint_features(img[c[sel]], qs))
        rl = head(joint_features(img[r[sel]], qs))
        loss = bradley_terry_loss(rw, rl, None if w is None else w[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


@dataclass
class HeadEnsemble:
    """Fitted heads on frozen features: ``heads[0]`` (every pair) is the reward model, the
    others (bootstrap resamples) give the spread. Each head has its own normalisation."""

    heads: list[RewardHead]
    norms: list[Normalisation]
    spec: HeadSpec

    def raw(self, text_emb: np.ndarray, image_emb: np.ndarray) -> np.ndarray:
        """Raw rewards of row-aligned embeddings, one row per head: ``[H, N]``."""
        t = torch.as_tensor(np.asarray(text_emb, np.float32))
        i = torch.as_tensor(np.asarray(image_emb, np.float32))
        out = []
        with torch.no_grad():
            j = joint_features(i, t)
            for h in self.heads:
                out.append(h(j).float().numpy())
        return np.stack(out).astype(np.float64) if out else np.zeros((0, len(t)))

    def rewards(self, text_emb: np.ndarray, image_emb: np.ndarray) -> np.ndarray:
        """Normalised rewards ``[H, N]`` (each head by its own normalisation)."""
        raw = self.raw(text_emb, image_emb)
        m = np.array([[n.mean] for n in self.norms])
        sd = np.array([[n.std] for n in self.norms])
        return (raw - m) / sd

    def pair_logits(self, feats: FrozenFeatures, queries: Sequence[str],
                    a_ids: Sequence[str], b_ids: Sequence[str],
                    batch: int = 8192) -> np.ndarray:
        """``r_a - r_b`` in raw (Bradley-Terry logit) units per head: ``[H, N]``;
        ``sigmoid`` of it is each head's P(a preferred)."""
        tq = feats.text_rows(queries)
        ia, ib = feats.image_rows(a_ids), feats.image_rows(b_ids)
        if not len(tq):
            return np.zeros((len(self.heads), 0))
        # each (query, image) once: candidates share their images
        items, inv = np.unique(np.stack([np.concatenate([tq, tq]), np.concatenate([ia, ib])], 1),
                               axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        raw = np.concatenate([self.raw(feats.text_emb[items[lo:lo + batch, 0]],
                                       feats.image_emb[items[lo:lo + batch, 1]])
                              for lo in range(0, len(items), batch)], 1)
        n = len(tq)
        return raw[:, inv[:n]] - raw[:, inv[n:]]


def train_heads(feats: FrozenFeatures, pairs: PairIndex, settings: HeadFitSettings,
                norm_items: np.ndarray | None = None) -> HeadEnsemble:
    """Fit ``settings.ensemble`` heads on ``pairs`` (no I/O; seeded).

    Args:
        norm_items: ``[M, 2]`` (text row, image row) whose raw rewards set each head's
            normalisation (default: the pairs' unique items, at most ``max_norm_items``).
    """
    if len(pairs) == 0:
        raise ValueError("no pairs to fit a reward head on")
    if settings.weighted and float(np.sum(pairs.weight)) <= 0:
        raise ValueError("every pair has weight 0")
    s = settings
    spec = HeadSpec(3 * feats.dim, activation=s.activation)
    txt = torch.from_numpy(np.ascontiguousarray(feats.text_emb, np.float32))
    img = torch.from_numpy(np.ascontiguousarray(feats.image_emb, np.float32))
    if norm_items is None:
        norm_items = np.unique(np.concatenate([np.stack([pairs.query, pairs.chosen], 1),
                                               np.stack([pairs.query, pairs.rejected], 1)]), axis=0)
        if len(norm_items) > s.max_norm_items:
            rng = np.random.default_rng([s.seed, 23])
            norm_items = norm_items[np.sort(rng.choice(len(norm_items), s.max_norm_items,
                                                       replace=False))]
    heads, norms = [], []
    boot = np.random.default_rng([s.seed, 37])
    for k in range(s.ensemble):
        sub = pairs if k == 0 else pairs.subset(boot.integers(0, len(pairs), len(pairs)))
        h = _train_one(txt, img, sub, s, spec, (s.seed, k))
        with torch.no_grad():
            raw = h(joint_features(img[torch.from_numpy(norm_items[:, 1])],
                                   txt[torch.from_numpy(norm_items[:, 0])])).numpy()
        heads.append(h)
        norms.append(Normalisation.fit(raw))
    return HeadEnsemble(heads, norms, spec)


# --------------------------------------------------------------------------- from votes

def _val_queries(query_ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A seeded hash split of whole queries (their votes never train the head)."""
    if fraction <= 0:
        return set()
    out = set()
    for q in set(query_ids):
        h = int(hashlib.sha256(f"{seed}:{q}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if h < fraction:
            out.add(q)
    return out


def votes_index(votes: pa.Table, feats: FrozenFeatures) -> PairIndex:
    """A preferences table's pairs as rows of ``feats`` (weights null -> 1)."""
    w = votes.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    w = np.where(np.isnan(w), 1.0, w)
    return PairIndex(feats.text_rows(votes.column("query").to_pylist()),
                     feats.image_rows(votes.column("chosen_id").to_pylist()),
                     feats.image_rows(votes.column("rejected_id").to_pylist()),
                     w.astype(np.float32))


def pair_accuracy(ens: HeadEnsemble, feats: FrozenFeatures, p: PairIndex,
                  head: int = 0) -> float:
    """Share of pairs whose chosen image the head scores higher (ties 1/2)."""
    if not len(p):
        return float("nan")
    t = feats.text_emb[p.query]
    d = ens.raw(t, feats.image_emb[p.chosen])[head] - ens.raw(t, feats.image_emb[p.rejected])[head]
    return float(np.mean(np.where(d == 0, 0.5, d > 0)))


def write_checkpoint(ens: HeadEnsemble, base_checkpoint: str | Path, out: str | Path,
                     extra: dict[str, Any] | None = None) -> Path:
    """A reward checkpoint: the base checkpoint's files (backbone) + the first head and its
    normalisation; the other heads (if any) in ``head_ensemble.safetensors``."""
    from safetensors.torch import save_file

    from aligner.data.io import atomic_write

    base, dst = Path(base_checkpoint), Path(out)
    if dst.resolve() == base.resolve():
        raise ValueError("the output must differ from the base checkpoint")
    if dst.exists():
        if dst.is_dir() and any(dst.iterdir()) and not (dst / REWARD_FILE).is_file():
            raise ValueError(f"{dst} exists and is not a reward checkpoint: not replacing it")
        if dst.is_dir():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns(
        HEAD_FILE, REWARD_FILE, ENSEMBLE_FILE, "train_state.pt"))
    record = {"fit": FIT_KIND, "ensemble": len(ens.heads),
              "ensemble_normalisation": [asdict(n) for n in ens.norms], **(extra or {})}
    save_reward_parts(dst, ens.heads[0], ens.spec, ens.norms[0], record)
    if len(ens.heads) > 1:
        state = {f"{k}.{n}": v.detach().cpu().contiguous()
                 for k, h in enumerate(ens.heads) for n, v in h.state_dict().items()}
        with atomic_write(dst / ENSEMBLE_FILE) as tmp:
            save_file(state, str(tmp))
    return dst


def load_ensemble(checkpoint: str | Path) -> HeadEnsemble:
    """The heads of a :func:`fit_reward_head` checkpoint (one head when it saved no ensemble;
    any reward checkpoint's head works, e.g. one from ``jobs.train_reward``, but its backbone
    must be the one the features come from)."""
    from safetensors.torch import load_file

    d = Path(checkpoint)
    record = json.loads((d / REWARD_FILE).read_text())
    h = record["head"]
    spec = HeadSpec(int(h["in_dim"]), tuple(h["hidden"]), h.get("activation", "none"))
    n = int(record.get("ensemble", 1))
    norms = [Normalisation(**x) for x in record.get("ensemble_normalisation",
                                                    [record["normalisation"]])]
    heads = []
    if n > 1 and (d / ENSEMBLE_FILE).is_file():
        state = load_file(str(d / ENSEMBLE_FILE))
        for k in range(n):
            head = RewardHead(spec)
            head.load_state_dict({key.split(".", 1)[1]: v for key, v in state.items()
                                  if key.split(".", 1)[0] == str(k)})
            heads.append(head.eval())
    else:
        head = RewardHead(spec)
        head.load_state_dict(load_file(str(d / HEAD_FILE)))
        heads, norms = [head.eval()], norms[:1]
    return HeadEnsemble(heads, norms, spec)


def fit_reward_head(votes: pa.Table, corpus: str | Path, base_checkpoint: str | Path,
                    out: str | Path, settings: HeadFitSettings | None = None,
                    features: FrozenFeatures | None = None) -> dict[str, Any]:
    """Fit the head on frozen embeddings from a preferences table; write a reward checkpoint.

    Args:
        votes: pairs in the preferences schema (:mod:`aligner.data.preferences`; ``query``,
            ``query_id``, ``chosen_id``, ``rejected_id``, ``weight``); pairs naming degraded
            copies (``id~kind``) are refused.
        corpus: the corpus the image ids come from.
        base_checkpoint: the frozen backbone; ``out`` gets a copy of it.
        out: the reward checkpoint directory to write (replaced if it exists).
        settings: :class:`HeadFitSettings`.
        features: embeddings already loaded (:func:`load_features`) holding every voted
            image and query; default: loaded (and cached) here.

    Returns:
        ``{"pairs", "train_pairs", "val_pairs", "steps", "train_acc", "val_acc", "seconds",
        "embed_seconds", "checkpoint", ...}``; accuracies are against the votes.
    """
    s = settings or HeadFitSettings()
    t0 = time.time()
    if votes.num_rows == 0:
        raise ValueError("no votes to fit a reward head on")
    for c in ("query_id", "query", "chosen_id", "rejected_id", "weight"):
        if c not in votes.column_names:
            raise ValueError(f"votes lack column {c!r} (the preferences schema)")
    ids = votes.column("chosen_id").to_pylist() + votes.column("rejected_id").to_pylist()
    bad = [i for i in ids if "~" in i]
    if bad:
        raise ValueError(f"{len(bad)} pair sides name degraded copies (e.g. {bad[0]!r}): fit a "
                         "reward model on votes about corpus images")
    if features is None:
        features = load_features(corpus, base_checkpoint, ids, votes.column("query").to_pylist())
    t_fit = time.time()
    val_q = _val_queries(votes.column("query_id").to_pylist(), s.val_fraction, s.seed)
    is_val = np.array([q in val_q for q in votes.column("query_id").to_pylist()], bool)
    allp = votes_index(votes, features)
    train, val = allp.subset(np.flatnonzero(~is_val)), allp.subset(np.flatnonzero(is_val))
    if not len(train):
        raise ValueError("every vote fell in the validation queries; lower val_fraction")
    ens = train_heads(features, train, s)
    fit_s = time.time() - t_fit
    stats: dict[str, Any] = {
        "pairs": int(votes.num_rows), "train_pairs": len(train), "val_pairs": len(val),
        "val_queries": len(val_q), "steps": s.steps, "ensemble": s.ensemble,
        "weighted": s.weighted, "train_acc": pair_accuracy(ens, features, train),
        "val_acc": pair_accuracy(ens, features, val) if len(val) else None,
        "fit_seconds": round(fit_s, 2), "embed_seconds": round(t_fit - t0, 2),
        "backbone": str(base_checkpoint), "backbone_hash": features.checkpoint_hash}
    write_checkpoint(ens, base_checkpoint, out,
                     {"settings": asdict(s), "stats": stats,
                      "sources": sorted(set(votes.column("source").to_pylist()))
                      if "source" in votes.column_names else []})
    stats["seconds"] = round(time.time() - t0, 2)
    stats["checkpoint"] = str(out)
    log.info("head_fit: %d pairs (%d train, %d val), %d steps x %d heads in %.1f s; train acc "
             "%.3f, val acc %s -> %s", stats["pairs"], len(train), len(val), s.steps, s.ensemble,
             fit_s, stats["train_acc"], stats["val_acc"], out)
    return stats
