"""An ImageReward-style reward model on a CLIP backbone, with ImageReward's API, batched.

Architecture:

* **backbone**: any retriever this project loads (the built-in one or an open_clip model),
  with the bottom ``freeze_fraction`` of each tower's layers frozen (:func:`freeze_bottom`;
  ImageReward freezes 70%). The built-in retriever's text transformer is the locked,
  packaged MiniLM (LiT-style) and stays frozen whatever the fraction; its projection trains.
* **joint features** of a (prompt, image): ``sqrt(D) * [i, t, sqrt(D) * i * t]`` from the
  normalised image and text embeddings ``i``, ``t`` (:func:`joint_features`): both embeddings
  and their element-wise product, whose sum is the cosine similarity, each part scaled to
  entries of order one. A dual encoder has no cross-attention, so the product carries the
  interaction that ImageReward's BLIP cross-attention provides.
* **head**: ImageReward's MLP shape ``3D -> 1024 -> 128 -> 64 -> 16 -> 1`` with its dropouts
  (0.2, 0.2, 0.1) (:class:`RewardHead`); ImageReward's layers are linear; ``activation="gelu"``
  puts a GELU after each hidden layer.
* **scores** are normalised: ``(raw - mean) / std`` with the mean and standard deviation of the
  raw rewards over the training items, stored in ``reward.json``, so a score reads as
  standard deviations above the average training (prompt, image) - about N(0, 1).

A reward checkpoint directory is a retriever checkpoint (:func:`~aligner.retrieval.models.
save_checkpoint` layout, so the backbone loads as a retriever too) plus ``reward_head.
safetensors`` and ``reward.json``. :class:`RewardModel` is the inference API ImageReward's users
know - ``RewardModel.load(path)``, ``.score(prompt, images)``, ``.inference_rank(prompt,
images)`` - with the images encoded in batches rather than one at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HEAD_FILE = "reward_head.safetensors"
REWARD_FILE = "reward.json"
HIDDEN = (1024, 128, 64, 16)
DROPOUT = (0.2, 0.2, 0.1, 0.0)
ACTIVATIONS = ("none", "gelu")


@dataclass(frozen=True)
class HeadSpec:
    """The head's shape: input width (3 x embedding dim), hidden widths, activation."""

    in_dim: int
    hidden: tuple[int, ...] = HIDDEN
    activation: str = "none"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")


class RewardHead(torch.nn.Module):
    """ImageReward's MLP: ``in -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropouts 0.2/0.2/0.1."""

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = spec.in_dim
        for i, h in enumerate(spec.hidden):
            layers.append(torch.nn.Linear(width, h))
            if spec.activation == "gelu":
                layers.append(torch.nn.GELU())
            p = DROPOUT[i] if i < len(DROPOUT) else 0.0
            if p:
                layers.append(torch.nn.Dropout(p))
            width = h
        layers.append(torch.nn.Linear(width, 1))
        self.layers = torch.nn.Sequential(*layers)
        for m in self.layers:  # ImageReward's init: N(0, 1 / (in + 1))
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features + 1))
                torch.nn.init.zeros_(m.bias)

    def forward(self, joint: torch.Tensor) -> torch.Tensor:
        return self.layers(joint).squeeze(-1)


@dataclass
class PairIndex:
    """Preference pairs as indices: ``query`` into a list of queries, ``chosen`` /
    ``rejected`` into an image array, ``weight`` per pair (all ``[P]``). The reward trainer
    (``aligner.training.reward_data``) and the head fit (:mod:`aligner.reward.head_fit`) share
    it."""

    query: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.query)

    def subset(self, rows: np.ndarray) -> PairIndex:
        return PairIndex(self.query[rows], self.chosen[rows], self.rejected[rows],
                         self.weight[rows])


