"""Model test helpers: an untrained built-in checkpoint and a copy whose image tower is
perturbed (a stand-in "aligned" model with the same text tower), both built in code."""

from __future__ import annotations

from pathlib import Path


def base_and_perturbed(directory: Path, seed: int, scale: float = 0.05,
                       names: tuple[str, str] = ("base", "aligned")) -> tuple[Path, Path]:
    """Save the untrained built-in retriever as ``directory/names[0]`` and a copy with
    ``scale``-sized Gaussian noise (``seed``) on every image-tower weight as
    ``directory/names[1]``; returns both checkpoint paths."""
    import torch

    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint

    r = load_retriever(ModelSpec(), device="cpu")
    save_checkpoint(r, directory / names[0])
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in r.model.visual.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    save_checkpoint(r, directory / names[1])
    return directory / names[0], directory / names[1]
