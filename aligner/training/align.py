"""Preference fine-tuning of the retriever (ranked DPO + contrastive term) on Ray Train.

The loop is :func:`aligner.training.loop.run_loop` with :class:`AlignSteps`; it runs inside
Ray Train workers (``TorchTrainer``). Everything frozen is computed once on the driver
(:mod:`aligner.training.align_data`) and shipped through the object store as
:class:`AlignData`:

* the pixels of every image a step can touch (preference images, degraded copies made on
  the fly from their originals, caption images, validation images), as one uint8 array;
* the locked text transformer's pooled outputs for queries and captions (LiT-style cache);
* the frozen reference model's similarities ``s_ref(q, w)`` and ``s_ref(q, l)`` per pair,
  so the reference never runs during training.

A step draws ``pairs_per_step`` preference pairs and ``captions_per_step`` image-caption
pairs (global, split over workers; rows from ``[seed, salt, micro-step, rank]``), runs the
image tower once over the unique images, and minimises
``pref_weight * ranked_dpo + contrastive_weight * InfoNCE`` (:mod:`aligner.training.losses`),
with optional gradient accumulation. Rank 0 validates every ``eval_every`` steps on held-out
queries' teacher pairs and held-out captions; :mod:`aligner.training.selection` picks the
output state from those validations (never the oracle): by default the weight interpolation
with the largest validation reward margin among those that pass a non-inferiority test on
validation recall@10 (paired drop vs the start + ``recall_z`` SE <= ``recall_margin``); the
start (alpha 0) always passes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aligner.retrieval.metrics import caption_hits, caption_recall, paired_drop_se
from aligner.retrieval.models import to_pixels
from aligner.training.config import AlignLoopConfig
from aligner.training.loop import (
    LoopInputs,
    LoopSteps,
    Worker,
    fmt,
    lock_text_tower,
    param_groups,
    run_loop,
)
from aligner.training.losses import AlignLossOutput, align_loss, contrastive_loss, ranked_dpo_loss
from aligner.training.selection import SE_KEY, Selection

log = logging.getLogger(__name__)
#: Training metrics of a step; the log holds their means over the steps since the last report.
PART_KEYS = ("loss", "pref_loss", "contrastive", "train_pair_acc", "train_margin")


@dataclass
class PairSet:
    """Preference pairs as indices into :class:`AlignData` arrays (all ``[P]``).

    Attributes:
        query: row of ``AlignData.query_text`` (pooled features) / ``query_strings``.
        chosen: row of ``AlignData.pixels`` of the preferred image.
        rejected: row of ``AlignData.pixels`` of the other image.
        weight: pair weight (float32).
        ref_chosen: ``s_ref(q, chosen)`` under the frozen starting model.
        ref_rejected: ``s_ref(q, rejected)``.
        source: source name index into ``AlignData.sources``.
    """

    query: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    weight: np.ndarray
    ref_chosen: np.ndarray
    ref_rejected: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.query)


@dataclass
class AlignData:
    """Everything the workers need, shipped once.

    Attributes:
        pixels: ``[M, H, W, 3]`` uint8, every image any pair or caption refers to.
        query_text: ``[Q, W]`` float32 pooled (pre-projection) features of the queries, or
            None when text layers are unlocked (then ``query_strings`` go through the tower).
        query_strings: the Q query texts.
        train: training pairs; ``val``: held-out queries' pairs (selection).
        caption_image: ``[C]`` rows of ``pixels`` of the contrastive training images.
        caption_text: ``[C, W]`` pooled features of their captions (or None).
        captions: the C captions.
        val_image: ``[V]`` rows of ``pixels`` of the validation images.
        val_text: ``[V, W]`` pooled features of their captions (or None).
        val_captions: the V validation captions.
        sources: names of the pair sources (``PairSet.source`` indexes it).
        ref_logit_scale: the reference model's ``1 / tau``.
    """

    pixels: np.ndarray
    query_text: np.ndarray | None
    query_strings: list[str]
    train: PairSet
    val: PairSet
    caption_image: np.ndarray
    caption_text: np.ndarray | None
    captions: list[str]
    val_image: np.ndarray
    val_text: np.ndarray | None
    val_captions: list[str]
    sources: list[str] = field(default_factory=list)
    ref_logit_scale: float = 1.0


def set_trainable(model: torch.nn.Module, towers: str, vision_last_blocks: int = 0,
                  text_unlocked_layers: int = 0) -> None:
    """Choose what trains: ``vision``, ``text`` or ``both`` towers; optionally the last blocks.

    * vision: the image tower (all of it, or its last ``vision_last_blocks`` transformer
      blocks plus the final norm and projection);
    * text: the text projection, plus the last ``text_unlocked_layers`` text transformer
      layers (0: the transformer stays locked and its outputs are cached);
    * the temperature (logit scale) stays fixed: it defines ``tau`` of the policy.
    """
    if towers not in ("vision", "text", "both"):
        raise ValueError(f"towers must be 'vision', 'text' or 'both', got {towers!r}")
    for p in model.parameters():
        p.requires_grad = False
    if towers in ("vision", "both"):
        visual = model.visual
        if vision_last_blocks > 0:
            for block in visual.transformer.resblocks[-vision_last_blocks:]:
                for p in block.parameters():
                    p.requires_grad = True
            for name, p in visual.named_parameters():
                if name.startswith(("ln_post", "proj")) or name == "proj":
                    p.requires_grad = True
        else:
            for p in visual.parameters():
                p.requires_grad = True
    if towers in ("text", "both"):
        if hasattr(model, "text") and hasattr(model.text, "proj"):
            for p in model.text.proj.parameters():
                p.requires_grad = True
            lock_text_tower(model, text_unlocked_layers)
        else:  # a native open_clip text tower: the projection and the last layers
            model.text_projection.requires_grad = True
            for block in model.transformer.resblocks[-max(1, text_unlocked_layers):]:
                for p in block.parameters():
                    p.requires_grad = True


def align_param_groups(model: torch.nn.Module, cfg: AlignLoopConfig) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters; text parameters at ``text_lr_scale`` x LR."""
    groups = param_groups(model, cfg.weight_decay, cfg.lr, [("text.", cfg.text_lr_scale)])
    if not groups:
        raise ValueError("nothing to train: check train.towers / train.vision_last_blocks")
    return groups


