"""Contrastive pre-training of the built-in retriever's image tower (LiT-style, text locked).

The loop is :func:`aligner.training.loop.run_loop` with :class:`PretrainSteps`: it runs
inside Ray Train workers (``TorchTrainer``; one process per worker, DDP over gloo on CPU or
NCCL on GPU). The locked text transformer's pooled outputs for the finite caption set are
computed once on the driver (:mod:`aligner.retrieval.textcache`) and shipped with the decoded
images through the object store, so a CPU step is the image tower plus a linear projection.
With ``text_unlocked_layers > 0`` the last text layers train too and captions go through the
text tower on every step (slower; no cache).

Loss: the symmetric InfoNCE of CLIP (open_clip's ``ClipLoss``), features gathered across
workers with gradients, so N workers see the same negatives as one worker with the global
batch. A step's batch is a slice of a per-epoch permutation (``[seed, epoch]``), with
horizontal flips drawn from ``seed * 100003 + step * 7 + rank``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from aligner.retrieval.metrics import caption_recall
from aligner.retrieval.models import to_pixels
from aligner.training.config import PretrainConfig, PretrainLoopConfig
from aligner.training.loop import (
    LoopInputs,
    LoopSteps,
    Worker,
    lock_text_tower,
    param_groups,
    run_loop,
)

log = logging.getLogger(__name__)

__all__ = ["ContrastiveTask", "PretrainData", "PretrainSteps", "prepare_pretrain_data",
           "pretrain_loop"]


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
        ids, val_ids: the images' ids (train split; val split): test-split images never
            reach pre-training.
    """

    images: np.ndarray
    text: np.ndarray | None
    captions: list[str]
    val_images: np.ndarray
    val_text: np.ndarray | None
    val_captions: list[str]
    ids: list[str] = field(default_factory=list)
    val_ids: list[str] = field(default_factory=list)


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


class PretrainSteps(LoopSteps):
    """The pre-training step (one InfoNCE batch) and its validation (caption recall).

    Parameter groups: the text projection at ``text_proj_lr_scale`` x the LR (0: frozen),
    unlocked text layers at ``text_lr_scale``; the gradient norm is clipped over the
    parameters in module order.
    """

    kind = "pretrain"
    rate_key = "samples_per_s"

    def __init__(self, w: Worker) -> None:
        from open_clip.loss import ClipLoss

        cfg: PretrainLoopConfig = w.cfg
        self.cfg, self.rank, self.world, self.device = cfg, w.rank, w.world, w.device
        self.data: PretrainData = w.data
        self.retriever = w.retriever
        self.model = model = w.retriever.model
        lock_text_tower(model, cfg.text_unlocked_layers)
        self.use_tokens = cfg.text_unlocked_layers > 0 or self.data.text is None
        self.task, self.wrapped = w.place(ContrastiveTask(model))
        rules = [("text.transformer.", cfg.text_lr_scale)] if cfg.text_unlocked_layers else []
        if cfg.text_proj_lr_scale != 1.0:
            rules.append(("text.proj.", cfg.text_proj_lr_scale))
        self.groups = param_groups(self.task, cfg.weight_decay, cfg.lr, rules, root=model)
        self.loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=w.rank,
                                world_size=w.world)
        self.mean, self.std = w.retriever.preprocess_cfg["mean"], w.retriever.preprocess_cfg["std"]
        n = len(self.data.images)
        self.per_worker = max(1, cfg.batch_size // w.world)
        self.batches_per_epoch = max(1, n // (self.per_worker * w.world))
        self.val_pixels = (to_pixels(self.data.val_images, self.mean, self.std).to(w.device)
                           if len(self.data.val_images) else None)
        self.val_text = (torch.from_numpy(self.data.val_text).to(w.device)
                         if self.data.val_text is not None and not self.use_tokens else None)

    def clip_parameters(self):
        return list(self.task.parameters())

    def batch(self, step: int) -> tuple[int, np.ndarray, torch.Tensor | None]:
        """(epoch, sorted rows of this worker's slice, flips) of optimizer step ``step``."""
        cfg = self.cfg
        epoch, pos = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.data.images))
        lo = (pos * self.world + self.rank) * self.per_worker
        idx = np.sort(order[lo:lo + self.per_worker])
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step * 7 + self.rank)
        flip = (torch.rand(len(idx), generator=gen) < 0.5) if cfg.flip else None
        return epoch, idx, flip

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        epoch, idx, flip = self.batch(step)
        data = self.data
        x = to_pixels(data.images[idx], self.mean, self.std, flip).to(self.device)
        self.task.train()
        if self.use_tokens:
            tokens = self.retriever.tokenizer([data.captions[i] for i in idx]).to(self.device)
            img_f, txt_f, scale = self.wrapped(x, tokens=tokens)
        else:
            img_f, txt_f, scale = self.wrapped(
                x, text_pooled=torch.from_numpy(data.text[idx]).to(self.device))
        loss = self.loss_fn(img_f, txt_f, scale)
        loss.backward()
        return ({"epoch": epoch, "loss": float(loss.detach()),
                 "logit_scale": float(scale.detach())}, len(idx) * self.world)

    def after_update(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, np.log(100))

    def validate(self) -> dict[str, float]:
        if self.val_pixels is None:
            return {}
        model = self.model
        model.eval()
        with torch.no_grad():
            img = model.encode_image(self.val_pixels, normalize=True)
            if self.val_text is not None:
                txt = F.normalize(model.text.proj(self.val_text), dim=-1)
            else:
                txt = torch.from_numpy(
                    self.retriever.encode_texts(self.data.val_captions)).to(img.device)
        return {f"val_{k}": v for k, v in caption_recall(img, txt).items()}


