"""Build the retrieval systems over a gallery: the base, any checkpoint, and the query-time
baselines (cascade, query shift, rephrase, the training teacher as a re-ranker).

Everything here takes explicit arguments (a gallery, checkpoint directories, embeddings
directories, :class:`~aligner.evaluation.config.BaselineSettings`, a rephrasing table), so a
search service can build exactly the systems the evaluation measures::

    gallery = load_gallery(world="out/world")
    built = build_systems(gallery, "out/base/checkpoint",
                          models={"aligned": "out/aligned/checkpoint"},
                          embeddings={"aligned": "out/embeddings_aligned"},
                          base_embeddings="out/embeddings")
    scores, idx = built.systems["cascade"].search(["two red circles"], 10)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aligner.evaluation.config import BASELINES, BaselineSettings
from aligner.evaluation.gallery import Gallery, embed_gallery, read_gallery_embeddings
from aligner.evaluation.systems import (
    CachedEncoder,
    CascadeSystem,
    EncoderSystem,
    QueryShiftSystem,
    RephraseSystem,
    System,
    TeacherRerankSystem,
)
from aligner.evaluation.teacher_spec import TeacherSpec

log = logging.getLogger(__name__)


@dataclass
class Rephrasings:
    """Query-time rephrasings: ``query_id -> rephrased`` with where they came from.

    Attributes:
        table: the rephrasing of each query id.
        source: the table's path (shown in metrics).
        counts: rows, used, missing, duplicates, query_text_mismatch
            (:func:`aligner.data.queries.read_rephrasings`).
    """

    table: dict[str, str]
    source: str = ""
    counts: dict[str, Any] = field(default_factory=dict)


def load_rephrasings(path: str | Path, query_ids: Sequence[str],
                     texts: Sequence[str]) -> Rephrasings:
    """The rephrasings of the given queries from a rephrase output (dir or file)."""
    from aligner.data.queries import read_rephrasings

    table, counts = read_rephrasings(path, query_ids, texts)
    return Rephrasings(table, str(path), counts)


@dataclass
class ModelSystem:
    """A checkpoint as a system: the system, its cached text encoder, the scorer's scores
    from its embeddings output (or None) and what was loaded (checkpoint, hash, timings)."""

    system: EncoderSystem
    encoder: CachedEncoder
    aesthetic: np.ndarray | None
    info: dict[str, Any]


def text_tower_hash(model: Any) -> str:
    """A hash of every weight that shapes a text embedding (all but the image tower and the
    logit scale): two checkpoints with the same hash encode every text identically."""
    import hashlib

    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        if key.startswith("visual.") or key == "logit_scale":
            continue
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_model_system(name: str, checkpoint: str | Path, gallery: Gallery,
                      embeddings: str | Path = "", scorer: str = "lowlevel",
                      batch_size: int = 256,
                      text_encoders: dict[str, CachedEncoder] | None = None) -> ModelSystem:
    """An :class:`EncoderSystem` for a checkpoint over ``gallery``.

    Args:
        name: the system's name.
        checkpoint: a checkpoint directory (pretrain / align output).
        gallery: the images it searches.
        embeddings: a ``jobs.embed`` output of this checkpoint over the gallery ("": embed
            in-process; one that does not match is refused with a warning).
        scorer: the scorer whose ``aesthetic`` column of ``embeddings`` may be reused.
        batch_size: encoder batch size.
        text_encoders: cached text encoders by :func:`text_tower_hash`, shared between
            checkpoints whose text towers are the same (a fine-tune of the image tower
            only): each text is encoded once for all of them (filled in here).
    """
    from aligner.retrieval.models import load_checkpoint

    t0 = time.time()
    r = load_checkpoint(checkpoint, device="cpu")
    info: dict[str, Any] = {"checkpoint": str(checkpoint), "checkpoint_hash": r.checkpoint_hash,
                            "load_s": round(time.time() - t0, 2)}
    emb = aes = None
    if embeddings:
        emb, aes, why = read_gallery_embeddings(embeddings, gallery.ids, r.checkpoint_hash,
                                                scorer)
        if emb is None:
            log.warning("%s: not using embeddings %s (%s); embedding in-process", name,
                        embeddings, why)
        else:
            info["embeddings"] = str(embeddings)
    if emb is None:
        t1 = time.time()
        emb = embed_gallery(r, gallery, batch_size)
        info["embed_s"] = round(time.time() - t1, 2)
        log.info("%s: embedded %d images in %.1f s", name, len(emb), info["embed_s"])
    key = text_tower_hash(r.model)
    info["text_tower"] = key
    enc = (text_encoders or {}).get(key)
    if enc is None:
        enc = CachedEncoder(lambda texts: r.encode_texts(texts, batch_size))
        if text_encoders is not None:
            text_encoders[key] = enc
    else:
        log.info("%s: the same text tower as an earlier system: its text encodings are shared",
                 name)
    system = EncoderSystem(name, enc, emb, {"checkpoint": str(checkpoint)})
    return ModelSystem(system, enc, aes, info)


def scorer_scores(scorer: str, gallery: Gallery, base_embeddings: np.ndarray) -> np.ndarray:
    """The aesthetic scorer's score of every gallery image (from the base's embeddings for an
    embedding scorer, else from the decoded images)."""
    from aligner.aesthetics.scorer import make_scorer

    s = make_scorer(scorer)
    t0 = time.time()
    if s.needs == "embedding":
        aes = np.asarray(s.score(base_embeddings), np.float64)
    else:
        ims = gallery.decoded()
        aes = np.concatenate([np.asarray(s.score(ims[i:i + 1024]), np.float64)
                              for i in range(0, len(ims), 1024)]) if ims else np.zeros(0)
    log.info("scored %d gallery images with %s in %.1f s", len(aes), scorer, time.time() - t0)
    return aes


def cascade_system(base: System, aesthetic: np.ndarray, settings: BaselineSettings,
                   name: str = "cascade", weight: float | None = None) -> CascadeSystem:
    """The base's top ``cascade_n`` re-ranked by the scorer (``weight`` overrides the
    settings' ``cascade_weight``)."""
    w = settings.cascade_weight if weight is None else weight
    return CascadeSystem(name, base, aesthetic, settings.cascade_n, w)