class AlignTask(torch.nn.Module):
    """Model + how a step gets normalised features (one forward, so DDP sees every parameter).

    ``forward(images [B,3,H,W], pooled [T,W] | None, tokens [T,L] | None)`` returns
    ``(image_features [B,D], text_features [T,D])``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, pooled=None, tokens=None):
        img = self.model.encode_image(images, normalize=True)
        return img, self.text_features(pooled, tokens, like=img)

    def text_features(self, pooled=None, tokens=None, like: torch.Tensor | None = None):
        """Normalised text features from cached pooled outputs or from tokens."""
        if tokens is not None:
            return self.model.encode_text(tokens, normalize=True)
        if pooled is not None:
            return F.normalize(self.model.text.proj(pooled), dim=-1)
        dim = like.shape[-1] if like is not None else 0
        return torch.zeros((0, dim), device=None if like is None else like.device)


class TextInputs:
    """Builds the text half of a forward: cached pooled features or tokens."""

    def __init__(self, tokenizer, use_tokens: bool, device: str) -> None:
        self.tokenizer, self.use_tokens, self.device = tokenizer, use_tokens, device

    def __call__(self, pooled: list[np.ndarray | None], texts: list[str]) -> dict:
        if self.use_tokens or any(p is None for p in pooled):
            return {"tokens": self.tokenizer(texts).to(self.device) if texts else None}
        arr = np.concatenate(list(pooled)) if pooled else None
        return {"pooled": None if arr is None or not len(arr) else
                torch.from_numpy(arr).to(self.device)}


def sample_rows(n: int, k: int, seed: int, step: int, rank: int, salt: int) -> np.ndarray:
    """``k`` row indices of ``n``, without replacement, different per (step, rank)."""
    if n == 0 or k == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, salt, step, rank])
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


class AlignSteps(LoopSteps):
    """The alignment step (mixed preference + caption batch) and its validation/selection.

    Built from plain objects, so one step runs without Ray (a unit test, a benchmark);
    :meth:`from_worker` builds it inside :func:`~aligner.training.loop.run_loop`.

    Args:
        model: the retriever model (its start is the frozen DPO reference).
        data: the shipped :class:`AlignData`.
        cfg: the loop config.
        mean: image normalisation mean (the model's preprocessing).
        std: image normalisation std.
        tokenizer: text tokenizer (only when text goes through the tower).
        device: torch device of the model.
        rank: this worker's rank; ``world``: the number of workers.
        place: ``place(module) -> (module on device, module to call)`` (DDP wrapping).
    """

    kind = "align"
    rate_key = "pairs_per_s"
    mean_keys = PART_KEYS

    def __init__(self, model: torch.nn.Module, data: AlignData, cfg: AlignLoopConfig, *,
                 mean, std, tokenizer=None, device: str = "cpu", rank: int = 0, world: int = 1,
                 place: Callable[[torch.nn.Module], tuple] | None = None) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self.mean, self.std, self.device, self.rank, self.world = mean, std, device, rank, world
        self.selection = Selection(model, cfg.selection, cfg.wise_alphas, self.validate,
                                   margin=cfg.recall_margin, z=cfg.recall_z)
        self.last_hits: np.ndarray | None = None  # the last validation's per-caption r@10
        set_trainable(model, cfg.towers, cfg.vision_last_blocks, cfg.text_unlocked_layers)
        use_tokens = data.query_text is None or cfg.text_unlocked_layers > 0
        task = AlignTask(model)
        self.task, self.wrapped = place(task) if place else (task.to(device), task)
        self.groups = align_param_groups(model, cfg)
        self.texts = TextInputs(tokenizer, use_tokens, device)
        accum = cfg.grad_accum
        self.pairs_local = max(1, cfg.pairs_per_step // (world * accum)) if len(data.train) else 0
        self.caps_local = (max(2, cfg.captions_per_step // (world * accum))
                           if cfg.contrastive_weight else 0)

    @classmethod
    def from_worker(cls, w: Worker) -> AlignSteps:
        r = w.retriever
        return cls(r.model, w.data, w.cfg, mean=r.preprocess_cfg["mean"],
                   std=r.preprocess_cfg["std"], tokenizer=r.tokenizer, device=w.device,
                   rank=w.rank, world=w.world, place=w.place)

    def micro_step(self, salt: int) -> tuple[AlignLossOutput, int]:
        """One forward of a mixed batch (preference pairs + image-caption pairs) drawn with
        ``salt`` (the global micro-step); returns the losses and the number of pairs."""
        data, cfg, pr, device = self.data, self.cfg, self.data.train, self.device
        prow = sample_rows(len(pr), self.pairs_local, cfg.seed, salt, self.rank, 1)
        crow = sample_rows(len(data.caption_image), self.caps_local, cfg.seed, salt, self.rank, 2)
        img_rows = np.concatenate([pr.chosen[prow], pr.rejected[prow], data.caption_image[crow]])
        uniq, inv = np.unique(img_rows, return_inverse=True)
        strings = ([data.query_strings[i] for i in pr.query[prow]]
                   + [data.captions[i] for i in crow])
        pooled = [self._query_pooled(pr, prow),
                  None if data.caption_text is None else data.caption_text[crow]]
        feats, txt = self.wrapped(to_pixels(data.pixels[uniq], self.mean, self.std).to(device),
                                  **self.texts(pooled, strings))
        p = len(prow)
        s_w = (txt[:p] * feats[inv[:p]]).sum(-1)
        s_l = (txt[:p] * feats[inv[p:2 * p]]).sum(-1)
        pref = ranked_dpo_loss(s_w, s_l, torch.from_numpy(pr.ref_chosen[prow]).to(device),
                               torch.from_numpy(pr.ref_rejected[prow]).to(device),
                               cfg.beta, data.ref_logit_scale, cfg.label_smoothing)
        if len(crow):
            cimg, ctxt = feats[inv[2 * p:]], txt[p:]
            if self.world > 1:
                cimg, ctxt = _gather(cimg), _gather(ctxt)
            con = contrastive_loss(cimg, ctxt, self.model.logit_scale.exp().detach())
        else:
            con = torch.zeros((), device=device)
        out = align_loss(pref, torch.from_numpy(pr.weight[prow]).to(device), con,
                         cfg.pref_weight, cfg.contrastive_weight)
        return out, p

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        """``grad_accum`` micro-steps (DDP syncs on the last); returns the step's loss parts
        and the number of pairs seen by all workers."""
        accum = self.cfg.grad_accum
        self.task.train()
        parts = dict.fromkeys(PART_KEYS, 0.0)
        seen = 0
        for micro in range(accum):
            sync = micro == accum - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                out, n_pairs = self.micro_step(step * accum + micro)
                (out.total / accum).backward()
            parts["loss"] += float(out.total.detach()) / accum
            parts["pref_loss"] += float(out.preference) / accum
            parts["contrastive"] += float(out.contrastive) / accum
            if n_pairs:
                parts["train_pair_acc"] += float(out.pref.accuracy.mean()) / accum
                parts["train_margin"] += float(out.pref.margins.mean()) / accum
            seen += n_pairs * self.world
        return parts, seen

    def _query_pooled(self, pairs: PairSet, rows: np.ndarray):
        q = self.data.query_text
        return None if q is None else q[pairs.query[rows]]

    def evaluate_pairs(self, pairs: PairSet, batch: int = 256) -> dict[str, float]:
        """Diagnostics of a pair set (no gradients).

        ``pair_loss``: the weighted DPO loss (the objective; log 2 at the reference);
        ``pair_acc``: how often the model's own similarity ranks the chosen image first (the
        reference already gets most semantic-dominance pairs right); ``pair_reward_acc``: how
        often the implicit reward margin ``z`` is positive, i.e. the model moved towards the
        teacher relative to the reference (TRL's ``rewards/accuracies``); ``pair_margin``:
        mean ``z``.
        """
        if len(pairs) == 0:
            return {}
        cfg, device, data = self.cfg, self.device, self.data
        self.task.eval()
        losses, acc, margins = [], [], []
        with torch.no_grad():
            # every image once (pairs of one query share their pool), then each batch's
            # queries against the features it needs
            uniq = np.unique(np.concatenate([pairs.chosen, pairs.rejected]))
            feats = torch.cat([self.model.encode_image(
                to_pixels(data.pixels[uniq[i:i + 512]], self.mean, self.std).to(device),
                normalize=True) for i in range(0, len(uniq), 512)])
            for lo in range(0, len(pairs), batch):
                rows = np.arange(lo, min(lo + batch, len(pairs)))
                qf = self.task.text_features(**self.texts(
                    [self._query_pooled(pairs, rows)],
                    [data.query_strings[i] for i in pairs.query[rows]]))
                s_w = (qf * feats[np.searchsorted(uniq, pairs.chosen[rows])]).sum(-1)
                s_l = (qf * feats[np.searchsorted(uniq, pairs.rejected[rows])]).sum(-1)
                out = ranked_dpo_loss(
                    s_w, s_l, torch.from_numpy(pairs.ref_chosen[rows]).to(device),
                    torch.from_numpy(pairs.ref_rejected[rows]).to(device), cfg.beta,
                    self.data.ref_logit_scale, cfg.label_smoothing)
                losses.append(out.losses)
                acc.append(out.accuracy)
                margins.append(out.margins)
        w = torch.as_tensor(np.array(pairs.weight, dtype=np.float32)).to(device)
        loss, a, m = torch.cat(losses), torch.cat(acc), torch.cat(margins)
        return {"pair_loss": float((loss * w).sum() / w.sum()), "pair_acc": float(a.mean()),
                "pair_reward_acc": float((m > 0).float().mean()), "pair_margin": float(m.mean())}

    def validate(self) -> dict[str, float]:
        """Held-out teacher pairs + held-out caption recall (never the oracle)."""
        data, mean, std = self.data, self.mean, self.std
        out = {f"val_{k}": v for k, v in self.evaluate_pairs(data.val).items()}
        if len(data.val_image):
            self.task.eval()
            with torch.no_grad():
                img = torch.cat([self.model.encode_image(
                    to_pixels(data.pixels[data.val_image[i:i + 512]], mean, std).to(self.device),
                    normalize=True) for i in range(0, len(data.val_image), 512)])
                txt = torch.cat([self.task.text_features(**self.texts(
                    [None if data.val_text is None else data.val_text[i:i + 512]],
                    data.val_captions[i:i + 512])) for i in range(0, len(data.val_image), 512)])
            out.update({f"val_{k}": v for k, v in caption_recall(img, txt).items()})
            self.last_hits = caption_hits(img, txt, 10)
            start_hits = self.selection.start_hits
            if start_hits is not None and len(start_hits) == len(self.last_hits):
                out[SE_KEY] = paired_drop_se(start_hits, self.last_hits)
        return out

    def begin(self, history: list[dict[str, Any]]) -> None:
        """Validate the starting model once (the reference of the non-inferiority test)."""
        if self.selection.start_metrics is None and self.cfg.eval_every:
            start = {"step": 0, **self.validate()}
            self.selection.set_start(start, self.last_hits)
            history.append(start)
            log.info("start: %s", fmt(start))

    def select(self, metrics: dict[str, Any], evaluated: bool, last: bool) -> None:
        self.selection.update(metrics, evaluated, last)

    def state(self) -> dict[str, Any]:
        return self.selection.state()

    def restore(self, extra: dict[str, Any]) -> None:
        self.selection.restore(extra)

    def save_extra(self, directory: Path, write: Callable[..., None]) -> None:
        self.selection.save(directory, write)


def align_loop(inputs: LoopInputs) -> None:
    """Ray Train ``train_loop_per_worker`` for the preference fine-tune.

    ``inputs.train`` is an :class:`~aligner.training.config.AlignLoopConfig`; ``inputs.data``
    an :class:`AlignData` (or its ObjectRef); ``inputs.model`` the starting checkpoint.
    """
    run_loop(inputs, AlignSteps.from_worker)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``[B, D]`` features; gradients flow to the local slice only (open_clip's
    default, ``gather_with_grad=False``): each rank's loss sees every rank's features as
    negatives, and DDP averages the gradients."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.detach().contiguous())
    gathered[dist.get_rank()] = x
    return torch.cat(gathered)