def pretrain_loop(inputs: LoopInputs) -> None:
    """Ray Train ``train_loop_per_worker``: contrastive training of the image tower.

    ``inputs.train`` is a :class:`~aligner.training.config.PretrainLoopConfig`;
    ``inputs.data`` a :class:`PretrainData` (or its ObjectRef).
    """
    run_loop(inputs, PretrainSteps)


def prepare_pretrain_data(cfg: PretrainConfig) -> PretrainData:
    """Decode the world's natural train/val images and cache the locked text tower's features.

    Gallery images (rendered for the dense val / test galleries) are left out: the validation
    curve reads the natural val images only (docs/evaluation.md, section 1).
    """
    from aligner.data.images import decode_batch
    from aligner.retrieval.models import load_retriever
    from aligner.retrieval.textcache import cached_pooled_features
    from aligner.world import World

    world = World(cfg.world)
    train = world.corpus(["id", "image", "caption"], split="train", galleries=False)
    if cfg.max_train_images:
        train = train.slice(0, cfg.max_train_images)
    val = world.corpus(["id", "image", "caption"], split="val", galleries=False)
    t0 = time.time()
    images = decode_batch(train["image"].to_pylist())
    val_images = decode_batch(val["image"].to_pylist())
    captions, val_captions = train["caption"].to_pylist(), val["caption"].to_pylist()
    log.info("decoded %d train + %d val images in %.1f s", len(images), len(val_images),
             time.time() - t0)
    text = val_text = None
    if cfg.train.text_unlocked_layers == 0:
        r = load_retriever(cfg.model, device="cpu")
        if not hasattr(r.model, "text") or not hasattr(r.model.text, "transformer"):
            raise ValueError("text-feature caching needs an HF text tower (the built-in model)")
        feats = cached_pooled_features(r.model, r.tokenizer, captions + val_captions)
        text, val_text = feats[:len(captions)], feats[len(captions):]
    return PretrainData(images, text, captions, val_images, val_text, val_captions,
                        train["id"].to_pylist(), val["id"].to_pylist())
