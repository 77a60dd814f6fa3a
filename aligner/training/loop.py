"""The one training-loop skeleton of pre-training and alignment, and its Ray Train glue.

Design: a loop is the generic :func:`run_loop` plus a *steps* object (a :class:`LoopSteps`
subclass) that holds only what differs between the two trainings::

    run_loop(inputs, make_steps)          # one per Ray Train worker (or a plain call)
      rank, world, threads; data (from the object store); the retriever (inputs.model)
      torch.manual_seed(seed + 1000 * rank)
      steps = make_steps(Worker(...))     # freezes / unfreezes, wraps DDP, param groups
      AdamW(steps.groups) + warm-up/cosine LambdaLR
      resume: weights + optimizer + scheduler + step + history (+ steps.restore(extra))
      rank 0: steps.begin(history)        # e.g. the starting model's validation
      for step in range(start, steps):
          zero_grad; values, n = steps.train_step(step)   # forward + backward
          clip (steps.clip_parameters(), in order); optimizer and scheduler step
          steps.after_update()
          every log_every / eval_every / checkpoint_every step (and the last):
              metrics = step, values (interval means of steps.mean_keys), lr, rate
              rank 0: metrics += steps.validate() when evaluating; steps.select(...)
              report(metrics, checkpoint from rank 0 when due)

A checkpoint is the model weights (:func:`~aligner.retrieval.models.save_checkpoint`), the
train state (optimizer, scheduler, step, ``steps.state()``), ``train_log.jsonl`` (rank 0's
history) and whatever ``steps.save_extra`` adds (alignment: the selected state in ``best/``).
A restarted worker group resumes from the latest one (Ray Train's ``get_checkpoint``), and
the first metrics line it logs carries ``resumed_from`` (the checkpoint's step), so a log shows
every restart. ``max_failures`` (``FailureConfig``) is how many restarts a run may take; a test
makes a worker die on purpose with :mod:`aligner.training.faults`.

The shared pieces live here too: AdamW parameter groups (weight decay on matrices only,
per-prefix learning-rate scales), the schedule, :func:`lock_text_tower`, and the Ray Train
helpers (:func:`report`, :func:`fit_torch_trainer`, worker threads). No Ray at import time.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from aligner.retrieval.models import ModelSpec
from aligner.training.faults import WorkerFault

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.pt"
TRAIN_LOG = "train_log.jsonl"
WEIGHTS = "open_clip_model.safetensors"


def param_groups(module: torch.nn.Module, weight_decay: float, lr: float = 0.0,
                 lr_scales: Sequence[tuple[str, float]] = (),
                 root: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters of ``module``.

    Weight decay on matrices only (not biases, norms, embeddings, the logit scale). Each
    ``(prefix, scale)`` rule of ``lr_scales``, in order, moves the parameters whose name under
    ``root`` (default ``module``) starts with ``prefix`` out of every group into a new group
    with the same weight decay at ``lr * scale``; a scale of 0 freezes them instead. The group
    order is part of the numerics (gradient-norm clipping sums in that order).

    Returns:
        The non-empty groups: ``[decay, no_decay, <rule 1 groups>, <rule 2 groups>, ...]``.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = (p.ndim < 2 or "bias" in name or "norm" in name.lower() or "ln_" in name
                or "logit_scale" in name or "embedding" in name or "class_embedding" in name)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    root = module if root is None else root
    for prefix, scale in lr_scales:
        chosen = {id(p) for n, p in root.named_parameters() if n.startswith(prefix)}
        for g in list(groups):
            moved = [p for p in g["params"] if id(p) in chosen]
            if not moved:
                continue
            g["params"] = [p for p in g["params"] if id(p) not in chosen]
            if scale > 0:
                groups.append({"params": moved, "weight_decay": g["weight_decay"],
                               "lr": lr * scale})
            else:
                for p in moved:
                    p.requires_grad = False
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up for ``warmup`` steps, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_update(optimizer: torch.optim.Optimizer, scheduler: Any,
                 params: Iterable[torch.nn.Parameter], grad_clip: float) -> None:
    """Clip the gradient norm (``grad_clip`` > 0; over ``params`` in their order), then step
    the optimizer and the scheduler (None: no scheduler)."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def lock_text_tower(model: torch.nn.Module, unlocked_layers: int) -> None:
    """Freeze the HF text transformer (all of it, or all but its last ``unlocked_layers``)."""
    for p in model.text.transformer.parameters():
        p.requires_grad = False
    if unlocked_layers > 0:
        for layer in model.text.transformer.encoder.layer[-unlocked_layers:]:
            for p in layer.parameters():
                p.requires_grad = True


