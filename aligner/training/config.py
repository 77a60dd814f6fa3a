"""Typed configs of the training stage: one home per setting.

Two levels, as on the command line:

* the loop configs (:class:`PretrainLoopConfig`, :class:`AlignLoopConfig`) hold everything
  the training loop itself reads (steps, batch, optimiser, schedule, losses, selection,
  cadence); the Ray Train workers receive them as they are;
* the job configs (:class:`PretrainConfig`, :class:`AlignConfig`) hold the inputs, outputs
  and Ray settings, and nest the loop config as the field ``train``::

      python -m jobs.align train.steps=120 train.lr=3e-4 preferences=out/preferences \\
          model.checkpoint=out/base/checkpoint output=out/aligned

The defaults here are the real defaults (``docs/defaults.md``); the jobs' YAML files only
hold what differs from them. Each ``__post_init__`` names the field a bad value belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from aligner.data.io import is_uri
from aligner.retrieval.models import ModelSpec

TOWERS = ("vision", "text", "both")
SELECTIONS = ("wise", "early_stopping", "last", "fixed")


def _check_schedule(cfg: Any) -> None:
    """Checks every loop config shares (steps, optimiser, schedule, cadence)."""
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.lr <= 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {cfg.warmup}")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if len(cfg.betas) != 2 or any(not 0 <= b < 1 for b in cfg.betas):
        raise ValueError(f"betas must be two values in [0, 1), got {cfg.betas}")
    if cfg.grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0: off), got {cfg.grad_clip}")
    if cfg.text_unlocked_layers < 0:
        raise ValueError(f"text_unlocked_layers must be >= 0, got {cfg.text_unlocked_layers}")
    if cfg.text_lr_scale < 0:
        raise ValueError(f"text_lr_scale must be >= 0, got {cfg.text_lr_scale}")
    for name in ("eval_every", "checkpoint_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0: only at the end), got {getattr(cfg, name)}")
    if cfg.log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {cfg.log_every}")


@dataclass
class PretrainLoopConfig:
    """What the contrastive pre-training loop reads (``train.*`` of :class:`PretrainConfig`)."""

    steps: int = field(default=500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=256, metadata={"help": "global batch (split over workers)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.02, metadata={"help": "final LR / peak LR"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98],
                               metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    text_unlocked_layers: int = field(
        default=0, metadata={"help": "unlock the last N text layers (0: locked, cached)"})
    text_lr_scale: float = field(default=0.1,
                                 metadata={"help": "LR scale of unlocked text layers"})
    text_proj_lr_scale: float = field(
        default=0.1, metadata={"help": "LR scale of the text projection (0: frozen, pure LiT)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and flips"})
    eval_every: int = field(default=50, metadata={
        "help": "validation recall every N steps and at the end (0: never)"})
    checkpoint_every: int = field(default=100, metadata={
        "help": "checkpoint every N steps (always at the end)"})
    log_every: int = field(default=10, metadata={"help": "report metrics every N steps"})

    def __post_init__(self) -> None:
        _check_schedule(self)
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.text_proj_lr_scale < 0:
            raise ValueError(f"text_proj_lr_scale must be >= 0, got {self.text_proj_lr_scale}")


@dataclass
class AlignLoopConfig:
    """What the preference fine-tuning loop reads (``train.*`` of :class:`AlignConfig`)."""

    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    pairs_per_step: int = field(default=64,
                                metadata={"help": "preference pairs per step (global)"})
    captions_per_step: int = field(default=128,
                                   metadata={"help": "image-caption pairs per step (global)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final LR / peak LR"})
    warmup: int = field(default=10, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (matrices)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98],
                               metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    beta: float = field(default=0.5, metadata={"help": "DPO beta"})
    label_smoothing: float = field(default=0.1, metadata={"help": "DPO label smoothing eps"})
    pref_weight: float = field(default=1.0, metadata={
        "help": "weight of the preference loss (0: the contrastive-only control)"})
    contrastive_weight: float = field(default=1.0,
                                      metadata={"help": "lambda of the InfoNCE term"})
    towers: str = field(default="vision", metadata={"help": "what trains: vision | text | both"})
    vision_last_blocks: int = field(default=0, metadata={
        "help": "train only the last N image-tower blocks (+ final norm, projection); 0: all"})
    text_unlocked_layers: int = field(default=0, metadata={
        "help": "with towers=text|both: unlock the last N text layers (0: projection only)"})
    text_lr_scale: float = field(default=0.1, metadata={"help": "LR scale of text parameters"})
    selection: str = field(default="wise", metadata={
        "help": "which state is the output: wise (the weight interpolation start + alpha "
                "(final - start), alpha 0 included, with the largest validation reward margin "
                "among those that pass the non-inferiority test on validation recall@10) | "
                "early_stopping (the same over the validated steps, the start included) | last "
                "| fixed (the one interpolation wise_alphas[0], no test: the contrastive-only "
                "control at the aligned model's alpha)"})
    wise_alphas: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0], metadata={
        "help": "selection=wise: interpolation weights tried in (0, 1] besides the start, "
                "alpha 0, which is always a candidate (1 = the final state); selection=fixed: "
                "the one alpha in [0, 1] output"})
    recall_margin: float = field(default=0.01, metadata={
        "help": "selection: the non-inferiority margin of validation recall@10 "
                "(docs/defaults.md): a state passes when its paired drop vs the start plus "
                "recall_z standard errors is at most this"})
    recall_z: float = field(default=1.645, metadata={
        "help": "selection: paired standard errors of the validation recall@10 drop added to "
                "it before the margin (1.645: the one-sided 95% upper bound; 0: the measured "
                "drop alone)"})
    seed: int = field(default=0, metadata={
        "help": "seed of sampling (and of the query split and degraded copies)"})
    eval_every: int = field(default=20, metadata={"help": "validate every N steps (0: never)"})
    checkpoint_every: int = field(default=50, metadata={
        "help": "checkpoint every N steps (always at the end)"})
    log_every: int = field(default=10, metadata={"help": "report metrics every N steps"})

    def __post_init__(self) -> None:
        _check_schedule(self)
        for name in ("pairs_per_step", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.captions_per_step < 0:
            raise ValueError(f"captions_per_step must be >= 0, got {self.captions_per_step}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.pref_weight < 0 or self.contrastive_weight < 0:
            raise ValueError("pref_weight and contrastive_weight must be >= 0")
        if self.pref_weight == 0 and self.contrastive_weight == 0:
            raise ValueError("pref_weight and contrastive_weight cannot both be 0")
        if self.towers not in TOWERS:
            raise ValueError(f"towers must be one of {TOWERS}, got {self.towers!r}")
        if self.vision_last_blocks < 0:
            raise ValueError(f"vision_last_blocks must be >= 0, got {self.vision_last_blocks}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection == "fixed":
            if len(self.wise_alphas) != 1 or not 0 <= self.wise_alphas[0] <= 1:
                raise ValueError(f"selection=fixed takes wise_alphas with exactly one value in "
                                 f"[0, 1], got {self.wise_alphas}")
        elif not self.wise_alphas or any(not 0 < a <= 1 for a in self.wise_alphas):
            raise ValueError(f"wise_alphas must be non-empty values in (0, 1] (the start, "
                             f"alpha 0, is always a candidate), got {self.wise_alphas}")
        if self.selection == "wise" and not self.eval_every:
            raise ValueError("selection=wise needs eval_every > 0: the start's validation is "
                             "the reference of the non-inferiority test")
        if self.recall_margin < 0:
            raise ValueError(f"recall_margin must be >= 0, got {self.recall_margin}")
        if self.recall_z < 0:
            raise ValueError(f"recall_z must be >= 0, got {self.recall_z}")


def control_loop(train: AlignLoopConfig, alpha: float) -> AlignLoopConfig:
    """The contrastive-only control of a fine-tune that selected ``alpha``: the same loop
    (steps, data sampling, schedule) without the preference loss, output at exactly that alpha
    (``selection=fixed``: no test of its own, so the control cannot fall back to another
    alpha; alpha 0 makes the control the start as well)."""
    return replace(train, pref_weight=0.0, selection="fixed", wise_alphas=[float(alpha)])


def _check_ray(cfg: Any) -> None:
    if cfg.num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {cfg.num_workers}")
    if cfg.threads_per_worker < 0:
        raise ValueError(f"threads_per_worker must be >= 0, got {cfg.threads_per_worker}")
    if cfg.max_failures < 0:
        raise ValueError(f"max_failures must be >= 0, got {cfg.max_failures}")


@dataclass
class PretrainConfig:
    """Contrastive pre-training of the built-in retriever on the built-in world."""

    world: str = field(default="out/world", metadata={"help": "world directory (jobs.make_world)"})
    output: str = field(default="out/base", metadata={"help": "output directory"})
    model: ModelSpec = field(default_factory=ModelSpec,
                             metadata={"help": "starting model (built-in by default)"})
    train: PretrainLoopConfig = field(default_factory=PretrainLoopConfig,
                                      metadata={"help": "the training loop"})
    max_train_images: int = field(default=0,
                                  metadata={"help": "use at most N train images (0: all)"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    threads_per_worker: int = field(default=0,
                                    metadata={"help": "torch threads (0: CPUs/workers)"})
    max_failures: int = field(default=1, metadata={"help": "worker-group restarts on failure"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster address (default: local)"})
    evaluate: bool = field(default=True, metadata={
        "help": "evaluate the final model (jobs.pretrain)"})
    eval_gallery: str = field(default="test", metadata={
        "help": "evaluation gallery: test | all"})
    export_to: str = field(default="", metadata={
        "help": "also write the result as a shippable base here (aligner/assets/builtin_base)"})

    def __post_init__(self) -> None:
        _check_ray(self)
        if self.max_train_images < 0:
            raise ValueError(f"max_train_images must be >= 0, got {self.max_train_images}")
        if self.train.batch_size % self.num_workers:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be divisible by "
                             f"num_workers ({self.num_workers})")
        if self.eval_gallery not in ("test", "all"):
            raise ValueError(f"eval_gallery must be 'test' or 'all', got {self.eval_gallery!r}")
        if self.export_to and not self.evaluate:
            raise ValueError("export_to needs evaluate=true: a shipped base carries its metrics")


@dataclass
class AlignConfig:
    """Preference fine-tuning of a retriever (ranked DPO against the frozen start + InfoNCE)."""

    preferences: str = field(default="out/preferences", metadata={
        "help": "preferences dir or Parquet file: a path or s3:// / gs:// URI"})
    output: str = field(default="out/aligned", metadata={
        "help": "output directory (a local or shared path, not a URI)"})
    world: str = field(default="out/world", metadata={
        "help": "built-in world dir or URI (its corpus/ and queries/ are the defaults below)"})
    corpus: str = field(default="", metadata={
        "help": "corpus Parquet dir with id, image, caption[, split], path or URI (default: "
                "<world>/corpus)"})
    queries: str = field(default="", metadata={
        "help": "queries table with query_id, split, path or URI (default: <world>/queries; "
                "absent there: a seeded hash split)"})
    model: ModelSpec = field(default_factory=ModelSpec,
                             metadata={"help": "starting checkpoint = frozen DPO reference"})
    train: AlignLoopConfig = field(default_factory=AlignLoopConfig,
                                   metadata={"help": "the training loop"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "hold out this fraction of queries when the queries table has no split"})
    max_caption_images: int = field(default=0, metadata={
        "help": "use at most N caption images for the contrastive term (0: all)"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    threads_per_worker: int = field(default=0,
                                    metadata={"help": "torch threads (0: CPUs/workers)"})
    max_failures: int = field(default=1, metadata={"help": "worker-group restarts on failure"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster address (default: local)"})

    def __post_init__(self) -> None:
        _check_ray(self)
        if is_uri(self.output):
            raise ValueError(f"output {self.output!r}: the fine-tune writes a local or shared "
                             "directory (its Ray Train checkpoints), not a URI")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_caption_images < 0:
            raise ValueError(f"max_caption_images must be >= 0, got {self.max_caption_images}")
        if not self.model.checkpoint and self.model.name == "builtin" and not self.model.pretrained:
            raise ValueError("model.checkpoint is required: the starting (reference) model")
