"""Fine-tune the retriever on preference pairs (ranked DPO + contrastive term) with Ray Train.

    python -m jobs.align --config jobs/configs/align.yaml world=out/world \
        preferences=out/preferences model.checkpoint=out/base/checkpoint output=out/aligned

The starting checkpoint is also the frozen reference of the DPO loss. Pairs of training
queries train; pairs of validation queries (the queries table's ``split``) and held-out
caption recall choose the output (``selection``): by default the weight-space interpolation
``start + alpha * (final - start)`` (WiSE-FT) that moved furthest towards the teacher on
held-out pairs (reward margin) while its validation recall@10 stays within
``recall_tolerance`` of the start. ``pref_weight=0`` trains the
contrastive-only control with the same steps and data. Outputs: ``checkpoint/`` (the
selected state, see ``selection``),
``last/``, ``train_log.jsonl`` + ``train_log.csv``, ``training.png``, ``metrics.json``,
``config.yaml``, ``manifest.json``. A re-run on the same output resumes from its latest
checkpoint; ``max_failures`` restarts a crashed worker group from it.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from aligner.retrieval.models import ModelSpec
from aligner.runtime.config import dump_yaml, load_config, save_config, to_dict
from aligner.runtime.logs import setup_logging
from aligner.runtime.manifest import write_manifest

log = logging.getLogger("jobs.align")
DEFAULT_YAML = Path(__file__).parent / "configs" / "align.yaml"


@dataclass
class AlignConfig:
    """Preference fine-tuning of a retriever (ranked DPO against the frozen start + InfoNCE)."""

    preferences: str = field(default="out/preferences",
                             metadata={"help": "preferences dir or Parquet file"})
    output: str = field(default="out/aligned", metadata={"help": "output directory"})
    world: str = field(default="out/world", metadata={
        "help": "built-in world dir (its corpus/ and queries/ are the defaults below)"})
    corpus: str = field(default="", metadata={
        "help": "corpus Parquet dir with id, image, caption[, split] (default: <world>/corpus)"})
    queries: str = field(default="", metadata={
        "help": "queries table with query_id, split (default: <world>/queries)"})
    model: ModelSpec = field(default_factory=ModelSpec,
                             metadata={"help": "starting checkpoint = frozen DPO reference"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    pairs_per_step: int = field(default=64, metadata={"help": "preference pairs per step (global)"})
    captions_per_step: int = field(default=128,
                                   metadata={"help": "image-caption pairs per step (global)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final LR / peak LR"})
    warmup: int = field(default=10, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (matrices)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98], metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    beta: float = field(default=0.5, metadata={"help": "DPO beta"})
    label_smoothing: float = field(default=0.1, metadata={"help": "DPO label smoothing eps"})
    pref_weight: float = field(default=1.0, metadata={
        "help": "weight of the preference loss (0: the contrastive-only control)"})
    contrastive_weight: float = field(default=1.0, metadata={"help": "lambda of the InfoNCE term"})
    train: str = field(default="vision", metadata={"help": "what trains: vision | text | both"})
    vision_last_blocks: int = field(default=0, metadata={
        "help": "train only the last N image-tower blocks (+ final norm, projection); 0: all"})
    text_unlocked_layers: int = field(default=0, metadata={
        "help": "with train=text|both: unlock the last N text layers (0: projection only)"})
    text_lr_scale: float = field(default=0.1, metadata={"help": "LR scale of text parameters"})
    selection: str = field(default="wise", metadata={
        "help": "which state is the output: wise (the best weight interpolation between the "
                "start and the final state on validation) | early_stopping (the best validated "
                "step) | last"})
    wise_alphas: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0], metadata={
        "help": "selection=wise: interpolation weights tried (1 = the final state)"})
    recall_tolerance: float = field(default=0.01, metadata={
        "help": "early stopping: max drop of validation recall@10 vs the start"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "hold out this fraction of queries when the queries table has no split"})
    max_caption_images: int = field(default=0, metadata={
        "help": "use at most N caption images for the contrastive term (0: all)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    threads_per_worker: int = field(default=0, metadata={"help": "torch threads (0: CPUs/workers)"})
    eval_every: int = field(default=20, metadata={"help": "validate every N steps (0: never)"})
    checkpoint_every: int = field(default=50, metadata={"help": "checkpoint every N steps"})
    log_every: int = field(default=10, metadata={"help": "report metrics every N steps"})
    max_failures: int = field(default=1, metadata={"help": "worker-group restarts on failure"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster address (default: local)"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.pairs_per_step < 1 or self.grad_accum < 1:
            raise ValueError("steps, pairs_per_step and grad_accum must be >= 1")
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.train not in ("vision", "text", "both"):
            raise ValueError("train must be vision, text or both")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.pref_weight < 0 or self.contrastive_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.selection not in ("wise", "early_stopping", "last"):
            raise ValueError("selection must be wise, early_stopping or last")
        if not self.wise_alphas or any(not 0 < a <= 1 for a in self.wise_alphas):
            raise ValueError("wise_alphas must be non-empty values in (0, 1]")
        if self.selection == "wise" and len(self.wise_alphas) > 1 and not self.eval_every:
            raise ValueError("selection=wise with several alphas needs eval_every > 0")
        if self.pref_weight == 0 and self.contrastive_weight == 0:
            raise ValueError("pref_weight and contrastive_weight cannot both be 0")
        if not self.model.checkpoint and self.model.name == "builtin" and not self.model.pretrained:
            raise ValueError("model.checkpoint is required: the starting (reference) model")


def run_training(cfg: AlignConfig, data) -> Path:
    """Fit with Ray Train; copy the final checkpoint to ``output/last`` and return it."""
    import ray

    from aligner.training.align import align_loop
    from aligner.training.loop import absolute_model_paths, fit_torch_trainer, worker_threads

    threads = worker_threads(cfg.threads_per_worker, cfg.num_workers)
    keys = ("steps", "pairs_per_step", "captions_per_step", "grad_accum", "lr", "min_lr_ratio",
            "warmup", "weight_decay", "betas", "grad_clip", "beta", "label_smoothing",
            "pref_weight", "contrastive_weight", "train", "vision_last_blocks",
            "text_unlocked_layers", "text_lr_scale", "seed", "eval_every", "checkpoint_every",
            "log_every", "recall_tolerance", "selection", "wise_alphas")
    loop_cfg = {k: getattr(cfg, k) for k in keys}
    loop_cfg.update(data_ref=ray.put(data), model=absolute_model_paths(to_dict(cfg.model)),
                    threads=threads)
    out = Path(cfg.output).resolve()
    return fit_torch_trainer(align_loop, loop_cfg, name="align", out=out,
                             num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, threads=threads,
                             max_failures=cfg.max_failures, dest=out / "last")


def write_logs(history: list[dict], out: Path) -> None:
    """``train_log.jsonl``, ``train_log.csv`` and ``training.png`` from rank 0's history."""
    (out / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "step", k))
    with open(out / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    if history:
        plot_history(history, out / "training.png")


def plot_history(history: list[dict], path: Path) -> None:
    """Losses (train / held-out DPO), pair accuracies and validation recall against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = float("nan")
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    tr = [h for h in history if "loss" in h]
    ev = [h for h in history if "val_r@10" in h or "val_pair_loss" in h]
    for key in ("pref_loss", "contrastive"):
        ax[0].plot([h["step"] for h in tr], [h[key] for h in tr], label=f"train {key}")
    ax[0].plot([h["step"] for h in ev], [h.get("val_pair_loss", nan) for h in ev], marker="o",
               label="held-out DPO loss")
    ax[0].set(xlabel="step", title="losses (train: means per log interval)")
    ax[0].legend(fontsize=8)
    ax[1].plot([h["step"] for h in tr], [h["train_pair_acc"] for h in tr], label="train pairs")
    ax[1].plot([h["step"] for h in ev], [h.get("val_pair_acc", nan) for h in ev],
               marker="o", label="held-out pairs")
    ax[1].plot([h["step"] for h in ev], [h.get("val_pair_reward_acc", nan) for h in ev],
               marker="s", label="held-out reward acc (z > 0)")
    ax[1].set(xlabel="step", ylabel="accuracy", title="teacher pairs")
    ax[1].legend(fontsize=8)
    ax[2].plot([h["step"] for h in ev], [h.get("val_r@10", nan) for h in ev],
               marker="o", label="R@10")
    ax[2].set(xlabel="step", title="validation caption recall@10")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = load_config(AlignConfig, argv, DEFAULT_YAML, prog="python -m jobs.align")
    from aligner.runtime.raycluster import init_ray
    from aligner.training.align_data import prepare_align_data

    started = time.time()
    log.info("config:\n%s", dump_yaml(cfg))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    data, counts = prepare_align_data(
        preferences=cfg.preferences, corpus=cfg.corpus or str(Path(cfg.world) / "corpus"),
        queries=cfg.queries or str(Path(cfg.world) / "queries"), model=cfg.model,
        val_fraction=cfg.val_fraction, seed=cfg.seed, max_caption_images=cfg.max_caption_images)
    init_ray(cfg.ray_address or None)
    t_fit = time.time()
    last = run_training(cfg, data)
    fit_s = time.time() - t_fit
    history = [json.loads(x) for x in (last / "train_log.jsonl").read_text().splitlines()
               if x.strip()]
    write_logs(history, out)
    chosen = last / "best" if (last / "best").is_dir() else last
    final = out / "checkpoint"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(chosen, final, ignore=shutil.ignore_patterns("best", "train_state.pt"))
    from aligner.retrieval.models import read_checkpoint_meta

    meta = read_checkpoint_meta(final)
    evals = [h for h in history if "val_r@10" in h or "val_pair_acc" in h]
    metrics = {"fit_seconds": round(fit_s, 1), "steps": cfg.steps,
               "selected_step": meta.get("step"), "selected_alpha": meta.get("alpha", 1.0),
               "selected_by": meta.get("selected_by", "last step"),
               "interpolations": meta.get("interpolations", []),
               "start": evals[0] if evals else {}, "selected": meta.get("val") or (
                   evals[-1] if evals else {}), "last": history[-1] if history else {},
               "pairs_per_s": _median([h["pairs_per_s"] for h in history
                                       if h.get("pairs_per_s")]), **counts}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_manifest(out, "align", to_dict(cfg), started,
                   inputs={"preferences": cfg.preferences, "model": to_dict(cfg.model),
                           "world": cfg.world},
                   outputs={"checkpoint": "checkpoint/", "last": "last/",
                            "log": "train_log.jsonl", "csv": "train_log.csv",
                            "plot": "training.png", "metrics": "metrics.json"},
                   counts=counts)
    s, e = metrics["start"], metrics["selected"]
    nan = float("nan")
    log.info("validation: DPO loss %.3f -> %.3f, reward accuracy %.3f -> %.3f, pair accuracy "
             "%.3f -> %.3f, recall@10 %.3f -> %.3f (selected step %s of %d, alpha %s)",
             s.get("val_pair_loss", nan), e.get("val_pair_loss", nan),
             s.get("val_pair_reward_acc", nan), e.get("val_pair_reward_acc", nan),
             s.get("val_pair_acc", nan), e.get("val_pair_acc", nan),
             s.get("val_r@10", nan), e.get("val_r@10", nan), metrics["selected_step"], cfg.steps,
             metrics["selected_alpha"])
    if cfg.pref_weight > 0 and e.get("val_pair_loss", 0.0) >= s.get("val_pair_loss", 1e9):
        log.warning("no validated state beats the starting model on held-out preference pairs "
                    "(DPO loss %.3f vs %.3f at the start): fewer steps, a lower lr or a better "
                    "teacher may help", e.get("val_pair_loss", nan), s.get("val_pair_loss", nan))
    print(f"aligned checkpoint: {final}\nlog: {out / 'train_log.csv'}")
    return 0


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


if __name__ == "__main__":
    raise SystemExit(main())