def joint_features(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """``sqrt(D) * [i, t, sqrt(D) * i * t]`` of normalised ``[B, D]`` embeddings -> ``[B, 3D]``."""
    d = math.sqrt(img.shape[-1])
    return d * torch.cat([img, txt, d * img * txt], dim=-1)


def _blocks(tower: Any) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """(stem modules / parameters' owners below the blocks, the transformer blocks) of a tower."""
    if hasattr(tower, "transformer") and hasattr(tower.transformer, "resblocks"):
        stem = [m for m in (getattr(tower, n, None) for n in
                            ("conv1", "ln_pre", "token_embedding", "patch_dropout")) if m is not None]
        return stem, list(tower.transformer.resblocks)
    if hasattr(tower, "transformer") and hasattr(tower.transformer, "encoder"):  # HF text
        return [tower.transformer.embeddings], list(tower.transformer.encoder.layer)
    raise ValueError(f"cannot find the transformer blocks of {type(tower).__name__}")


def freeze_bottom(model: Any, fraction: float, builtin_text_locked: bool = True) -> dict[str, int]:
    """Freeze the stem and the bottom ``floor(fraction * layers)`` blocks of each tower.

    The image tower is ``model.visual``; the text tower is ``model.text`` (an HF encoder) or the
    CLIP text transformer on the model itself. The logit scale is frozen (the reward does not
    use it). With ``builtin_text_locked`` an HF text transformer is frozen whole (the built-in
    retriever's packaged MiniLM, whose weights a checkpoint does not store).

    Returns:
        Frozen block counts per tower: ``{"image": k, "image_of": L, "text": k, "text_of": L}``.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"freeze_fraction must be in [0, 1], got {fraction}")
    out: dict[str, int] = {}
    towers = {"image": model.visual,
              "text": model.text if hasattr(model, "text") else model}
    for name, tower in towers.items():
        stem, blocks = _blocks(tower)
        hf_locked = name == "text" and builtin_text_locked and hasattr(tower, "transformer") \
            and hasattr(tower.transformer, "encoder")
        k = len(blocks) if hf_locked else int(math.floor(fraction * len(blocks) + 1e-9))
        if k > 0 or hf_locked:
            for m in stem:
                for p in m.parameters():
                    p.requires_grad = False
            for n in ("class_embedding", "positional_embedding"):
                p = getattr(tower, n, None)
                if isinstance(p, torch.nn.Parameter):
                    p.requires_grad = False
        for b in blocks[:k]:
            for p in b.parameters():
                p.requires_grad = False
        out[name], out[f"{name}_of"] = k, len(blocks)
    if isinstance(getattr(model, "logit_scale", None), torch.nn.Parameter):
        model.logit_scale.requires_grad = False
    return out


class RewardNet(torch.nn.Module):
    """Backbone + head as one module (what training wraps in DDP).

    ``forward(pixels [U,3,H,W], q_index [B], text_pooled [Q,W] | None, tokens [Q,T] | None,
    img_index [B] | None)`` returns raw rewards ``[B]``: row ``b`` scores image
    ``img_index[b]`` (``b`` when None) with query ``q_index[b]``.
    """

    def __init__(self, backbone: torch.nn.Module, head: RewardHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def text_features(self, text_pooled: torch.Tensor | None = None,
                      tokens: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is not None:
            return self.backbone.encode_text(tokens, normalize=True)
        return F.normalize(self.backbone.text.proj(text_pooled), dim=-1)

    def forward(self, pixels: torch.Tensor, q_index: torch.Tensor,
                text_pooled: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None,
                img_index: torch.Tensor | None = None) -> torch.Tensor:
        img = self.backbone.encode_image(pixels, normalize=True)
        if img_index is not None:  # pixels holds each image once; rows pick them
            img = img[img_index]
        txt = self.text_features(text_pooled, tokens)
        return self.head(joint_features(img, txt[q_index]))


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """ImageReward's pairwise loss ``-log sigmoid(r_w - r_l)``, weighted mean over pairs."""
    per = -F.logsigmoid(r_chosen - r_rejected)
    if weights is None:
        return per.mean()
    return (per * weights).sum() / weights.sum().clamp_min(1e-12)


@dataclass
class Normalisation:
    """``score = (raw - mean) / std`` over ``n`` training items."""

    mean: float = 0.0
    std: float = 1.0
    n: int = 0

    @classmethod
    def fit(cls, raw: np.ndarray) -> Normalisation:
        raw = np.asarray(raw, np.float64)
        if raw.size < 2:
            raise ValueError("normalisation needs at least two rewards")
        return cls(float(raw.mean()), float(max(raw.std(), 1e-8)), int(raw.size))


def save_reward_parts(directory: str | Path, head: RewardHead, spec: HeadSpec,
                      norm: Normalisation, extra: dict[str, Any] | None = None) -> None:
    """Write ``reward_head.safetensors`` and ``reward.json`` into a backbone checkpoint dir."""
    from safetensors.torch import save_file

    from aligner.data.io import atomic_write, atomic_write_text

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    head = getattr(head, "module", head)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_write(d / HEAD_FILE) as tmp:
        save_file(state, str(tmp))
    record = {"head": {**asdict(spec), "hidden": list(spec.hidden)},
              "normalisation": asdict(norm),
              "joint": "sqrt(D) * [i, t, sqrt(D) * i * t]",
              "loss": "-log sigmoid(r_w - r_l)", **(extra or {})}
    atomic_write_text(d / REWARD_FILE, json.dumps(record, indent=2, default=str))


ImageLike = Image.Image | np.ndarray | bytes | str | Path


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a PIL image, an ``[H, W, 3]`` uint8 array, encoded bytes or a path.

    Raises:
        ValueError: an array of the wrong shape, bytes or a file that is not an image.
        FileNotFoundError: a path that does not exist.
    """
    from aligner.data.images import decode_image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be [H, W, 3] uint8, got {image.shape} "
                             f"{image.dtype}")
        return Image.fromarray(image)
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image)).convert("RGB")
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise FileNotFoundError(f"image file {p} does not exist")
        return decode_image(p.read_bytes()).convert("RGB")
    raise ValueError(f"cannot read an image from {type(image).__name__}")


class RewardModel:
    """A trained reward model for inference (ImageReward's API, batched).

    ``score(prompt, image) -> float`` for one image, ``score(prompt, images) -> list[float]``
    for a list; ``inference_rank(prompt, images) -> (ranks, rewards)`` with ``ranks[i]`` the
    1-based rank of image ``i`` (1 = best), as ImageReward returns them. Scores are normalised
    (about N(0, 1) over the training items; see the module docstring).
    """

    def __init__(self, retriever: Any, head: RewardHead, spec: HeadSpec, norm: Normalisation,
                 record: dict[str, Any] | None = None) -> None:
        self.retriever = retriever
        self.head = head.to(retriever.device).eval()
        self.spec = spec
        self.norm = norm
        self.record = record or {}

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> RewardModel:
        """Load a reward checkpoint directory (``jobs.train_reward``'s ``checkpoint/``).

        Raises:
            FileNotFoundError: no such directory, or one without ``reward.json`` (a plain
                retriever checkpoint is not a reward model).
        """
        from safetensors.torch import load_file

        from aligner.retrieval.models import load_checkpoint

        d = Path(path)
        if not (d / REWARD_FILE).is_file() or not (d / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a reward-model checkpoint (no {REWARD_FILE} "
                                    f"and {HEAD_FILE}; train one with jobs.train_reward)")
        record = json.loads((d / REWARD_FILE).read_text())
        h = record["head"]
        spec = HeadSpec(int(h["in_dim"]), tuple(h["hidden"]), h.get("activation", "none"))
        retriever = load_checkpoint(d, device=device)
        head = RewardHead(spec)
        head.load_state_dict(load_file(str(d / HEAD_FILE)))
        return cls(retriever, head, spec, Normalisation(**record["normalisation"]), record)

    @property
    def name(self) -> str:
        return f"reward:{self.retriever.checkpoint_hash}"

    def encode_images(self, images: Sequence[ImageLike], batch_size: int = 64) -> np.ndarray:
        """Images -> the backbone's normalised ``[N, D]`` embeddings (batched)."""
        out = []
        for i in range(0, len(images), batch_size):
            pil = [to_pil(im) for im in images[i:i + batch_size]]
            out.append(self.retriever.encode_pil(pil, batch_size))
        return np.concatenate(out) if out else np.zeros((0, self.retriever.embed_dim), np.float32)

    def encode_pixels(self, pixels_u8: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """``[N, H, W, 3]`` uint8 images already at the model's size -> ``[N, D]``."""
        from aligner.retrieval.models import to_pixels

        pre = self.retriever.preprocess_cfg
        out = [self.retriever.encode_images(to_pixels(pixels_u8[i:i + batch_size],
                                                      pre.get("mean"), pre.get("std")))
               for i in range(0, len(pixels_u8), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.retriever.embed_dim), np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Prompts -> normalised ``[Q, D]`` text embeddings."""
        return self.retriever.encode_texts(list(texts))

    def rewards_from_features(self, text_emb: np.ndarray, image_emb: np.ndarray) -> np.ndarray:
        """Normalised rewards of row-aligned ``[N, D]`` text and image embeddings -> ``[N]``."""
        t = torch.as_tensor(np.asarray(text_emb, np.float32), device=self.retriever.device)
        i = torch.as_tensor(np.asarray(image_emb, np.float32), device=self.retriever.device)
        if t.shape != i.shape:
            raise ValueError(f"text {tuple(t.shape)} and image {tuple(i.shape)} embeddings differ")
        with torch.no_grad():
            raw = self.head(joint_features(i, t)).float().cpu().numpy()
        return ((raw - self.norm.mean) / self.norm.std).astype(np.float64)

    def score_batch(self, prompts: Sequence[str], images: Sequence[ImageLike],
                    batch_size: int = 64) -> np.ndarray:
        """Rewards of row-aligned prompts and images (each prompt encoded once) -> ``[N]``."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        uniq = sorted(set(prompts))
        pos = {p: k for k, p in enumerate(uniq)}
        txt = self.encode_texts(uniq)[[pos[p] for p in prompts]]
        return self.rewards_from_features(txt, self.encode_images(images, batch_size))

    def score(self, prompt: str, images: ImageLike | Sequence[ImageLike],
              batch_size: int = 64) -> float | list[float]:
        """ImageReward's ``score``: a float for one image, a list for a list (batched)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            return []
        r = self.score_batch([prompt] * len(batch), batch, batch_size)
        return float(r[0]) if single else [float(x) for x in r]

    def inference_rank(self, prompt: str, images: Sequence[ImageLike],
                       batch_size: int = 64) -> tuple[list[int], list[float]]:
        """ImageReward's ``inference_rank``: ``(ranks, rewards)``, ``ranks[i]`` the 1-based rank
        of image ``i`` (1 = highest reward; ties keep the input order)."""
        rewards = np.asarray(self.score(prompt, list(images), batch_size), np.float64)
        order = np.argsort(-rewards, kind="stable")
        ranks = np.empty(len(rewards), np.int64)
        ranks[order] = np.arange(1, len(rewards) + 1)
        return ranks.tolist(), rewards.tolist()
