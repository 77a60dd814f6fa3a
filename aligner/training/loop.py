"""Pieces every training loop here shares: parameter groups, schedule, checkpoints, Ray Train glue.

No Ray at import time; the Ray Train helpers import it when called (inside a worker).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

TRAIN_STATE = "train_state.pt"


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not biases, norms, embeddings, logit scale)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = (p.ndim < 2 or "bias" in name or "norm" in name.lower() or "ln_" in name
                or "logit_scale" in name or "embedding" in name or "class_embedding" in name)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up for ``warmup`` steps, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def count_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def worker_context() -> tuple[int, int]:
    """(world rank, world size) inside a Ray Train worker, (0, 1) outside."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # noqa: BLE001 - not inside Ray Train
        return 0, 1


def save_train_state(directory: Path, optimizer, scheduler, step: int, extra: dict | None = None,
                     rng_seed: int | None = None) -> None:
    """Optimizer, scheduler and step beside the model weights, so a restarted run resumes."""
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "extra": extra or {}, "rng_seed": rng_seed},
               directory / TRAIN_STATE)


def load_train_state(directory: Path) -> dict[str, Any] | None:
    f = Path(directory) / TRAIN_STATE
    return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None


def in_train_session() -> bool:
    """Whether this process is a Ray Train worker (else the loop runs as a plain function)."""
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:  # noqa: BLE001 - outside Ray Train
        return False


def report(metrics: dict[str, Any], save_fn=None) -> None:
    """``ray.train.report`` from every worker; rank 0 attaches a checkpoint written by ``save_fn``.

    Outside Ray Train (a plain single-process run, e.g. a benchmark) it does nothing.

    Args:
        metrics: per-step metrics (only rank 0's are kept with the checkpoint).
        save_fn: ``save_fn(directory)`` writes the checkpoint files; None = metrics only.
    """
    if not in_train_session():
        return
    import ray.train

    rank, _ = worker_context()
    if save_fn is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-") as d:
        save_fn(Path(d))
        (Path(d) / "metrics.json").write_text(json.dumps(metrics, default=float))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def latest_checkpoint_dir() -> str | None:
    """The checkpoint this (restarted) run should resume from, as a local directory."""
    if not in_train_session():
        return None
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    return ckpt.to_directory(tempfile.mkdtemp(prefix="resume-"))


def quiet_ray_train_logs() -> None:
    """Silence Ray Train's per-report INFO lines in a worker ("Reporting training result ...",
    "Checkpoint successfully created ..."): our loops log their own metrics once per interval.
    Warnings and errors still show."""
    import logging

    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # another Ray Train version: keep its logs
        return
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_threads(n: int | None) -> None:
    """Torch intra-op threads for a worker (defaults to the CPUs Ray gave it)."""
    if n is None:
        n = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))


def worker_threads(requested: int, num_workers: int) -> int:
    """Torch threads per Ray Train worker: ``requested``, else the cluster's CPUs split evenly."""
    import ray

    return requested or max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers)


def absolute_model_paths(model: dict[str, Any]) -> dict[str, Any]:
    """``model`` with its local ``checkpoint`` / ``pretrained`` paths made absolute (Ray Train
    workers do not share the driver's working directory)."""
    model = dict(model)
    for key in ("checkpoint", "pretrained"):
        if model.get(key) and Path(model[key]).exists():
            model[key] = str(Path(model[key]).resolve())
    return model


def fit_torch_trainer(loop, loop_cfg: dict[str, Any], *, name: str, out: Path,
                      num_workers: int, use_gpu: bool, threads: int, max_failures: int,
                      dest: Path) -> Path:
    """Run ``loop`` in a ``TorchTrainer`` and copy its final checkpoint to ``dest``.

    Checkpoints and Ray Train's run state go to ``out/ray_results`` (the last two kept), so a
    re-run with the same ``out`` resumes; ``max_failures`` restarts a crashed worker group.
    CPU workers each reserve ``threads`` CPUs; GPU workers one GPU.
    """
    import shutil

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else
                                     {"CPU": max(1, threads)}),
        run_config=RunConfig(name=name, storage_path=str(out / "ray_results"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    if dest.exists():
        shutil.rmtree(dest)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, dest)
    return dest
