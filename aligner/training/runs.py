"""The training stage as library calls: prepare the data, fit on Ray Train, write the outputs.

:func:`run_pretrain` and :func:`run_align` do what ``python -m jobs.pretrain`` and
``python -m jobs.align`` do (the jobs only parse the config and call them). Each writes into
``cfg.output``: ``config.yaml``, the checkpoint(s), ``train_log.jsonl`` + ``train_log.csv``,
``training.png``, ``metrics.json`` and ``manifest.json``; a re-run on the same output resumes
from its latest Ray Train checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligner.data.io import join_path, require_at
from aligner.runtime.config import save_config, to_dict
from aligner.runtime.manifest import write_manifest
from aligner.training.config import AlignConfig, PretrainConfig
from aligner.training.loop import TRAIN_LOG, LoopInputs, fit_torch_trainer, read_history
from aligner.training.plots import write_logs

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What :func:`run_pretrain` produced.

    Attributes:
        output: the output directory.
        checkpoint: the final checkpoint directory (``output/checkpoint``).
        metrics: what ``metrics.json`` holds.
        history: rank 0's training log lines.
    """

    output: Path
    checkpoint: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def _fit(loop: Callable[[LoopInputs], None], cfg: PretrainConfig | AlignConfig, data: Any,
         name: str, dest: str) -> Path:
    """``loop`` on ``cfg.num_workers`` Ray Train workers; the final checkpoint is copied to
    ``output/<dest>``."""
    out = Path(cfg.output).resolve()
    return fit_torch_trainer(loop, cfg.train, cfg.model, data, name=name, out=out,
                             num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                             threads_per_worker=cfg.threads_per_worker,
                             max_failures=cfg.max_failures, dest=out / dest)


def run_pretrain(cfg: PretrainConfig,
                 evaluate: Callable[[Path], dict[str, Any]] | None = None) -> PretrainResult:
    """Contrastive pre-training of the built-in retriever on a built-in world.

    Args:
        cfg: the job config (``cfg.train`` is the loop's).
        evaluate: ``evaluate(checkpoint) -> metrics`` merged into ``metrics.json`` before it
            and the manifest are written (``jobs.pretrain`` passes the held-out evaluation of
            :mod:`aligner.evaluation`, a stage above this one); None: training metrics only.

    Returns:
        The final checkpoint, metrics and training log.
    """
    from aligner.runtime.raycluster import init_ray
    from aligner.training.pretrain import prepare_pretrain_data, pretrain_loop

    started = time.time()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    data = prepare_pretrain_data(cfg)
    init_ray(cfg.ray_address or None)
    t_fit = time.time()
    final = _fit(pretrain_loop, cfg, data, "pretrain", "checkpoint")
    fit_s = time.time() - t_fit
    history = read_history(final / TRAIN_LOG)
    write_logs(history, out, "pretrain")
    metrics: dict[str, Any] = {"train": {"steps": cfg.train.steps, "fit_seconds": round(fit_s, 1),
                                         "images": len(data.images),
                                         "last": history[-1] if history else {}}}
    if evaluate is not None:
        metrics.update(evaluate(final))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_manifest(out, "pretrain", to_dict(cfg), started, inputs={"world": cfg.world},
                   outputs={"checkpoint": "checkpoint/", "metrics": "metrics.json",
                            "log": "train_log.jsonl", "csv": "train_log.csv",
                            "plot": "training.png"},
                   counts={"train_images": len(data.images), "val_images": len(data.val_images)})
    return PretrainResult(out, final, metrics, history)


def align_inputs(cfg: AlignConfig) -> tuple[str, str]:
    """The corpus and queries an align run reads (``<world>/corpus`` and ``<world>/queries``
    unless given), after checking that the inputs exist: the preferences, the corpus, and
    the queries when given (the world's default may be absent: every query is then split by
    a seeded hash). Each is a local path or an ``s3://`` / ``gs://`` URI.

    Raises:
        FileNotFoundError: a missing input, or the bucket of one.
        ValueError: an unsupported URI.
    """
    corpus = cfg.corpus or str(join_path(cfg.world, "corpus"))
    queries = cfg.queries or str(join_path(cfg.world, "queries"))
    require_at(cfg.preferences, "preferences")
    require_at(corpus, "corpus")
    if cfg.queries:
        require_at(cfg.queries, "queries")
    return corpus, queries


