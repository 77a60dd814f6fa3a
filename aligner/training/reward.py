"""Reward-model training on Ray Train (``jobs.train_reward``): ImageReward's recipe on a CLIP
backbone.

The loop is :func:`aligner.training.loop.run_loop` with :class:`RewardSteps`: each step draws
``batch_size`` preference pairs (global, split over workers), runs the image tower once over
their unique images, scores each image with its query through the head
(:class:`aligner.reward.model.RewardNet`) and minimises the Bradley-Terry loss
``-log sigmoid(r_w - r_l)`` (weighted by the pairs' weights). The bottom ``freeze_fraction``
of each tower is frozen; the head trains at ``head_lr_scale`` x the learning rate. Rank 0
validates on the validation queries' pairs (accuracy and loss against the votes, never an
oracle). Every checkpoint is a reward checkpoint: the backbone in the retriever layout plus
the head and ``reward.json`` with the score normalisation, measured on the training items at
that step; resume restores the head from the train state.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligner.retrieval.models import ModelSpec, to_pixels
from aligner.reward.model import (
    ACTIVATIONS,
    HeadSpec,
    Normalisation,
    RewardHead,
    RewardNet,
    bradley_terry_loss,
    freeze_bottom,
    save_reward_parts,
)
from aligner.training.config import _check_ray
from aligner.training.loop import LoopInputs, LoopSteps, Worker, param_groups, run_loop
from aligner.training.reward_data import RewardData, RewardPairs

log = logging.getLogger(__name__)


@dataclass
class RewardLoopConfig:
    """What the reward-model loop reads (``train.*`` of :class:`TrainRewardConfig`)."""

    steps: int = field(default=400, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "preference pairs per step (global)"})
    lr: float = field(default=1e-4, metadata={"help": "backbone learning rate (AdamW)"})
    head_lr_scale: float = field(default=10.0, metadata={
        "help": "the head's learning rate as a multiple of lr"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999],
                               metadata={"help": "AdamW betas"})
    weight_decay: float = field(default=0.01, metadata={"help": "on matrices only"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (0: off)"})
    freeze_fraction: float = field(default=0.7, metadata={
        "help": "bottom fraction of each tower's blocks frozen (ImageReward: 0.7); the built-in "
                "retriever's packaged text transformer is always frozen"})
    activation: str = field(default="none", metadata={
        "help": "head activation: none (ImageReward's linear MLP) | gelu"})
    seed: int = field(default=0, metadata={"help": "pair order and initialisation"})
    eval_every: int = field(default=50, metadata={"help": "validate every N steps (0: at the end)"})
    checkpoint_every: int = field(default=100, metadata={
        "help": "checkpoint every N steps (0: at the end only)"})
    log_every: int = field(default=10, metadata={"help": "log every N steps"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("steps must be >= 1 and batch_size >= 2")
        if self.lr <= 0 or self.head_lr_scale <= 0:
            raise ValueError("lr and head_lr_scale must be > 0")
        if len(self.betas) != 2 or any(not 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.warmup < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay, warmup and grad_clip must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.freeze_fraction <= 1:
            raise ValueError(f"freeze_fraction must be in [0, 1], got {self.freeze_fraction}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if min(self.eval_every, self.checkpoint_every) < 0 or self.log_every < 1:
            raise ValueError("eval_every / checkpoint_every must be >= 0 and log_every >= 1")


@dataclass
class TrainRewardConfig:
    """Train an ImageReward-style reward model from pairwise preferences."""

    votes: str = field(default="out/votes", metadata={
        "help": "preferences table (dir or file): jobs.rater_votes, exported page votes, LMM labels"})
    output: str = field(default="out/reward", metadata={"help": "output directory"})
    world: str = field(default="out/world", metadata={
        "help": "built-in world dir (its corpus/ and queries/ are the defaults below)"})
    corpus: str = field(default="", metadata={"help": "corpus Parquet dir (default <world>/corpus)"})
    queries: str = field(default="", metadata={
        "help": "queries table with query_id, split (default <world>/queries)"})
    model: ModelSpec = field(default_factory=ModelSpec, metadata={
        "help": "backbone: a retriever checkpoint, or an open_clip name + pretrained"})
    train: RewardLoopConfig = field(default_factory=RewardLoopConfig,
                                    metadata={"help": "the training loop"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "validation share of queries when the queries table has no split"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    threads_per_worker: int = field(default=0,
                                    metadata={"help": "torch threads (0: CPUs/workers)"})
    max_failures: int = field(default=1, metadata={"help": "worker-group restarts on failure"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster address (default: local)"})
    evaluate: bool = field(default=True, metadata={
        "help": "evaluate on the votes' held-out test pairs (built-in world)"})
    rephrased: str = field(default="", metadata={
        "help": "rephrased queries for the contrast-teacher baseline ('' : the template)"})

    def __post_init__(self) -> None:
        _check_ray(self)
        if self.train.batch_size % self.num_workers:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be divisible by "
                             f"num_workers ({self.num_workers})")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


class RewardSteps(LoopSteps):
    """The reward step (a batch of pairs, Bradley-Terry) and its validation."""

    kind = "reward"
    rate_key = "pairs_per_s"
    mean_keys = ("loss", "train_acc")

    def __init__(self, w: Worker) -> None:
        cfg: RewardLoopConfig = w.cfg
        self.cfg, self.rank, self.world, self.device = cfg, w.rank, w.world, w.device
        self.data: RewardData = w.data
        self.retriever = w.retriever
        self.model = model = w.retriever.model
        self.frozen = freeze_bottom(model, cfg.freeze_fraction)
        self.spec = HeadSpec(3 * w.retriever.embed_dim, activation=cfg.activation)
        torch.manual_seed(cfg.seed)  # the same head on every worker
        self.head = RewardHead(self.spec)
        self.net, self.wrapped = w.place(RewardNet(model, self.head))
        self.groups = param_groups(self.net, cfg.weight_decay, cfg.lr,
                                   [("head.", cfg.head_lr_scale)])
        pre = w.retriever.preprocess_cfg
        self.mean, self.std = pre["mean"], pre["std"]
        self.per_worker = max(1, cfg.batch_size // w.world)
        pooled = self.data.text_pooled
        self.pooled = torch.from_numpy(pooled).to(w.device) if pooled is not None else None
        self.tokens = None if pooled is not None else \
            w.retriever.tokenizer(self.data.queries).to(w.device)

    def clip_parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def _rewards(self, module: torch.nn.Module, rows: np.ndarray, q: np.ndarray) -> torch.Tensor:
        """Raw rewards of images ``rows`` with queries ``q`` (unique images encoded once)."""
        uniq, inv = np.unique(rows, return_inverse=True)
        uq, qinv = np.unique(q, return_inverse=True)
        x = to_pixels(self.data.pixels[uniq], self.mean, self.std).to(self.device)
        idx = torch.as_tensor(qinv, device=self.device)
        rows_t = torch.as_tensor(inv, device=self.device)
        if self.pooled is not None:
            return module(x, idx, text_pooled=self.pooled[uq], img_index=rows_t)
        return module(x, idx, tokens=self.tokens[uq], img_index=rows_t)

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        p: RewardPairs = self.data.train
        rng = np.random.default_rng([self.cfg.seed, 29, step])
        sel = rng.choice(len(p), self.per_worker * self.world, replace=len(p) < self.cfg.batch_size)
        sel = sel[self.rank * self.per_worker:(self.rank + 1) * self.per_worker]
        n = len(sel)
        self.net.train()
        r = self._rewards(self.wrapped, np.concatenate([p.chosen[sel], p.rejected[sel]]),
                          np.concatenate([p.query[sel], p.query[sel]]))
        rw, rl = r[:n], r[n:]
        loss = bradley_terry_loss(rw, rl, torch.as_tensor(p.weight[sel], device=self.device))
        loss.backward()
        return ({"loss": float(loss.detach()),
                 "train_acc": float((rw > rl).float().mean().detach())}, n * self.world)

    def _raw_rewards(self, q: np.ndarray, rows: np.ndarray, batch: int = 512) -> np.ndarray:
        self.net.eval()
        out = []
        with torch.no_grad():
            for lo in range(0, len(rows), batch):
                out.append(self._rewards(self.net, rows[lo:lo + batch], q[lo:lo + batch])
                           .float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def validate(self) -> dict[str, float]:
        p = self.data.val
        if not len(p):
            return {}
        rw = self._raw_rewards(p.query, p.chosen)
        rl = self._raw_rewards(p.query, p.rejected)
        loss = bradley_terry_loss(torch.from_numpy(rw), torch.from_numpy(rl),
                                  torch.from_numpy(p.weight))
        return {"val_acc": float(np.mean(np.where(rw == rl, 0.5, rw > rl))),
                "val_loss": float(loss)}

    def state(self) -> dict[str, Any]:
        return {"head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()}}

    def restore(self, extra: dict[str, Any]) -> None:
        if "head" in extra:
            self.head.load_state_dict(extra["head"])

    def save_extra(self, directory: Path, write: Callable[..., None]) -> None:
        items = self.data.norm_items
        norm = Normalisation.fit(self._raw_rewards(items[:, 0], items[:, 1]))
        save_reward_parts(directory, self.head, self.spec, norm,
                          {"freeze_fraction": self.cfg.freeze_fraction, "frozen": self.frozen})


def reward_loop(inputs: LoopInputs) -> None:
    """Ray Train ``train_loop_per_worker`` of the reward model."""
    run_loop(inputs, RewardSteps)


def run_train_reward(cfg: TrainRewardConfig,
                     evaluate: Callable[[Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train, write ``checkpoint/`` (a reward checkpoint), the logs, metrics and manifest.

    Args:
        cfg: the job config.
        evaluate: ``evaluate(checkpoint) -> metrics`` merged into ``metrics.json`` (the job
            passes the held-out evaluation, a stage above this one); None: training only.
    """
    from aligner.runtime.config import save_config, to_dict
    from aligner.runtime.manifest import write_manifest
    from aligner.runtime.raycluster import init_ray
    from aligner.training.loop import TRAIN_LOG, fit_torch_trainer, read_history
    from aligner.training.plots import write_logs
    from aligner.training.reward_data import prepare_reward_data, votes_manifest

    started = time.time()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    data, counts = prepare_reward_data(
        cfg.votes, cfg.corpus or str(Path(cfg.world) / "corpus"),
        cfg.queries or str(Path(cfg.world) / "queries"), cfg.model, cfg.val_fraction,
        cfg.train.seed)
    init_ray(cfg.ray_address or None)
    t_fit = time.time()
    final = fit_torch_trainer(reward_loop, cfg.train, cfg.model, data, name="reward",
                              out=out.resolve(), num_workers=cfg.num_workers,
                              use_gpu=cfg.use_gpu, threads_per_worker=cfg.threads_per_worker,
                              max_failures=cfg.max_failures, dest=out.resolve() / "last")
    fit_s = time.time() - t_fit
    history = read_history(final / TRAIN_LOG)
    write_logs(history, out, "reward")
    ckpt = out / "checkpoint"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    shutil.copytree(final, ckpt, ignore=shutil.ignore_patterns("train_state.pt"))
    vals = [h for h in history if "val_acc" in h]
    rates = sorted(h["pairs_per_s"] for h in history if h.get("pairs_per_s"))
    metrics: dict[str, Any] = {
        "fit_seconds": round(fit_s, 1), "steps": cfg.train.steps,
        "val_acc_vs_votes": vals[-1]["val_acc"] if vals else None,
        "val_history": [{"step": h["step"], "val_acc": h["val_acc"], "val_loss": h["val_loss"]}
                        for h in vals],
        "pairs_per_s": rates[len(rates) // 2] if rates else None,
        "normalisation": json.loads((ckpt / "reward.json").read_text())["normalisation"],
        "votes_source": votes_manifest(cfg.votes).get("source", "unknown"), **counts}
    if evaluate is not None:
        metrics["evaluation"] = evaluate(ckpt)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_manifest(out, "train_reward", to_dict(cfg), started,
                   inputs={"votes": cfg.votes, "model": to_dict(cfg.model), "world": cfg.world},
                   outputs={"checkpoint": "checkpoint/", "last": "last/",
                            "log": "train_log.jsonl", "metrics": "metrics.json",
                            "plot": "training.png"}, counts=counts)
    return metrics
