"""Contrastive pre-training of the built-in retriever's image tower (LiT-style, text locked).

The loop runs inside Ray Train workers (``TorchTrainer``; one process per worker, DDP over
gloo on CPU or NCCL on GPU). The locked text transformer's pooled outputs for the finite
caption set are computed once on the driver (:mod:`aligner.retrieval.textcache`) and shipped with the
decoded images through the object store, so a CPU step is the image tower plus a linear
projection. With ``text_unlocked_layers > 0`` the last text layers train too and captions go
through the text tower on every step (slower; no cache).

Loss: the symmetric InfoNCE of CLIP (open_clip's ``ClipLoss``), features gathered across
workers with gradients, so N workers see the same negatives as one worker with the global
batch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aligner.retrieval.metrics import caption_recall
from aligner.retrieval.models import to_pixels
from aligner.training.loop import (
    count_trainable,
    latest_checkpoint_dir,
    load_train_state,
    param_groups,
    quiet_ray_train_logs,
    report,
    save_train_state,
    set_threads,
    warmup_cosine,
    worker_context,
)

log = logging.getLogger(__name__)
TRAIN_LOG = "train_log.jsonl"


@dataclass
class PretrainData:
    """What every worker needs, shipped once through the object store.

    Attributes:
        images: ``[N, H, W, 3]`` uint8 training images.
        text: ``[N, W]`` float32 pooled text features of their captions (locked tower), or
            None when the text tower is partly unlocked (then ``captions`` is used).
        captions: the N captions.
        val_images: ``[M, H, W, 3]`` uint8 validation images.
        val_text: ``[M, W]`` pooled features of the validation captions (or None).
        val_captions: the M validation captions.
    """

    images: np.ndarray
    text: np.ndarray | None
    captions: list[str]
    val_images: np.ndarray
    val_text: np.ndarray | None
    val_captions: list[str]


class ContrastiveTask(torch.nn.Module):
    """Model + how to get normalised features from a batch (open_clip's "task" idea).

    ``forward(images [B,3,H,W], text_pooled [B,W] | None, tokens [B,T] | None)`` returns
    ``(image_features [B,D], text_features [B,D], logit_scale [])``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, text_pooled=None, tokens=None):
        img = self.model.encode_image(images, normalize=True)
        if tokens is not None:
            txt = self.model.encode_text(tokens, normalize=True)
        else:
            txt = F.normalize(self.model.text.proj(text_pooled), dim=-1)
        return img, txt, self.model.logit_scale.exp()


def lock_text_tower(model: torch.nn.Module, unlocked_layers: int) -> None:
    """Freeze the HF text transformer (all of it, or all but its last ``unlocked_layers``)."""
    for p in model.text.transformer.parameters():
        p.requires_grad = False
    if unlocked_layers > 0:
        layers = model.text.transformer.encoder.layer
        for layer in layers[-unlocked_layers:]:
            for p in layer.parameters():
                p.requires_grad = True