def count_trainable(module: torch.nn.Module) -> int:
    """Number of trainable parameter values."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def fmt(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics for a log line (floats rounded to 4 places)."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


@dataclass
class LoopInputs:
    """What every worker receives (Ray Train's ``train_loop_config`` carries it).

    Attributes:
        train: the loop config (:class:`~aligner.training.config.PretrainLoopConfig` or
            :class:`~aligner.training.config.AlignLoopConfig`).
        model: the starting model (local paths absolute: workers have their own cwd).
        data: the loop's data, or a Ray ``ObjectRef`` of it (shipped once).
        threads: torch intra-op threads per worker (None: the CPUs Ray gave it).
        fault: a worker death to inject (tests only: :mod:`aligner.training.faults`).
    """

    train: Any
    model: ModelSpec
    data: Any
    threads: int | None = None
    fault: WorkerFault | None = None


@dataclass
class Worker:
    """What :func:`run_loop` hands a loop's ``make_steps`` on one worker."""

    cfg: Any
    rank: int
    world: int
    device: str
    data: Any
    retriever: Any

    def place(self, module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``module`` on the device, and the module to call (DDP-wrapped with several workers)."""
        module = module.to(self.device)
        if self.world == 1:
            return module, module
        import ray.train.torch

        return module, ray.train.torch.prepare_model(module)


class LoopSteps(abc.ABC):
    """What a training loop adds to :func:`run_loop` (the defaults do nothing).

    Attributes:
        kind: checkpoint kind recorded in ``aligner.json`` (``pretrain`` / ``align``).
        rate_key: name of the throughput metric (counts returned by :meth:`train_step` per s).
        mean_keys: :meth:`train_step` values logged as means over the log interval (the
            others: the last step's value).
        model: the unwrapped retriever model (saved, resumed).
        groups: the optimizer's parameter groups (see :func:`param_groups`).
    """

    kind = "train"
    rate_key = "samples_per_s"
    mean_keys: tuple[str, ...] = ()
    model: torch.nn.Module
    groups: list[dict[str, Any]]

    @abc.abstractmethod
    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        """Forward and backward of optimizer step ``step``; returns (values, samples seen)."""

    def clip_parameters(self) -> Iterable[torch.nn.Parameter]:
        """Parameters whose gradient norm is clipped, in summation order (default: groups)."""
        return [p for g in self.groups for p in g["params"]]

    def after_update(self) -> None:  # noqa: B027 - an optional hook
        """After the optimizer step (e.g. clamp the temperature)."""

    def validate(self) -> dict[str, float]:
        """Validation metrics (rank 0, every ``eval_every`` steps and at the end)."""
        return {}

    def begin(self, history: list[dict[str, Any]]) -> None:  # noqa: B027 - an optional hook
        """Rank 0, before the first step of this (possibly resumed) run."""

    def select(self, metrics: dict[str, Any], evaluated: bool, last: bool) -> None:  # noqa: B027 - an optional hook
        """Rank 0, after each logged step's metrics (and validation) are known."""

    def state(self) -> dict[str, Any]:
        """Extra train state saved with every checkpoint."""
        return {}

    def restore(self, extra: dict[str, Any]) -> None:  # noqa: B027 - an optional hook
        """Take back :meth:`state` from the checkpoint a run resumes from."""

    def save_extra(self, directory: Path, write: Callable[..., None]) -> None:  # noqa: B027 - an optional hook
        """Add files to a checkpoint; ``write(model, directory, **meta)`` saves a model."""


def run_loop(inputs: LoopInputs, make_steps: Callable[[Worker], LoopSteps]) -> None:
    """Ray Train ``train_loop_per_worker`` body shared by every training here (see the module
    docstring); outside Ray Train it runs as one plain process (nothing is reported)."""
    import ray

    from aligner.retrieval.models import load_retriever, save_checkpoint

    cfg = inputs.train
    rank, world = worker_context()
    set_threads(inputs.threads)
    quiet_ray_train_logs()
    data = ray.get(inputs.data) if isinstance(inputs.data, ray.ObjectRef) else inputs.data
    device = "cuda" if torch.cuda.is_available() else "cpu"
    retriever = load_retriever(inputs.model, device=device)
    torch.manual_seed(cfg.seed + 1000 * rank)
    steps = make_steps(Worker(cfg, rank, world, device, data, retriever))
    opt = torch.optim.AdamW(steps.groups, lr=cfg.lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    history: list[dict[str, Any]] = []
    start = 0
    resume = latest_checkpoint_dir()
    resumed_from: int | None = None
    if resume:
        start, history = _resume(Path(resume), steps, opt, sched)
        resumed_from = start
        log.info("rank %d resumed from step %d", rank, start)
    if rank == 0:
        steps.begin(history)
    record = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(inputs.model)}

    def write(module: torch.nn.Module, directory: Path, **meta: Any) -> None:
        save_checkpoint(module, directory, model_cfg=retriever.model_cfg,
                        preprocess_cfg=retriever.preprocess_cfg,
                        meta={"kind": steps.kind, **meta, "config": record})

    def save(done: int, directory: Path) -> None:
        write(steps.model, directory, step=done)
        save_train_state(directory, opt, sched, done, extra=steps.state())
        steps.save_extra(directory, write)
        (directory / TRAIN_LOG).write_text("".join(json.dumps(h) + "\n" for h in history))

    trainable = count_trainable(steps.model)
    clip = list(steps.clip_parameters())
    interval: dict[str, float] = {}  # sums of mean_keys since the last report
    n_interval, seen, t_last = 0, 0, time.time()
    for step in range(start, cfg.steps):
        if inputs.fault is not None:
            inputs.fault.maybe_kill(rank, step)
        opt.zero_grad(set_to_none=True)
        values, n = steps.train_step(step)
        apply_update(opt, sched, clip, cfg.grad_clip)
        steps.after_update()
        seen += n
        for k in steps.mean_keys:
            interval[k] = interval.get(k, 0.0) + values[k]
        n_interval += 1
        last = step + 1 == cfg.steps
        do_eval = bool(cfg.eval_every) and ((step + 1) % cfg.eval_every == 0 or last)
        do_ckpt = bool(cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or last
        if not (do_eval or do_ckpt or (step + 1) % cfg.log_every == 0):
            continue
        now = time.time()
        metrics = {"step": step + 1,
                   **{k: interval[k] / n_interval if k in steps.mean_keys else v
                      for k, v in values.items()},
                   "lr": float(sched.get_last_lr()[0]),
                   steps.rate_key: seen / max(now - t_last, 1e-9), "trainable": trainable}
        if resumed_from is not None:  # the first line after a restart says where it began
            metrics["resumed_from"] = resumed_from
            resumed_from = None
        interval, n_interval = {}, 0
        if rank == 0:
            if do_eval:
                metrics.update(steps.validate())
            steps.select(metrics, evaluated=do_eval, last=last)
            history.append(metrics)
            log.info("step %d/%d %s", step + 1, cfg.steps, fmt(metrics))
        report(metrics, partial(save, step + 1) if do_ckpt else None)
        t_last, seen = time.time(), 0


def _resume(directory: Path, steps: LoopSteps, opt, sched) -> tuple[int, list[dict[str, Any]]]:
    """Load a checkpoint's weights and train state; returns (next step, history)."""
    from aligner.retrieval.models import _load_weights_into

    _load_weights_into(steps.model, directory / WEIGHTS, allow_missing_text=True)
    start = 0
    state = load_train_state(directory)
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
        steps.restore(state.get("extra") or {})
    return start, read_history(directory / TRAIN_LOG)


def read_history(path: Path) -> list[dict[str, Any]]:
    """The metrics lines of a ``train_log.jsonl`` ([] when there is none)."""
    if not Path(path).is_file():
        return []
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def save_train_state(directory: Path, optimizer, scheduler, step: int,
                     extra: dict[str, Any] | None = None) -> None:
    """Optimizer, scheduler, step and a loop's extra state beside the model weights."""
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "extra": extra or {}}, directory / TRAIN_STATE)


def load_train_state(directory: Path) -> dict[str, Any] | None:
    """What :func:`save_train_state` wrote in ``directory`` (None: nothing there)."""
    f = Path(directory) / TRAIN_STATE
    return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None


# --- Ray Train glue ------------------------------------------------------------------------


def worker_context() -> tuple[int, int]:
    """(world rank, world size) inside a Ray Train worker, (0, 1) outside."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # noqa: BLE001 - not inside Ray Train
        return 0, 1


def in_train_session() -> bool:
    """Whether this process is a Ray Train worker (else the loop runs as a plain function)."""
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:  # noqa: BLE001 - outside Ray Train
        return False


def report(metrics: dict[str, Any], save_fn: Callable[[Path], None] | None = None) -> None:
    """``ray.train.report`` from every worker; rank 0 attaches a checkpoint written by
    ``save_fn(directory)`` (None: metrics only). Outside Ray Train it does nothing."""
    if not in_train_session():
        return
    import ray.train

    if save_fn is None or worker_context()[0] != 0:
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
    return None if ckpt is None else ckpt.to_directory(tempfile.mkdtemp(prefix="resume-"))


def quiet_ray_train_logs() -> None:
    """Silence Ray Train's per-report INFO lines in a worker (the loop logs its own metrics
    once per interval); warnings and errors still show."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # another Ray Train version: keep its logs
        return
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_threads(n: int | None) -> None:
    """Torch intra-op threads for a worker (None: the CPUs Ray gave it)."""
    if n is None:
        n = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))