def run_align(cfg: AlignConfig) -> dict[str, Any]:
    """Preference fine-tuning of ``cfg.model`` (also the frozen DPO reference).

    Reads ``cfg.preferences``, the corpus and the queries (:func:`align_inputs`: local paths
    or URIs) on the driver only; the Ray Train workers get the prepared arrays
    (:class:`~aligner.training.align.AlignData`) through the object store. Writes
    ``checkpoint/`` (the selected state, ``cfg.train.selection``), ``last/`` (the final
    Ray Train checkpoint) and the logs, metrics and manifest into ``cfg.output`` (a local or
    shared directory).

    Returns:
        What ``metrics.json`` holds (the selected step / alpha, start and selected validation
        metrics, throughput and data counts).
    """
    from aligner.retrieval.models import read_checkpoint_meta
    from aligner.runtime.raycluster import init_ray
    from aligner.training.align import align_loop
    from aligner.training.align_data import prepare_align_data

    started = time.time()
    corpus, queries = align_inputs(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    data, counts = prepare_align_data(
        preferences=cfg.preferences, corpus=corpus, queries=queries, model=cfg.model,
        val_fraction=cfg.val_fraction, seed=cfg.train.seed,
        max_caption_images=cfg.max_caption_images)
    init_ray(cfg.ray_address or None)
    t_fit = time.time()
    last = _fit(align_loop, cfg, data, "align", "last")
    fit_s = time.time() - t_fit
    history = read_history(last / TRAIN_LOG)
    write_logs(history, out, "align")
    chosen = last / "best" if (last / "best").is_dir() else last
    final = out / "checkpoint"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(chosen, final, ignore=shutil.ignore_patterns("best", "train_state.pt"))
    meta = read_checkpoint_meta(final)
    evals = [h for h in history if "val_r@10" in h or "val_pair_acc" in h]
    rates = sorted(h["pairs_per_s"] for h in history if h.get("pairs_per_s"))
    metrics = {"fit_seconds": round(fit_s, 1), "steps": cfg.train.steps,
               "selected_step": meta.get("step"), "selected_alpha": meta.get("alpha", 1.0),
               "selected_by": meta.get("selected_by", "last step"),
               "interpolations": meta.get("interpolations", []),
               "start": evals[0] if evals else {},
               "selected": meta.get("val") or (evals[-1] if evals else {}),
               "last": history[-1] if history else {},
               "pairs_per_s": rates[len(rates) // 2] if rates else None, **counts}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_manifest(out, "align", to_dict(cfg), started,
                   inputs={"preferences": cfg.preferences, "model": to_dict(cfg.model),
                           "world": cfg.world, "corpus": corpus, "queries": queries},
                   outputs={"checkpoint": "checkpoint/", "last": "last/",
                            "log": "train_log.jsonl", "csv": "train_log.csv",
                            "plot": "training.png", "metrics": "metrics.json"},
                   counts=counts)
    _log_align_summary(metrics, cfg)
    return metrics


def _log_align_summary(metrics: dict[str, Any], cfg: AlignConfig) -> None:
    s, e = metrics["start"], metrics["selected"]
    nan = float("nan")
    log.info("validation: DPO loss %.3f -> %.3f, reward accuracy %.3f -> %.3f, pair accuracy "
             "%.3f -> %.3f, recall@10 %.3f -> %.3f (selected step %s of %d, alpha %s)",
             s.get("val_pair_loss", nan), e.get("val_pair_loss", nan),
             s.get("val_pair_reward_acc", nan), e.get("val_pair_reward_acc", nan),
             s.get("val_pair_acc", nan), e.get("val_pair_acc", nan),
             s.get("val_r@10", nan), e.get("val_r@10", nan), metrics["selected_step"],
             cfg.train.steps, metrics["selected_alpha"])
    if cfg.train.pref_weight > 0 and e.get("val_pair_loss", 0.0) >= s.get("val_pair_loss", 1e9):
        log.warning("no validated state beats the starting model on held-out preference pairs "
                    "(DPO loss %.3f vs %.3f at the start): fewer steps, a lower lr or a better "
                    "teacher may help", e.get("val_pair_loss", nan), s.get("val_pair_loss", nan))
