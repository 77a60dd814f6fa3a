"""Pre-train the built-in retriever's image tower on the world's captions (Ray Train).

    python -m jobs.pretrain --config jobs/configs/pretrain.yaml world=out/world output=out/base

Text tower locked (LiT-style; optionally its last layers unlocked), its outputs for the
finite caption set cached, the image tower trained contrastively with ``TorchTrainer`` on
``num_workers`` workers, checkpoints every ``checkpoint_every`` steps (a re-run with the same
``output`` resumes from the latest one; ``max_failures`` restarts a crashed worker group).
Afterwards the final checkpoint is evaluated on the held-out split: caption recall@K,
paraphrases in unseen words, and the rephrasing premise (does adding good look words to a
query raise the oracle score of its top 10?), written to ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from aligner.data.images import decode_batch
from aligner.retrieval.models import ModelSpec
from aligner.runtime.config import dump_yaml, load_config, save_config, to_dict
from aligner.runtime.logs import setup_logging
from aligner.runtime.manifest import write_manifest

log = logging.getLogger("jobs.pretrain")
DEFAULT_YAML = Path(__file__).parent / "configs" / "pretrain.yaml"


@dataclass
class PretrainConfig:
    """Contrastive pre-training of the built-in retriever on the built-in world."""

    world: str = field(default="out/world", metadata={"help": "world directory (jobs.make_world)"})
    output: str = field(default="out/base", metadata={"help": "output directory"})
    model: ModelSpec = field(default_factory=ModelSpec,
                             metadata={"help": "starting model (built-in by default)"})
    steps: int = field(default=500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=256, metadata={"help": "global batch (split over workers)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.02, metadata={"help": "final LR / peak LR"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98], metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    text_unlocked_layers: int = field(
        default=0, metadata={"help": "unlock the last N text layers (0: locked, cached)"})
    text_lr_scale: float = field(default=0.1, metadata={"help": "LR scale of unlocked text layers"})
    text_proj_lr_scale: float = field(
        default=0.1, metadata={"help": "LR scale of the text projection (0: frozen, pure LiT)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and flips"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    threads_per_worker: int = field(default=0, metadata={"help": "torch threads (0: CPUs/workers)"})
    eval_every: int = field(default=50, metadata={"help": "validation recall every N steps"})
    checkpoint_every: int = field(default=100, metadata={"help": "checkpoint every N steps"})
    log_every: int = field(default=10, metadata={"help": "report metrics every N steps"})
    max_failures: int = field(default=1, metadata={"help": "worker-group restarts on failure"})
    evaluate: bool = field(default=True, metadata={"help": "evaluate the final model"})
    eval_gallery: str = field(default="test", metadata={"help": "evaluation gallery: test | all"})
    max_train_images: int = field(default=0, metadata={"help": "use at most N train images (0: all)"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster address (default: local)"})
    export_to: str = field(default="", metadata={
        "help": "also write the result as a shippable base here (aligner/assets/builtin_base)"})

    def __post_init__(self) -> None:
        if self.export_to and not self.evaluate:
            raise ValueError("export_to needs evaluate=true: a shipped base carries its metrics")
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("steps >= 1 and batch_size >= 2 are required")
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.eval_gallery not in ("test", "all"):
            raise ValueError("eval_gallery must be 'test' or 'all'")
        if self.batch_size % self.num_workers:
            raise ValueError("batch_size must be divisible by num_workers")


def prepare_data(cfg: PretrainConfig):
    """Decode the world's train/val images and cache the locked text tower's features."""
    from aligner.retrieval.models import load_retriever
    from aligner.retrieval.textcache import cached_pooled_features
    from aligner.training.pretrain import PretrainData
    from aligner.world import World

    world = World(cfg.world)
    train = world.corpus(["id", "image", "caption"], split="train")
    if cfg.max_train_images:
        train = train.slice(0, cfg.max_train_images)
    val = world.corpus(["id", "image", "caption"], split="val")
    t0 = time.time()
    images = decode_batch(train["image"].to_pylist())
    val_images = decode_batch(val["image"].to_pylist())
    captions, val_captions = train["caption"].to_pylist(), val["caption"].to_pylist()
    log.info("decoded %d train + %d val images in %.1f s", len(images), len(val_images),
             time.time() - t0)
    text = val_text = None
    if cfg.text_unlocked_layers == 0:
        r = load_retriever(cfg.model, device="cpu")
        if not hasattr(r.model, "text") or not hasattr(r.model.text, "transformer"):
            raise ValueError("text-feature caching needs an HF text tower (the built-in model)")
        feats = cached_pooled_features(r.model, r.tokenizer, captions + val_captions)
        text, val_text = feats[:len(captions)], feats[len(captions):]
    return PretrainData(images, text, captions, val_images, val_text, val_captions)


def run_training(cfg: PretrainConfig, data) -> Path:
    """Fit with Ray Train; returns the final checkpoint directory (copied into ``output``)."""
    import ray

    from aligner.training.loop import absolute_model_paths, fit_torch_trainer, worker_threads
    from aligner.training.pretrain import pretrain_loop

    threads = worker_threads(cfg.threads_per_worker, cfg.num_workers)
    loop_cfg = {"data_ref": ray.put(data), "model": absolute_model_paths(to_dict(cfg.model)),
                "steps": cfg.steps,
                "batch_size": cfg.batch_size, "lr": cfg.lr, "min_lr_ratio": cfg.min_lr_ratio,
                "warmup": cfg.warmup, "weight_decay": cfg.weight_decay, "betas": cfg.betas,
                "seed": cfg.seed, "flip": cfg.flip, "grad_clip": cfg.grad_clip,
                "text_unlocked_layers": cfg.text_unlocked_layers,
                "text_lr_scale": cfg.text_lr_scale, "text_proj_lr_scale": cfg.text_proj_lr_scale,
                "eval_every": cfg.eval_every,
                "checkpoint_every": cfg.checkpoint_every, "log_every": cfg.log_every,
                "threads": threads}
    out = Path(cfg.output).resolve()
    return fit_torch_trainer(pretrain_loop, loop_cfg, name="pretrain", out=out,
                             num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, threads=threads,
                             max_failures=cfg.max_failures, dest=out / "checkpoint")


def plot_history(history: list[dict], path: Path) -> None:
    """Loss and validation recall against step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h["step"] for h in history]
    ax[0].plot(steps, [h["loss"] for h in history])
    ax[0].set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ev = [h for h in history if "val_r@10" in h]
    for key in ("val_r@1", "val_r@5", "val_r@10"):
        ax[1].plot([h["step"] for h in ev], [h[key] for h in ev], marker="o", label=key[4:])
    ax[1].set(xlabel="step", ylabel="recall", title="validation text->image recall")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = load_config(PretrainConfig, argv, DEFAULT_YAML, prog="python -m jobs.pretrain")
    from aligner.runtime.raycluster import init_ray

    started = time.time()
    log.info("config:\n%s", dump_yaml(cfg))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    data = prepare_data(cfg)
    init_ray(cfg.ray_address or None)
    t_fit = time.time()
    final = run_training(cfg, data)
    fit_s = time.time() - t_fit
    history_file = final / "train_log.jsonl"
    history = [json.loads(x) for x in history_file.read_text().splitlines() if x.strip()]
    (out / "train_log.jsonl").write_text(history_file.read_text())
    if history:
        plot_history(history, out / "training.png")
    metrics = {"train": {"steps": cfg.steps, "fit_seconds": round(fit_s, 1),
                         "images": len(data.images), "last": history[-1] if history else {}}}
    if cfg.evaluate:
        from aligner.evaluation.checkpoint import evaluate_checkpoint

        metrics.update(evaluate_checkpoint(final, cfg.world, cfg.eval_gallery))
        _log_summary(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_manifest(out, "pretrain", to_dict(cfg), started, inputs={"world": cfg.world},
                   outputs={"checkpoint": "checkpoint/", "metrics": "metrics.json",
                            "log": "train_log.jsonl", "plot": "training.png"},
                   counts={"train_images": len(data.images), "val_images": len(data.val_images)})
    if cfg.export_to:
        from aligner.retrieval.shipped import export_base

        dest = export_base(out, final, cfg.world, to_dict(cfg), cfg.export_to)
        log.info("exported the base model to %s", dest)
    print(f"pre-trained checkpoint: {final}\nmetrics: {out / 'metrics.json'}")
    return 0


def _log_summary(m: dict) -> None:
    r = m["caption_recall_test"]
    p = m["premise"]
    log.info("test caption recall: R@1 %.3f R@5 %.3f R@10 %.3f (chance@10 %.4f)",
             r["r@1"]["mean"], r["r@5"]["mean"], r["r@10"]["mean"], r["chance@10"]["mean"])
    for key, what in (("content_queries", "caption words"), ("paraphrases", "unseen words")):
        h = m[key]
        log.info("%s queries (%s): right content in top 10 for %.2f (chance %.2f), "
                 "precision@10 %.3f (chance %.3f)", key, what, h["hit@10"]["mean"],
                 h["hit@10_chance"]["mean"], h["precision@10"]["mean"],
                 h["precision@10_chance"]["mean"])
    g = p["aesthetic@10_gain"]
    log.info("premise: + good look words changes oracle aesthetic@10 by %+.3f [%.3f, %.3f]",
             g["mean"], g["ci_low"], g["ci_high"])


if __name__ == "__main__":
    raise SystemExit(main())
