"""Cache a locked text transformer's pooled outputs for a finite set of texts.

While the text transformer is locked (LiT-style, image tower trained), a caption's pooled
transformer output never changes: compute it once, keep it on disk, and train only the image
tower and the text projection on top of it. That turns a CPU step that ran MiniLM on every
caption into a matrix multiply. The cache key is the tower's identity plus the exact texts.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aligner.data.io import atomic_write
from aligner.runtime.manifest import file_sha256

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$ALIGNER_CACHE`` or ``~/.cache/aligner``."""
    return Path(os.environ.get("ALIGNER_CACHE", Path.home() / ".cache" / "aligner"))


def tower_id(model) -> str:
    """A stable identity for an HF text tower: its config and weights file hash."""
    text = model.text
    name = getattr(text.config, "_name_or_path", "") or ""
    weights = Path(name) / "model.safetensors"
    digest = file_sha256(weights)[:16] if weights.is_file() else name
    pooler = type(text.pooler).__name__
    return f"{Path(name).name}:{digest}:{pooler}"


def pooled_text_features(model, tokenizer, texts: Sequence[str], batch_size: int = 256,
                         progress: bool = False):
    """Pooled outputs of ``model.text`` (an open_clip HFTextEncoder) before its projection.

    Returns:
        ``[N, W]`` float32 numpy array (W = the transformer width, 384 for MiniLM).
    """
    import torch
    from tqdm import tqdm

    text = model.text
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(texts), batch_size), desc="encode texts", unit="batch",
                      disable=not progress):
            tokens = tokenizer(list(texts[i:i + batch_size]))
            mask = (tokens != text.config.pad_token_id).long()
            out = text.transformer(input_ids=tokens, attention_mask=mask)
            feats.append(text.pooler(out, mask).float().numpy())
    width = int(getattr(text.config, "hidden_size", 0))
    return np.concatenate(feats) if feats else np.zeros((0, width), np.float32)


def cached_pooled_features(model, tokenizer, texts: Sequence[str], progress: bool = True,
                           directory: Path | None = None) -> np.ndarray:
    """:func:`pooled_text_features` with an on-disk cache keyed by tower and texts."""
    h = hashlib.sha256(tower_id(model).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    path = (directory or cache_dir()) / "text" / f"{h.hexdigest()[:24]}.npy"
    if path.is_file():
        arr = np.load(path)
        if arr.shape[0] == len(texts):
            log.info("text features: cache hit (%d texts) %s", len(texts), path)
            return arr
    log.info("text features: encoding %d texts with the locked text tower", len(texts))
    arr = pooled_text_features(model, tokenizer, texts, progress=progress)
    with atomic_write(path) as tmp:
        np.save(tmp, arr)
    return arr