def pretrain_loop(cfg: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``: contrastive training of the image tower.

    ``cfg`` keys: data_ref (ObjectRef of :class:`PretrainData`) or data, model (ModelSpec
    fields), steps, batch_size (global), lr, min_lr_ratio, warmup, weight_decay, betas, seed,
    flip, text_unlocked_layers, text_lr_scale, text_proj_lr_scale, eval_every,
    checkpoint_every, threads, grad_clip.
    """
    import ray
    import ray.train.torch
    from open_clip.loss import ClipLoss

    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint

    rank, world = worker_context()
    set_threads(cfg.get("threads"))
    quiet_ray_train_logs()
    data: PretrainData = ray.get(cfg["data_ref"]) if "data_ref" in cfg else cfg["data"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    retriever = load_retriever(ModelSpec(**cfg["model"]), device=device)
    model = retriever.model
    unlocked = int(cfg.get("text_unlocked_layers", 0))
    lock_text_tower(model, unlocked)
    use_tokens = unlocked > 0 or data.text is None
    torch.manual_seed(cfg["seed"] + 1000 * rank)
    task = ray.train.torch.prepare_model(ContrastiveTask(model)) if world > 1 else ContrastiveTask(model).to(device)
    groups = param_groups(task, cfg["weight_decay"])
    if unlocked:
        text_params = {id(p) for p in model.text.transformer.parameters() if p.requires_grad}
        for g in list(groups):
            tp = [p for p in g["params"] if id(p) in text_params]
            if tp:
                g["params"] = [p for p in g["params"] if id(p) not in text_params]
                groups.append({"params": tp, "weight_decay": g["weight_decay"],
                               "lr": cfg["lr"] * cfg.get("text_lr_scale", 0.1)})
    proj_scale = float(cfg.get("text_proj_lr_scale", 1.0))
    proj_params = {id(p) for p in model.text.proj.parameters()}
    if proj_scale != 1.0:
        for g in list(groups):
            pp = [p for p in g["params"] if id(p) in proj_params]
            if pp:
                g["params"] = [p for p in g["params"] if id(p) not in proj_params]
                if proj_scale > 0:
                    groups.append({"params": pp, "weight_decay": g["weight_decay"],
                                   "lr": cfg["lr"] * proj_scale})
        if proj_scale == 0:
            for p in model.text.proj.parameters():
                p.requires_grad = False
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
    steps = int(cfg["steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg["warmup"], steps, cfg.get("min_lr_ratio", 0.0)))
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world)
    history: list[dict] = []
    start = 0
    resume = latest_checkpoint_dir()
    if resume:
        from aligner.retrieval.models import _load_weights_into

        _load_weights_into(model, Path(resume) / "open_clip_model.safetensors",
                           allow_missing_text=True)
        state = load_train_state(Path(resume))
        if state:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = int(state["step"])
        log_file = Path(resume) / TRAIN_LOG
        if log_file.is_file():
            history = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
    mean, std = retriever.preprocess_cfg["mean"], retriever.preprocess_cfg["std"]
    n = len(data.images)
    per_worker = max(1, cfg["batch_size"] // world)
    batches_per_epoch = max(1, n // (per_worker * world))
    val_pixels = to_pixels(data.val_images, mean, std).to(device) if len(data.val_images) else None
    val_text = (torch.from_numpy(data.val_text).to(device)
                if data.val_text is not None and not use_tokens else None)
    trainable = count_trainable(task)
    t_last, seen = time.time(), 0

    def save_fn(d: Path) -> None:
        save_checkpoint(getattr(task, "module", task).model, d, model_cfg=retriever.model_cfg,
                        preprocess_cfg=retriever.preprocess_cfg,
                        meta={"kind": "pretrain", "step": step + 1, "config": _jsonable(cfg)})
        save_train_state(d, opt, sched, step + 1)
        (d / TRAIN_LOG).write_text("".join(json.dumps(h) + "\n" for h in history))

    step = start
    for step in range(start, steps):
        epoch, pos = divmod(step, batches_per_epoch)
        order = np.random.default_rng([cfg["seed"], epoch]).permutation(n)
        lo = (pos * world + rank) * per_worker
        idx = np.sort(order[lo:lo + per_worker])
        gen = torch.Generator().manual_seed(cfg["seed"] * 100_003 + step * 7 + rank)
        flip = (torch.rand(len(idx), generator=gen) < 0.5) if cfg.get("flip", True) else None
        x = to_pixels(data.images[idx], mean, std, flip).to(device)
        task.train()
        if use_tokens:
            tokens = retriever.tokenizer([data.captions[i] for i in idx]).to(device)
            img_f, txt_f, scale = task(x, tokens=tokens)
        else:
            img_f, txt_f, scale = task(x, text_pooled=torch.from_numpy(data.text[idx]).to(device))
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(task.parameters(), cfg["grad_clip"])
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        seen += len(idx) * world
        last = step + 1 == steps
        do_eval = cfg["eval_every"] and ((step + 1) % cfg["eval_every"] == 0 or last)
        do_ckpt = (cfg["checkpoint_every"] and (step + 1) % cfg["checkpoint_every"] == 0) or last
        if not (do_eval or do_ckpt or (step + 1) % cfg.get("log_every", 10) == 0):
            continue
        now = time.time()
        metrics = {"step": step + 1, "epoch": epoch, "loss": float(loss.detach()),
                   "lr": float(sched.get_last_lr()[0]), "logit_scale": float(scale.detach()),
                   "samples_per_s": seen / max(now - t_last, 1e-9), "trainable": trainable}
        t_last, seen = now, 0
        if do_eval and rank == 0 and val_pixels is not None:
            metrics.update(_validate(model, retriever, val_pixels, val_text, data.val_captions))
        if rank == 0:
            history.append(metrics)
            log.info("step %d/%d %s", step + 1, steps,
                     {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        report(metrics, save_fn if do_ckpt else None)


def _validate(model, retriever, val_pixels, val_text, val_captions) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        img = model.encode_image(val_pixels, normalize=True)
        if val_text is not None:
            txt = F.normalize(model.text.proj(val_text), dim=-1)
        else:
            txt = torch.from_numpy(retriever.encode_texts(val_captions)).to(img.device)
    return {f"val_{k}": v for k, v in caption_recall(img, txt).items()}


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("data_ref", "data")}