def _worker_main(config: dict[str, Any]) -> None:
    config["loop"](config["inputs"])


def fit_torch_trainer(loop: Callable[[LoopInputs], None], train: Any, model: ModelSpec,
                      data: Any, *, name: str, out: Path, num_workers: int, use_gpu: bool,
                      threads_per_worker: int, max_failures: int, dest: Path) -> Path:
    """Run ``loop(LoopInputs(train, model, data))`` in a ``TorchTrainer``; copy its final
    checkpoint to ``dest`` and return it.

    ``data`` goes through the object store once; local model paths are made absolute (workers
    have their own cwd). CPU workers each reserve ``threads_per_worker`` CPUs (0: the
    cluster's CPUs split evenly) and use as many torch threads; GPU workers one GPU.
    Checkpoints and Ray Train's run state go to ``out/ray_results`` (the last two kept), so a
    re-run with the same ``out`` resumes; ``max_failures`` restarts a crashed worker group
    (up to that many times; each restart resumes from the last reported checkpoint, and its
    first logged line carries ``resumed_from``). ``ALIGNER_TEST_KILL_WORKER`` (tests only,
    :mod:`aligner.training.faults`) is read here, on the driver, and shipped to the workers.
    """
    import shutil

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    threads = threads_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1))
                                        // num_workers)
    paths = {k: str(Path(getattr(model, k)).resolve()) for k in ("checkpoint", "pretrained")
             if getattr(model, k) and Path(getattr(model, k)).exists()}
    inputs = LoopInputs(train, dataclasses.replace(model, **paths), ray.put(data), threads,
                        WorkerFault.from_env())
    trainer = TorchTrainer(
        _worker_main, train_loop_config={"loop": loop, "inputs": inputs},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": threads}),
        run_config=RunConfig(name=name, storage_path=str(out / "ray_results"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    if dest.exists():
        shutil.rmtree(dest)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, dest)
    return dest
