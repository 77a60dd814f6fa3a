"""Votes -> reward model -> teacher preferences -> a retriever re-aligned from the base.

One home for the retraining half of the feedback loop, used by ``jobs.loop`` (every round) and
by offline jobs (a learning curve: the same path on growing vote tables)::

    from aligner.feedback.retrain import RetrainSettings, retrain
    out = retrain(["out/loop/rounds/r01/export", "out/loop/rounds/r02/export"],
                  world="out/world", base_ckpt="out/base/checkpoint",
                  embeddings="out/embeddings", rephrased="out/rephrased",
                  out="out/retrain", settings=RetrainSettings(teacher="mix"))
    out["aligned"]            # the re-aligned checkpoint

Three steps, each a function of its own and, in :func:`retrain`, a
:class:`~aligner.runtime.pipeline.Pipeline` stage skipped when its output is complete for the
same inputs (the votes' content is part of a stage's identity):

1. :func:`train_reward` - the votes are filtered to training material
   (:func:`filter_votes`: pairs naming a test-split image, a gallery image, an image the corpus
   does not hold or a degraded copy are dropped and counted), then a reward model is trained:
   ``reward_kind="finetune"`` is the Ray Train job (:func:`aligner.training.reward.
   run_train_reward`, ImageReward's recipe), ``"head"`` the reward head fitted on frozen base
   embeddings in process (:func:`aligner.reward.head_fit.fit_reward_head`, seconds). Both write
   the same reward-checkpoint layout.
2. :func:`build_teacher_preferences` - the preference builder with the reward model as the
   teacher (``teacher="reward"``), or mixed with the label-free components of the
   ``both+degraded`` preset (``teacher="mix"``: pixel scorer + antonym contrast + reward).
3. :func:`realign` - ranked DPO from the **base** checkpoint (never from the previous round's
   model: each round's model is the base aligned with everything learnt so far).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

REWARD_KINDS = ("finetune", "head")
TEACHERS = ("reward", "mix")
#: the label-free preset that ``teacher="mix"`` adds the reward to
LABEL_FREE_PRESET = "both+degraded"
VOTES_DIR = "votes"  # inside a reward output: the filtered votes it was trained on

VotesInput = pa.Table | str | Path | Sequence[str | Path]


@dataclass
class RetrainSettings:
    """How a reward model is trained on votes and the retriever re-aligned with it."""

    reward_kind: str = field(default="finetune", metadata={
        "help": "finetune: the Ray Train reward job (ImageReward's recipe) | head: a reward "
                "head fitted on frozen base embeddings (aligner.reward.head_fit, seconds)"})
    reward_steps: int = field(default=0, metadata={
        "help": "reward training steps (0: the trainer's default: finetune 400, head 300)"})
    reward_batch_size: int = field(default=0, metadata={
        "help": "vote pairs per reward step (0: the trainer's default: finetune 128, head 256)"})
    reward_lr: float = field(default=0.0, metadata={
        "help": "reward learning rate (0: the trainer's default)"})
    teacher: str = field(default="reward", metadata={
        "help": "reward: the reward model alone orders the grid | mix: the label-free teacher "
                f"({LABEL_FREE_PRESET}: scorer + contrast) plus the reward"})
    reward_weight: float = field(default=1.0, metadata={
        "help": "weight of the reward component (the label-free ones weigh 1 each in mix)"})
    degraded: bool = field(default=True, metadata={
        "help": "add degraded-copy pairs to the teacher's preferences"})
    align_steps: int = field(default=240, metadata={"help": "ranked-DPO fine-tuning steps"})
    align_lr: float = field(default=3e-4, metadata={"help": "fine-tuning peak learning rate"})
    beta: float = field(default=0.5, metadata={"help": "DPO beta"})
    pairs_per_step: int = field(default=64, metadata={"help": "preference pairs per step"})
    captions_per_step: int = field(default=128, metadata={"help": "caption pairs per step"})
    eval_every: int = field(default=60, metadata={"help": "alignment validation interval"})
    checkpoint_every: int = field(default=50, metadata={"help": "checkpoint interval (both)"})
    selection: str = field(default="wise", metadata={
        "help": "which aligned state is kept: wise | early_stopping | last "
                "(aligner.training.config.AlignLoopConfig.selection)"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (both trainers)"})
    threads_per_worker: int = field(default=0, metadata={
        "help": "CPUs (torch threads) per Ray Train worker (0: the cluster's CPUs / workers); "
                "beside a running Serve application leave room for its replicas"})
    image_splits: list[str] = field(default_factory=lambda: ["train", "val"], metadata={
        "help": "corpus splits a vote pair's images may come from (test-split and gallery "
                "images are always dropped)"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of voted queries (by a seeded hash) the reward model validates on"})
    seed: int = field(default=0, metadata={"help": "seed of every trainer and the builder"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster (default: local)"})

    def __post_init__(self) -> None:
        if self.reward_kind not in REWARD_KINDS:
            raise ValueError(f"reward_kind {self.reward_kind!r}: one of {list(REWARD_KINDS)}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher {self.teacher!r}: one of {list(TEACHERS)}")
        if self.reward_steps < 0 or self.reward_lr < 0:
            raise ValueError("reward_steps and reward_lr must be >= 0 (0: the default)")
        if self.reward_batch_size == 1 or self.reward_batch_size < 0:
            raise ValueError("reward_batch_size must be >= 2 (0: the trainer's default)")
        if self.num_workers < 1 or self.threads_per_worker < 0:
            raise ValueError("num_workers must be >= 1 and threads_per_worker >= 0")
        if self.reward_kind == "finetune" and (self.reward_batch_size or 128) % self.num_workers:
            raise ValueError(f"reward_batch_size ({self.reward_batch_size}) must be divisible "
                             f"by num_workers ({self.num_workers})")
        if min(self.align_steps, self.pairs_per_step, self.captions_per_step) < 1:
            raise ValueError("align_steps, pairs_per_step and captions_per_step must be >= 1")
        if self.reward_weight <= 0 or self.align_lr <= 0 or self.beta <= 0:
            raise ValueError("reward_weight, align_lr and beta must be > 0")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every and checkpoint_every must be >= 0")
        if self.selection not in ("wise", "early_stopping", "last"):
            raise ValueError(f"selection {self.selection!r}: wise | early_stopping | last")
        bad = [s for s in self.image_splits if s not in ("train", "val")]
        if bad or not self.image_splits:
            raise ValueError(f"image_splits {self.image_splits}: a non-empty subset of "
                             "[train, val] (test images are never trained on)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


# ----------------------------------------------------------------------------- votes

def read_votes(votes: VotesInput) -> pa.Table:
    """One preferences table from a table, a table's file or directory, or a list of them
    (concatenated in order; :func:`aligner.data.preferences.read_preferences` checks each)."""
    from aligner.data.preferences import conform, read_preferences

    if isinstance(votes, pa.Table):
        return conform(votes)
    paths = [votes] if isinstance(votes, (str, Path)) else list(votes)
    if not paths:
        raise ValueError("no votes given")
    return pa.concat_tables([conform(read_preferences(p)) for p in paths])


def votes_fingerprint(table: pa.Table) -> str:
    """A hash of the pairs a table holds (query, chosen, rejected, weight, source, in order):
    what makes a stage trained on it redo when the votes change."""
    h = hashlib.sha256()
    cols = [table.column(c).to_pylist() for c in ("query_id", "chosen_id", "rejected_id",
                                                   "weight", "source")]
    for row in zip(*cols, strict=True):
        h.update(json.dumps(row, default=str).encode())
    return h.hexdigest()


def image_splits(world: str | Path) -> tuple[dict[str, str] | None, set[str]]:
    """``(id -> split or None when the corpus has no split column, gallery ids)``."""
    from aligner.data.corpus import corpus_columns, read_corpus
    from aligner.world.generate import World

    w = World(world)
    galleries = w.gallery_ids()
    if "split" not in corpus_columns(w.corpus_dir):
        ids = read_corpus(w.corpus_dir, ["id"])["id"].to_pylist()
        return {i: None for i in ids}, galleries  # type: ignore[misc]
    t = read_corpus(w.corpus_dir, ["id", "split"])
    return dict(zip(t["id"].to_pylist(), t["split"].to_pylist(), strict=True)), galleries


DROP_REASONS = ("degraded", "unknown", "gallery", "test", "split")


def filter_votes(table: pa.Table, split_of: dict[str, str | None], galleries: set[str],
                 keep_splits: Sequence[str] = ("train", "val")
                 ) -> tuple[pa.Table, dict[str, Any]]:
    """Keep the pairs a model may train on; return them and the counts.

    A pair is dropped (the first reason that applies is counted) when one of its images is a
    degraded copy (``degraded``), is not in the corpus (``unknown``), was rendered for the
    val / test galleries (``gallery``), is in the test split (``test``) or in a split outside
    ``keep_splits`` (``split``). A corpus without a split column holds nothing out by split.
    """
    keep = set(keep_splits)
    chosen = table.column("chosen_id").to_pylist()
    rejected = table.column("rejected_id").to_pylist()
    dropped = dict.fromkeys(DROP_REASONS, 0)
    mask = []
    for a, b in zip(chosen, rejected, strict=True):
        reason = None
        for i in (a, b):
            if "~" in i:
                r = "degraded"
            elif i not in split_of:
                r = "unknown"
            elif i in galleries:
                r = "gallery"
            elif split_of[i] == "test":
                r = "test"
            elif split_of[i] is not None and split_of[i] not in keep:
                r = "split"
            else:
                continue
            if reason is None or DROP_REASONS.index(r) < DROP_REASONS.index(reason):
                reason = r
        mask.append(reason is None)
        if reason is not None:
            dropped[reason] += 1
    kept = table.filter(pa.array(mask, pa.bool_())) if len(mask) else table
    counts = {"pairs_in": table.num_rows, "pairs_kept": kept.num_rows,
              "pairs_dropped": table.num_rows - kept.num_rows, "dropped": dropped,
              "queries_kept": len(set(kept.column("query_id").to_pylist())),
              "keep_splits": sorted(keep)}
    return kept, counts


def training_votes(votes: VotesInput, world: str | Path, out: str | Path,
                   keep_splits: Sequence[str] = ("train", "val")) -> tuple[Path, dict[str, Any]]:
    """:func:`filter_votes` on ``votes`` against ``world``; writes ``out/preferences.parquet``
    and its manifest (the counts, logged too); returns the directory and the counts.

    Raises:
        ValueError: no pair survives the filter.
    """
    from aligner.data.preferences import write_preferences
    from aligner.runtime.manifest import write_manifest

    started = time.time()
    table = read_votes(votes)
    split_of, galleries = image_splits(world)
    kept, counts = filter_votes(table, split_of, galleries, keep_splits)
    log.info("votes: %d pairs in, %d kept, %d dropped %s (test-split / gallery / other images "
             "are never trained on)", counts["pairs_in"], counts["pairs_kept"],
             counts["pairs_dropped"], {k: v for k, v in counts["dropped"].items() if v})
    if not kept.num_rows:
        raise ValueError(f"none of the {table.num_rows} vote pairs names only training images "
                         f"(dropped: {counts['dropped']})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_preferences(kept, out)
    sources = sorted(set(kept.column("source").to_pylist()))
    write_manifest(out, "feedback_votes", {"keep_splits": list(keep_splits)}, started,
                   inputs={"votes": _describe(votes), "world": str(world)}, counts=counts,
                   source=", ".join(sources), fingerprint=votes_fingerprint(kept))
    return out, counts


def _describe(votes: VotesInput) -> Any:
    if isinstance(votes, pa.Table):
        return f"a table of {votes.num_rows} rows"
    return [str(p) for p in ([votes] if isinstance(votes, (str, Path)) else votes)]


# ----------------------------------------------------------------------------- the steps

def train_reward(votes: VotesInput, world: str | Path, base_ckpt: str | Path, out: str | Path,
                 settings: RetrainSettings, test_pairs: str | Path = "",
                 rephrased: str | Path = "") -> Path:
    """Train a reward model on the training material of ``votes``; returns its checkpoint
    directory (``out/checkpoint``).

    ``out/votes/`` holds the filtered votes (and their counts in its manifest); ``out`` gets
    ``metrics.json`` (``val_acc_vs_votes``: agreement with the held-out queries' votes) and
    ``manifest.json``. ``test_pairs`` (``jobs.rater_votes``' held-out pairs, built-in world):
    the finetune kind also measures preference accuracy on them.

    Raises:
        ValueError: no trainable pairs; ``reward_kind="head"`` without
            :mod:`aligner.reward.head_fit`.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    vdir, counts = training_votes(votes, world, out / VOTES_DIR, settings.image_splits)
    if test_pairs:
        shutil.copyfile(test_pairs, vdir / "test_pairs.parquet")
    if settings.reward_kind == "head":
        return _train_head(vdir, world, base_ckpt, out, settings, counts)
    from aligner.retrieval.models import ModelSpec
    from aligner.training.reward import RewardLoopConfig, TrainRewardConfig, run_train_reward

    loop = RewardLoopConfig(seed=settings.seed)
    loop = replace(loop, batch_size=settings.reward_batch_size or loop.batch_size)
    loop = replace(loop, steps=settings.reward_steps or loop.steps,
                   lr=settings.reward_lr or loop.lr,
                   checkpoint_every=settings.checkpoint_every,
                   eval_every=min(loop.eval_every, settings.reward_steps or loop.steps),
                   warmup=min(loop.warmup, max(0, (settings.reward_steps or loop.steps) // 5)))
    model = ModelSpec(checkpoint=str(Path(base_ckpt).resolve()))
    cfg = TrainRewardConfig(votes=str(vdir), output=str(out), world=str(world), model=model,
                            train=loop, val_fraction=settings.val_fraction,
                            num_workers=settings.num_workers,
                            threads_per_worker=settings.threads_per_worker,
                            ray_address=settings.ray_address, evaluate=bool(test_pairs),
                            rephrased=str(rephrased or ""))
    evaluate = None
    if test_pairs:
        from aligner.evaluation.reward_eval import evaluate_reward_checkpoint

        def evaluate(ckpt: Path) -> dict[str, Any]:
            return evaluate_reward_checkpoint(ckpt, world, vdir, model, str(rephrased or ""),
                                              out)
    run_train_reward(cfg, evaluate)
    return out / "checkpoint"


def _train_head(vdir: Path, world: str | Path, base_ckpt: str | Path, out: Path,
                settings: RetrainSettings, counts: dict[str, Any]) -> Path:
    """``reward_kind="head"``: :func:`aligner.reward.head_fit.fit_reward_head`."""
    try:
        from aligner.reward import head_fit
    except ImportError as e:  # pragma: no cover - the module ships with the repository
        raise ValueError(f"reward_kind=head needs aligner.reward.head_fit ({e})") from e
    from aligner.data.preferences import read_preferences
    from aligner.runtime.manifest import write_manifest

    started = time.time()
    s = head_fit.HeadFitSettings()
    s = replace(s, batch_size=settings.reward_batch_size or s.batch_size,
                val_fraction=settings.val_fraction, seed=settings.seed)
    s = replace(s, steps=settings.reward_steps or s.steps, lr=settings.reward_lr or s.lr)
    ckpt = out / "checkpoint"
    stats = head_fit.fit_reward_head(read_preferences(vdir), Path(world) / "corpus",
                                     Path(base_ckpt).resolve(), ckpt, s)
    metrics = {"kind": "head", "val_acc_vs_votes": stats.get("val_acc"),
               "train_acc": stats.get("train_acc"), "train_pairs": stats.get("train_pairs"),
               "val_pairs": stats.get("val_pairs"), "steps": stats.get("steps"),
               "fit_seconds": stats.get("fit_seconds"), "head_fit": stats}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_manifest(out, "feedback_reward_head", dataclasses.asdict(s), started,
                   inputs={"votes": str(vdir), "world": str(world), "base": str(base_ckpt)},
                   outputs={"checkpoint": "checkpoint/", "metrics": "metrics.json"},
                   counts=counts)
    return ckpt


def teacher_components(teacher: str, reward_weight: float = 1.0) -> dict[str, Any]:
    """The builder fields of a feedback teacher: ``reward`` alone, or ``mix`` (the label-free
    preset's components and negatives, plus the reward)."""
    from aligner.preferences.teacher import TEACHER_PRESETS

    if teacher == "reward":
        return {"aesthetic": ["reward"], "aesthetic_weights": [float(reward_weight)]}
    if teacher == "mix":
        p = TEACHER_PRESETS[LABEL_FREE_PRESET]
        return {"aesthetic": [*p["aesthetic"], "reward"],
                "aesthetic_weights": [*p["aesthetic_weights"], float(reward_weight)],
                "bad_template": p["bad_template"], "degrade_kinds": list(p["degrade_kinds"])}
    raise ValueError(f"teacher {teacher!r}: one of {list(TEACHERS)}")


def build_teacher_preferences(world: str | Path, embeddings: str | Path,
                              rephrased: str | Path, reward_ckpt: str | Path, teacher: str,
                              out: str | Path, settings: RetrainSettings) -> Path:
    """Preference pairs for the training and validation queries, ordered by the reward model
    (``teacher="reward"``) or by it mixed with the label-free teacher (``"mix"``); pools are
    retrieved from ``embeddings`` (the base model's), candidates from the training images
    only. Returns ``out``."""
    from aligner.preferences.build import BuildPreferencesConfig, build_preferences

    bc = BuildPreferencesConfig(embeddings=str(embeddings), queries=str(rephrased),
                                output=str(out), splits=["train", "val"],
                                corpus=str(Path(world) / "corpus"),
                                degraded=settings.degraded, reward_model=str(reward_ckpt),
                                examples=0, seed=settings.seed,
                                **teacher_components(teacher, settings.reward_weight))
    build_preferences(bc)
    return Path(out)


def align_config(world: str | Path, base_ckpt: str | Path, preferences: str | Path,
                 out: str | Path, settings: RetrainSettings) -> Any:
    """The :class:`aligner.training.config.AlignConfig` :func:`realign` runs."""
    from aligner.retrieval.models import ModelSpec
    from aligner.training.config import AlignConfig

    ac = AlignConfig(world=str(world), preferences=str(preferences), output=str(out),
                     model=ModelSpec(checkpoint=str(Path(base_ckpt).resolve())),
                     num_workers=settings.num_workers,
                     threads_per_worker=settings.threads_per_worker,
                     ray_address=settings.ray_address)
    return replace(ac, train=replace(
        ac.train, steps=settings.align_steps, lr=settings.align_lr, beta=settings.beta,
        pairs_per_step=settings.pairs_per_step, captions_per_step=settings.captions_per_step,
        eval_every=min(settings.eval_every, settings.align_steps),
        checkpoint_every=min(settings.checkpoint_every, settings.align_steps),
        warmup=min(ac.train.warmup, max(0, settings.align_steps // 5)),
        selection=settings.selection, seed=settings.seed))


def realign(world: str | Path, base_ckpt: str | Path, preferences: str | Path,
            out: str | Path, settings: RetrainSettings) -> Path:
    """Ranked DPO of the **base** checkpoint on ``preferences`` (Ray Train); returns the
    aligned checkpoint directory (``out/checkpoint``)."""
    from aligner.training.runs import run_align

    run_align(align_config(world, base_ckpt, preferences, out, settings))
    return Path(out) / "checkpoint"


# ----------------------------------------------------------------------------- all three

def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def reward_summary(reward_dir: str | Path) -> dict[str, Any]:
    """What a round reports about its reward model: the vote filter's counts, agreement with
    the held-out votes, and held-out accuracy against the hidden taste when it was measured."""
    d = Path(reward_dir)
    m, votes = read_json(d / "metrics.json"), read_json(d / VOTES_DIR / "manifest.json")
    out: dict[str, Any] = {"kind": m.get("kind", "finetune"),
                           "val_acc_vs_votes": m.get("val_acc_vs_votes"),
                           "train_pairs": m.get("train_pairs"), "val_pairs": m.get("val_pairs"),
                           "steps": m.get("steps"), "votes": votes.get("counts", {})}
    rows = (m.get("evaluation") or {}).get("rows") or {}
    if rows:
        out["test_accuracy"] = {k: (r.get("accuracy") or {}).get("mean") for k, r in rows.items()}
    return out


#: config fields that say where or how fast a stage runs, not what it makes: a stage's identity
#: leaves them out, so that resuming on another cluster (other CPUs) redoes nothing
RUNTIME_FIELDS = ("threads_per_worker", "ray_address", "progress")


def stable(config: Any) -> dict[str, Any]:
    """A stage config's identity: the dataclass as data without :data:`RUNTIME_FIELDS`."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: v for k, v in data.items() if k not in RUNTIME_FIELDS}


def retrain(votes: VotesInput, world: str | Path, base_ckpt: str | Path,
            embeddings: str | Path, rephrased: str | Path, out: str | Path,
            settings: RetrainSettings, *, test_pairs: str | Path = "", fresh: bool = False,
            pipe: Any = None, prefix: str = "", after: Sequence[str] = ()) -> dict[str, Any]:
    """Reward model -> teacher preferences -> re-aligned checkpoint, under ``out``
    (``reward/``, ``preferences/``, ``aligned/``), each step skipped when its output is
    complete for the same inputs.

    Args:
        votes: the votes so far (a table, or preference-table paths).
        world, base_ckpt, embeddings, rephrased: the built-in world, the base checkpoint,
            the base model's embeddings of the corpus and the rephrased queries.
        out: where the three outputs go.
        settings: :class:`RetrainSettings`.
        test_pairs: held-out rater pairs (optional; reward accuracy on them).
        fresh: redo every step.
        pipe, prefix, after: run as stages ``<prefix>reward`` ... of an existing
            :class:`~aligner.runtime.pipeline.Pipeline` whose stages ``after`` these read
            (``jobs.loop``); default a pipeline of its own in ``out``.

    Returns:
        ``{"reward", "preferences", "aligned"}`` paths, ``"reward_summary"``,
        ``"align_metrics"``, and ``"timings"`` / ``"skipped"`` of these stages.
    """
    from aligner.runtime.pipeline import Pipeline

    out = Path(out).resolve()
    pipe = pipe if pipe is not None else Pipeline(out, fresh)
    table = read_votes(votes)
    p = {"reward": out / "reward", "preferences": out / "preferences", "aligned": out / "aligned"}
    names = {k: f"{prefix}{k}" for k in p}
    ident = {"world": str(world), "base": str(base_ckpt), "settings": stable(settings)}
    pipe.stage(names["reward"], p["reward"],
               lambda: train_reward(table, world, base_ckpt, p["reward"], settings, test_pairs,
                                    rephrased),
               {**ident, "test_pairs": str(test_pairs), "rephrased": str(rephrased)},
               key=votes_fingerprint(table), after=list(after))
    ckpt = p["reward"] / "checkpoint"
    pipe.stage(names["preferences"], p["preferences"],
               lambda: build_teacher_preferences(world, embeddings, rephrased, ckpt,
                                                 settings.teacher, p["preferences"], settings),
               {**ident, "embeddings": str(embeddings), "rephrased": str(rephrased),
                "reward": str(ckpt)}, after=[*after, names["reward"]])
    pipe.stage(names["aligned"], p["aligned"],
               lambda: realign(world, base_ckpt, p["preferences"], p["aligned"], settings),
               {**ident, "preferences": str(p["preferences"])},
               after=[*after, names["preferences"]])
    return {"reward": ckpt, "preferences": p["preferences"],
            "aligned": p["aligned"] / "checkpoint",
            "reward_summary": reward_summary(p["reward"]),
            "align_metrics": read_json(p["aligned"] / "metrics.json"),
            "timings": {k: v for k, v in pipe.timings.items() if k in names.values()},
            "skipped": [s for s in pipe.skipped if s in names.values()]}
