"""Preference fine-tuning of the retriever (ranked DPO + contrastive term) on Ray Train.

The loop runs inside Ray Train workers (``TorchTrainer``). Everything frozen is computed
once on the driver and shipped through the object store as :class:`AlignData`:

* the pixels of every image a step can touch (preference images, degraded copies made on
  the fly from their originals, caption images, validation images), as one uint8 array;
* the locked text transformer's pooled outputs for queries and captions (LiT-style cache);
* the frozen reference model's similarities ``s_ref(q, w)`` and ``s_ref(q, l)`` per pair,
  so the reference never runs during training.

A step draws ``pairs_per_step`` preference pairs and ``captions_per_step`` image-caption
pairs (global, split over workers), runs the image tower once over the unique images, and
minimises ``pref_weight * ranked_dpo + contrastive_weight * InfoNCE``
(:mod:`aligner.training.losses`), with optional gradient accumulation. Rank 0 validates every
``eval_every`` steps on held-out queries' teacher pairs and held-out captions and keeps the
best state by a rule that never reads the oracle (:func:`better`): the largest held-out
reward margin whose validation recall@10 stays within ``recall_tolerance`` of the start.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import dataclass, field
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
from aligner.training.losses import align_loss, contrastive_loss, ranked_dpo_loss
from aligner.training.pretrain import lock_text_tower

log = logging.getLogger(__name__)
TRAIN_LOG = "train_log.jsonl"
#: Training metrics of a step; the log holds their means over the steps since the last report.
PART_KEYS = ("loss", "pref_loss", "contrastive", "train_pair_acc", "train_margin")
BEST_DIR = "best"


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
        train: training pairs; ``val``: held-out queries' pairs (early stopping).
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


def set_trainable(model: torch.nn.Module, train: str, vision_last_blocks: int = 0,
                  text_unlocked_layers: int = 0) -> None:
    """Choose what trains: ``vision``, ``text`` or ``both``; optionally only the last blocks.

    * vision: the image tower (all of it, or its last ``vision_last_blocks`` transformer
      blocks plus the final norm and projection);
    * text: the text projection, plus the last ``text_unlocked_layers`` text transformer
      layers (0: the transformer stays locked and its outputs are cached);
    * the temperature (logit scale) stays fixed: it defines ``tau`` of the policy.
    """
    if train not in ("vision", "text", "both"):
        raise ValueError("train must be 'vision', 'text' or 'both'")
    for p in model.parameters():
        p.requires_grad = False
    if train in ("vision", "both"):
        visual = model.visual
        if vision_last_blocks > 0:
            blocks = visual.transformer.resblocks
            for block in blocks[-vision_last_blocks:]:
                for p in block.parameters():
                    p.requires_grad = True
            for name, p in visual.named_parameters():
                if name.startswith(("ln_post", "proj")) or name == "proj":
                    p.requires_grad = True
        else:
            for p in visual.parameters():
                p.requires_grad = True
    if train in ("text", "both"):
        if hasattr(model, "text") and hasattr(model.text, "proj"):
            for p in model.text.proj.parameters():
                p.requires_grad = True
            lock_text_tower(model, text_unlocked_layers)
        else:  # a native open_clip text tower: the projection and the last layers
            model.text_projection.requires_grad = True
            for block in model.transformer.resblocks[-max(1, text_unlocked_layers):]:
                for p in block.parameters():
                    p.requires_grad = True


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
        arr = np.concatenate([p for p in pooled]) if pooled else None
        return {"pooled": None if arr is None or not len(arr) else
                torch.from_numpy(arr).to(self.device)}


def sample_rows(n: int, k: int, seed: int, step: int, rank: int, salt: int) -> np.ndarray:
    """``k`` row indices of ``n``, without replacement, different per (step, rank)."""
    if n == 0 or k == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, salt, step, rank])
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def _query_pooled(data: AlignData, pairs: PairSet, rows: np.ndarray):
    return None if data.query_text is None else data.query_text[pairs.query[rows]]


def pair_similarities(task: AlignTask, texts: TextInputs, data: AlignData, pairs: PairSet,
                      rows: np.ndarray, mean, std, device: str):
    """Similarities of the model for ``rows`` of ``pairs``: ``(s_w [P], s_l [P])``."""
    imgs = np.concatenate([pairs.chosen[rows], pairs.rejected[rows]])
    uniq, inv = np.unique(imgs, return_inverse=True)
    feats, qf = task(to_pixels(data.pixels[uniq], mean, std).to(device),
                     **texts([_query_pooled(data, pairs, rows)],
                             [data.query_strings[i] for i in pairs.query[rows]]))
    p = len(rows)
    return (qf * feats[inv[:p]]).sum(-1), (qf * feats[inv[p:]]).sum(-1)


def evaluate_pairs(task: AlignTask, texts: TextInputs, data: AlignData, pairs: PairSet,
                   cfg: dict, mean, std, device: str, batch: int = 256) -> dict[str, float]:
    """Diagnostics of a pair set (no gradients).

    ``pair_loss``: the weighted DPO loss (the objective; log 2 at the reference);
    ``pair_acc``: how often the model's own similarity ranks the chosen image first (the
    reference already gets most semantic-dominance pairs right); ``pair_reward_acc``: how often
    the implicit reward margin ``z`` is positive, i.e. the model moved towards the teacher
    relative to the reference (TRL's ``rewards/accuracies``); ``pair_margin``: mean ``z``.
    """
    if len(pairs) == 0:
        return {}
    task.eval()
    losses, acc, margins = [], [], []
    with torch.no_grad():
        for lo in range(0, len(pairs), batch):
            rows = np.arange(lo, min(lo + batch, len(pairs)))
            s_w, s_l = pair_similarities(task, texts, data, pairs, rows, mean, std, device)
            out = ranked_dpo_loss(s_w, s_l, torch.from_numpy(pairs.ref_chosen[rows]).to(device),
                                  torch.from_numpy(pairs.ref_rejected[rows]).to(device),
                                  cfg["beta"], data.ref_logit_scale, cfg["label_smoothing"])
            losses.append(out.losses)
            acc.append(out.accuracy)
            margins.append(out.margins)
    w = torch.as_tensor(np.array(pairs.weight, dtype=np.float32)).to(device)
    loss, a, m = torch.cat(losses), torch.cat(acc), torch.cat(margins)
    return {"pair_loss": float((loss * w).sum() / w.sum()), "pair_acc": float(a.mean()),
            "pair_reward_acc": float((m > 0).float().mean()), "pair_margin": float(m.mean())}


def validate(task: AlignTask, texts: TextInputs, data: AlignData, cfg: dict, mean, std,
             device: str) -> dict[str, float]:
    """Held-out teacher pairs + held-out caption recall (never the oracle)."""
    out = {f"val_{k}": v for k, v in evaluate_pairs(task, texts, data, data.val, cfg, mean, std,
                                                      device).items()}
    if len(data.val_image):
        task.eval()
        with torch.no_grad():
            img = torch.cat([task.model.encode_image(
                to_pixels(data.pixels[data.val_image[i:i + 512]], mean, std).to(device),
                normalize=True) for i in range(0, len(data.val_image), 512)])
            txt = torch.cat([task.text_features(**texts(
                [None if data.val_text is None else data.val_text[i:i + 512]],
                data.val_captions[i:i + 512])) for i in range(0, len(data.val_image), 512)])
        out.update({f"val_{k}": v for k, v in caption_recall(img, txt).items()})
    return out


def better(candidate: dict, best: dict | None, start: dict, tolerance: float) -> bool:
    """Selection rule (never reads the oracle): spend the recall budget on the teacher.

    Among states whose validation recall@10 is within ``tolerance`` of the starting model's,
    the one that moved furthest towards the teacher on held-out queries wins: the largest
    mean implicit reward margin ``z`` on the validation pairs (lower held-out DPO loss breaks
    ties). The held-out DPO loss itself is a poor guide here: with a noisy teacher (a quarter
    of the grid pairs disagree with the hidden human on the built-in world) it is lowest for
    small moves, whatever they buy. A state beyond the tolerance is never selected while one
    within it exists; among those beyond it, and without validation pairs, the highest
    validation recall@10 wins.
    """
    def ok(m: dict) -> bool:
        return m.get("val_r@10", 1.0) >= start.get("val_r@10", 0.0) - tolerance - 1e-9

    if best is None:
        return True
    if ok(candidate) != ok(best):
        return ok(candidate)
    if ok(candidate) and "val_pair_margin" in candidate:
        return (candidate["val_pair_margin"], -candidate.get("val_pair_loss", 0.0)) > (
            best.get("val_pair_margin", -float("inf")), -best.get("val_pair_loss", 0.0))
    return candidate.get("val_r@10", 0.0) > best.get("val_r@10", 0.0)


def align_loop(cfg: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` for the preference fine-tune.

    ``cfg`` keys: data_ref (ObjectRef of :class:`AlignData`) or data, model (ModelSpec fields of
    the starting checkpoint), steps, pairs_per_step, captions_per_step (global), grad_accum,
    lr, min_lr_ratio, warmup, weight_decay, betas, grad_clip, beta, label_smoothing,
    pref_weight, contrastive_weight, train, vision_last_blocks, text_unlocked_layers,
    text_lr_scale, seed, eval_every, checkpoint_every, log_every, recall_tolerance, threads.
    """
    import ray
    import ray.train.torch

    from aligner.retrieval.models import (
        ModelSpec,
        _load_weights_into,
        load_retriever,
        save_checkpoint,
    )

    rank, world = worker_context()
    set_threads(cfg.get("threads"))
    quiet_ray_train_logs()
    data: AlignData = ray.get(cfg["data_ref"]) if "data_ref" in cfg else cfg["data"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    retriever = load_retriever(ModelSpec(**cfg["model"]), device=device)
    model = retriever.model
    selection = cfg.get("selection", "early_stopping")
    start_state = _trainable_state(model) if selection == "wise" else None  # theta_0
    set_trainable(model, cfg["train"], cfg.get("vision_last_blocks", 0),
                  cfg.get("text_unlocked_layers", 0))
    use_tokens = data.query_text is None or int(cfg.get("text_unlocked_layers", 0)) > 0
    torch.manual_seed(cfg["seed"] + 1000 * rank)
    task = AlignTask(model).to(device)
    ddp = world > 1
    wrapped = ray.train.torch.prepare_model(task) if ddp else task
    opt, groups = _optimizer(model, cfg)
    steps = int(cfg["steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg["warmup"], steps, cfg.get("min_lr_ratio", 0.0)))
    mean, std = retriever.preprocess_cfg["mean"], retriever.preprocess_cfg["std"]
    texts = TextInputs(retriever.tokenizer, use_tokens, device)
    history: list[dict] = []
    start, start_metrics, best, best_state = 0, None, None, None
    wise_rows: list[dict] = []
    resume = latest_checkpoint_dir()
    if resume:
        _load_weights_into(model, Path(resume) / "open_clip_model.safetensors",
                           allow_missing_text=True)
        state = load_train_state(Path(resume))
        if state:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = int(state["step"])
            extra = state.get("extra") or {}
            start_metrics, best = extra.get("start_metrics"), extra.get("best")
            best_state = state.get("best_state")
        log_file = Path(resume) / TRAIN_LOG
        if log_file.is_file():
            history = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
        log.info("rank %d resumed from step %d", rank, start)
    if start_metrics is None and rank == 0 and cfg["eval_every"]:
        start_metrics = {"step": 0, **validate(task, texts, data, cfg, mean, std, device)}
        history.append(start_metrics)
        log.info("start: %s", _fmt(start_metrics))
    accum = max(1, int(cfg.get("grad_accum", 1)))
    pairs_local = max(1, cfg["pairs_per_step"] // (world * accum)) if len(data.train) else 0
    caps_local = (max(2, cfg["captions_per_step"] // (world * accum))
                  if cfg["contrastive_weight"] else 0)
    trainable = count_trainable(model)
    t_last, seen_pairs = time.time(), 0

    def save_fn(d: Path) -> None:
        save_checkpoint(model, d, model_cfg=retriever.model_cfg,
                        preprocess_cfg=retriever.preprocess_cfg,
                        meta={"kind": "align", "step": step + 1, "config": _jsonable(cfg)})
        save_train_state(d, opt, sched, step + 1,
                         extra={"start_metrics": start_metrics, "best": best})
        if best_state is not None:
            state = torch.load(d / "train_state.pt", weights_only=False)
            state["best_state"] = best_state
            torch.save(state, d / "train_state.pt")
            m = copy.deepcopy(model).cpu()
            m.load_state_dict(best_state, strict=False)
            save_checkpoint(m, d / BEST_DIR, model_cfg=retriever.model_cfg,
                            preprocess_cfg=retriever.preprocess_cfg,
                            meta={"kind": "align", "step": best["step"],
                                  "alpha": best.get("alpha", 1.0),
                                  "selected_by": SELECTED_BY[selection], "val": best,
                                  "interpolations": wise_rows,
                                  "start": start_metrics, "config": _jsonable(cfg)})
        (d / TRAIN_LOG).write_text("".join(json.dumps(h) + "\n" for h in history))

    step = start
    interval = dict.fromkeys(PART_KEYS, 0.0)  # sums since the last report (means are logged)
    interval_steps = 0
    for step in range(start, steps):
        task.train()
        opt.zero_grad(set_to_none=True)
        parts = dict.fromkeys(PART_KEYS, 0.0)
        for micro in range(accum):
            sync = micro == accum - 1 or not ddp
            with contextlib.nullcontext() if sync else wrapped.no_sync():
                out, n_pairs = _micro_step(wrapped, texts, data, cfg, step * accum + micro, rank,
                                           pairs_local, caps_local, mean, std, device, ddp, model)
                (out.total / accum).backward()
            parts["loss"] += float(out.total.detach()) / accum
            parts["pref_loss"] += float(out.preference) / accum
            parts["contrastive"] += float(out.contrastive) / accum
            if n_pairs:
                parts["train_pair_acc"] += float(out.pref.accuracy.mean()) / accum
                parts["train_margin"] += float(out.pref.margins.mean()) / accum
            seen_pairs += n_pairs * world
        if cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_([q for g in groups for q in g["params"]],
                                           cfg["grad_clip"])
        opt.step()
        sched.step()
        for k in PART_KEYS:
            interval[k] += parts[k]
        interval_steps += 1
        last = step + 1 == steps
        do_eval = bool(cfg["eval_every"]) and ((step + 1) % cfg["eval_every"] == 0 or last)
        do_ckpt = (cfg["checkpoint_every"] and (step + 1) % cfg["checkpoint_every"] == 0) or last
        if not (do_eval or do_ckpt or (step + 1) % cfg.get("log_every", 10) == 0):
            continue
        now = time.time()
        metrics = {"step": step + 1, **{k: v / interval_steps for k, v in interval.items()},
                   "lr": float(sched.get_last_lr()[0]),
                   "pairs_per_s": seen_pairs / max(now - t_last, 1e-9), "trainable": trainable}
        interval, interval_steps = dict.fromkeys(PART_KEYS, 0.0), 0
        if do_eval and rank == 0:
            metrics.update(validate(task, texts, data, cfg, mean, std, device))
            if selection == "early_stopping" and better(metrics, best, start_metrics or {},
                                                        cfg.get("recall_tolerance", 0.01)):
                best = {k: v for k, v in metrics.items() if k.startswith("val_") or k == "step"}
                best_state = _trainable_state(model)
        if last and rank == 0 and selection != "early_stopping":
            if selection == "wise":
                best, best_state, wise_rows = wise_select(
                    model, start_state, cfg.get("wise_alphas") or [1.0],
                    lambda: validate(task, texts, data, cfg, mean, std, device),
                    start_metrics or {}, cfg.get("recall_tolerance", 0.01), step + 1)
            else:  # last
                best = {k: v for k, v in metrics.items() if k.startswith("val_") or k == "step"}
                best_state = _trainable_state(model)
        if rank == 0:
            history.append(metrics)
            log.info("step %d/%d %s", step + 1, steps, _fmt(metrics))
        report(metrics, save_fn if do_ckpt else None)
        t_last, seen_pairs = time.time(), 0


SELECTED_BY = {
    "early_stopping": "the validated step with the largest val_pair_margin among those whose "
                      "val_r@10 is within recall_tolerance of the starting model",
    "wise": "the weight-space interpolation start + alpha * (final - start) with the largest "
            "val_pair_margin among those whose val_r@10 is within recall_tolerance of the start",
    "last": "the last step",
}


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state dict without the packaged, frozen text transformer."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not k.startswith("text.transformer")}


def interpolate_states(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """``start + alpha * (end - start)`` for floating tensors (WiSE-FT, Wortsman et al. 2022);
    other tensors (counters, ids) are taken from ``end``."""
    return {k: (start[k] + alpha * (v - start[k])) if v.is_floating_point() and k in start
            else v.clone() for k, v in end.items()}


def wise_select(model: torch.nn.Module, start_state: dict, alphas, validate_fn,
                start_metrics: dict, tolerance: float, step: int):
    """Validate the weight-space interpolations between the start and the fine-tuned model and
    pick one with :func:`better` (never the oracle). The model keeps its final weights.

    Returns:
        (selected validation metrics with ``alpha`` and ``step``, its state dict, one row of
        metrics per alpha).
    """
    final = _trainable_state(model)
    rows, best, best_state = [], None, None
    try:
        for alpha in sorted({float(a) for a in alphas}):
            state = interpolate_states(start_state, final, alpha)
            model.load_state_dict(state, strict=False)
            m = {"alpha": alpha, "step": step, **validate_fn()}
            rows.append(m)
            log.info("weight interpolation alpha %.2f: %s", alpha, _fmt(m))
            if better(m, best, start_metrics, tolerance):
                best, best_state = m, state
    finally:
        model.load_state_dict(final, strict=False)
    return best, best_state, rows


def _optimizer(model: torch.nn.Module, cfg: dict):
    """AdamW over the trainable parameters; text parameters at ``text_lr_scale`` x the LR."""
    groups = param_groups(model, cfg["weight_decay"])
    text_params = {id(p) for n, p in model.named_parameters() if n.startswith("text.")}
    for g in list(groups):
        tp = [p for p in g["params"] if id(p) in text_params]
        if tp:
            g["params"] = [p for p in g["params"] if id(p) not in text_params]
            groups.append({"params": tp, "weight_decay": g["weight_decay"],
                           "lr": cfg["lr"] * cfg.get("text_lr_scale", 1.0)})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: check `train` / `vision_last_blocks`")
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"])), groups


def _micro_step(wrapped, texts: TextInputs, data: AlignData, cfg: dict, salt: int, rank: int,
                n_pairs: int, n_caps: int, mean, std, device: str, ddp: bool, model):
    """One forward of a mixed batch: preference pairs + image-caption pairs."""
    pr = data.train
    prow = sample_rows(len(pr), n_pairs, cfg["seed"], salt, rank, 1)
    crow = sample_rows(len(data.caption_image), n_caps, cfg["seed"], salt, rank, 2)
    img_rows = np.concatenate([pr.chosen[prow], pr.rejected[prow], data.caption_image[crow]])
    uniq, inv = np.unique(img_rows, return_inverse=True)
    strings = [data.query_strings[i] for i in pr.query[prow]] + [data.captions[i] for i in crow]
    pooled = [_query_pooled(data, pr, prow),
              None if data.caption_text is None else data.caption_text[crow]]
    feats, txt = wrapped(to_pixels(data.pixels[uniq], mean, std).to(device),
                         **texts(pooled, strings))
    p = len(prow)
    s_w = (txt[:p] * feats[inv[:p]]).sum(-1)
    s_l = (txt[:p] * feats[inv[p:2 * p]]).sum(-1)
    pref = ranked_dpo_loss(s_w, s_l, torch.from_numpy(pr.ref_chosen[prow]).to(device),
                           torch.from_numpy(pr.ref_rejected[prow]).to(device),
                           cfg["beta"], data.ref_logit_scale, cfg["label_smoothing"])
    if len(crow):
        cimg, ctxt = feats[inv[2 * p:]], txt[p:]
        if ddp:
            cimg, ctxt = _gather(cimg), _gather(ctxt)
        con = contrastive_loss(cimg, ctxt, model.logit_scale.exp().detach())
    else:
        con = torch.zeros((), device=device)
    out = align_loss(pref, torch.from_numpy(pr.weight[prow]).to(device), con,
                     cfg["pref_weight"], cfg["contrastive_weight"])
    return out, p


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


def _fmt(m: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("data_ref", "data")}