def query_shift_system(base: System, aesthetic: np.ndarray, settings: BaselineSettings,
                       name: str = "query_shift", weight: float | None = None,
                       direction_from: np.ndarray | None = None) -> QueryShiftSystem:
    """clip-retrieval's query shift over the base (``weight`` overrides ``shift_weight``;
    ``direction_from``: the gallery images its direction is computed from, default all)."""
    w = settings.shift_weight if weight is None else weight
    return QueryShiftSystem(name, base, aesthetic, settings.shift_quantile, w, direction_from)


def direction_images(gallery: Gallery) -> np.ndarray | None:
    """The images a query shift's direction is computed from: the gallery's non-test images
    when it has test and other images (no test image shapes a choice), else all (None)."""
    if gallery.split is None or not gallery.has_split("test"):
        return None
    rest = np.flatnonzero(gallery.split != "test")
    return rest if len(rest) else None


def rephrase_system(base: System, table: Mapping[str, str], settings: BaselineSettings,
                    name: str = "rephrase", mix: float = 1.0) -> RephraseSystem:
    """The base searching with each query's rephrasing (looked up by query id)."""
    return RephraseSystem(name, base, dict(table), settings.rephrase_missing, mix=mix)


def teacher_rerank_system(base: System, aesthetic: np.ndarray, table: Mapping[str, str],
                          teacher: TeacherSpec, settings: BaselineSettings,
                          name: str = "teacher_rerank",
                          weight: float | None = None,
                          gallery: Gallery | None = None) -> TeacherRerankSystem:
    """The base's top ``cascade_n`` re-ranked by the training teacher's score at query time
    (``weight`` overrides the settings' ``teacher_weight``)."""
    w = settings.teacher_weight if weight is None else weight
    reward = reward_gallery = None
    if "reward" in teacher.aesthetic:
        reward, reward_gallery = reward_teacher(teacher.reward_model, gallery)
    return TeacherRerankSystem(name, base, aesthetic, dict(table), teacher.aesthetic,
                               teacher.weights, teacher.bad_rephrase(), settings.cascade_n, w,
                               settings.rephrase_missing, reward, reward_gallery)


def reward_teacher(checkpoint: str, gallery: Gallery | None) -> tuple[Any, np.ndarray]:
    """A reward model and its embeddings of the gallery images (for a ``reward`` component).

    Raises:
        ValueError: no gallery images to embed.
    """
    from aligner.data.images import decode_rgb
    from aligner.reward.model import RewardModel

    if gallery is None:
        raise ValueError("a reward teacher at query time needs the gallery's images")
    t0 = time.time()
    rm = RewardModel.load(checkpoint, device="cpu")
    size = rm.retriever.image_size
    pix = np.stack([decode_rgb(b, size) for b in gallery.images])
    emb = rm.encode_pixels(pix)
    log.info("reward teacher %s: embedded %d gallery images in %.1f s", rm.name, len(emb),
             time.time() - t0)
    return rm, emb


@dataclass
class BuiltSystems:
    """What :func:`build_systems` returns.

    Attributes:
        systems: name -> system, in order: base, baselines, models.
        encoders: the models' cached text encoders (base first).
        aesthetic: ``[N]`` the scorer's score of every gallery image.
        info: per model (and ``rephrase``): checkpoint, hash, embeddings, timings, counts.
        notes: systems skipped and why.
        base_name: the base system's name.
    """

    systems: dict[str, System]
    encoders: list[CachedEncoder]
    aesthetic: np.ndarray
    info: dict[str, dict[str, Any]]
    notes: list[str]
    base_name: str = "base"

    @property
    def base(self) -> System:
        return self.systems[self.base_name]


def build_systems(gallery: Gallery, base_checkpoint: str | Path,
                  models: Mapping[str, str | Path] | None = None,
                  embeddings: Mapping[str, str | Path] | None = None,
                  settings: BaselineSettings | None = None,
                  baselines: Sequence[str] = BASELINES,
                  rephrasings: Rephrasings | None = None, base_name: str = "base",
                  base_embeddings: str | Path = "", batch_size: int = 256,
                  teacher: TeacherSpec | None = None,
                  teacher_rephrasings: Rephrasings | None = None) -> BuiltSystems:
    """The base, the query-time baselines over it and the trained models, over one gallery.

    Args:
        gallery: the images every system searches.
        base_checkpoint: the base retriever (the baselines' first stage).
        models: further systems, ``{name: checkpoint dir}`` (aligned, control ...).
        embeddings: ``{name: jobs.embed output}`` of the base or a model over the gallery
            (others are embedded in-process).
        settings: the baselines' knobs and the scorer (default :class:`BaselineSettings`).
        baselines: which of ``cascade``, ``query_shift``, ``rephrase``, ``teacher_rerank`` to
            build.
        rephrasings: the rephrase system's table (None: the rephrase system is skipped, with
            a note).
        base_name: the base system's name.
        base_embeddings: the base's embeddings output (wins over ``embeddings[base_name]``);
            its ``aesthetic`` column gives the scorer's scores when the scorer matches.
        batch_size: encoder batch size.
        teacher: the training teacher (:mod:`aligner.evaluation.teacher_spec`; None:
            ``teacher_rerank`` is skipped, with a note).
        teacher_rephrasings: the teacher's rephrasings (default ``rephrasings``; neither: the
            teacher's good side is the query itself, with a note).

    Raises:
        ValueError: an unknown baseline, or a model named like the base or a baseline.
        FileNotFoundError: a missing checkpoint.
    """
    settings = settings or BaselineSettings()
    models = dict(models or {})
    emb_dirs = dict(embeddings or {})
    bad = set(baselines) - set(BASELINES)
    if bad:
        raise ValueError(f"unknown baselines {sorted(bad)}; known: {list(BASELINES)}")
    clash = ({base_name, *baselines}) & set(models)
    if clash:
        raise ValueError(f"models may not be named {sorted(clash)} (base / baseline names)")
    base_emb_dir = base_embeddings or emb_dirs.get(base_name, "")
    text_encoders: dict[str, CachedEncoder] = {}
    b = load_model_system(base_name, base_checkpoint, gallery, base_emb_dir, settings.scorer,
                          batch_size, text_encoders)
    base, aes = b.system, b.aesthetic
    info = {base_name: b.info}
    if aes is None or not np.isfinite(aes).any():
        aes = scorer_scores(settings.scorer, gallery, base.gallery)
    systems: dict[str, System] = {base_name: base}
    encoders, notes = [b.encoder], []
    if "cascade" in baselines:
        systems["cascade"] = cascade_system(base, aes, settings)
    if "query_shift" in baselines:
        systems["query_shift"] = query_shift_system(base, aes, settings,
                                                    direction_from=direction_images(gallery))
    if "rephrase" in baselines:
        if rephrasings is not None:
            systems["rephrase"] = rephrase_system(base, rephrasings.table, settings)
            info["rephrase"] = {"table": rephrasings.source, **rephrasings.counts}
        else:
            notes.append("rephrase system skipped: no rephrased queries given (rephrased=DIR)")
    if "teacher_rerank" in baselines:
        if teacher is None:
            notes.append("teacher_rerank skipped: the training teacher is unknown "
                         "(baseline.teacher_preferences=DIR or baseline.teacher_aesthetic)")
        else:
            treph = teacher_rephrasings or rephrasings
            systems["teacher_rerank"] = teacher_rerank_system(
                base, aes, treph.table if treph is not None else {}, teacher, settings,
                gallery=gallery)
            info["teacher_rerank"] = {**teacher.describe(),
                                      "rephrasings": treph.source if treph else None,
                                      "scorer": settings.scorer}
            if treph is None and teacher.needs_rephrase:
                notes.append(f"teacher_rerank: no rephrasings (rephrased=DIR): the teacher "
                             f"{teacher.name} uses each query as its own rephrasing")
    for name, ckpt in models.items():
        m = load_model_system(name, ckpt, gallery, emb_dirs.get(name, ""), settings.scorer,
                              batch_size, text_encoders)
        systems[name] = m.system
        if all(m.encoder is not e for e in encoders):
            encoders.append(m.encoder)
        info[name] = m.info
    return BuiltSystems(systems, encoders, aes, info, notes, base_name)
