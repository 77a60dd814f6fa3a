"""Training logs on disk: ``train_log.jsonl`` / ``.csv`` and the ``training.png`` plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def write_logs(history: list[dict[str, Any]], out: Path, kind: str) -> None:
    """``train_log.jsonl``, ``train_log.csv`` and ``training.png`` from rank 0's history.

    Args:
        history: the metrics lines (one per logged step).
        out: the output directory.
        kind: ``pretrain``, ``align`` or ``reward`` (which plot).
    """
    (out / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "step", k))
    with open(out / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    if history:
        plot = {"pretrain": plot_pretrain, "reward": plot_reward}.get(kind, plot_align)
        plot(history, out / "training.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pretrain(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and validation recall against step (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h["step"] for h in history]
    ax[0].plot(steps, [h["loss"] for h in history])
    ax[0].set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ev = [h for h in history if "val_r@10" in h]
    for key in ("val_r@1", "val_r@5", "val_r@10"):
        ax[1].plot([h["step"] for h in ev], [h[key] for h in ev], marker="o", label=key[4:])
    ax[1].set(xlabel="step", ylabel="recall", title="validation text->image recall")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_align(history: list[dict[str, Any]], path: Path) -> None:
    """Losses (train / held-out DPO), pair accuracies and validation recall against step."""
    plt = _pyplot()
    nan = float("nan")
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    tr = [h for h in history if "loss" in h]
    ev = [h for h in history if "val_r@10" in h or "val_pair_loss" in h]
    for key in ("pref_loss", "contrastive"):
        ax[0].plot([h["step"] for h in tr], [h[key] for h in tr], label=f"train {key}")
    ax[0].plot([h["step"] for h in ev], [h.get("val_pair_loss", nan) for h in ev], marker="o",
               label="held-out DPO loss")
    ax[0].set(xlabel="step", title="losses (train: means per log interval)")
    ax[0].legend(fontsize=8)
    ax[1].plot([h["step"] for h in tr], [h["train_pair_acc"] for h in tr], label="train pairs")
    ax[1].plot([h["step"] for h in ev], [h.get("val_pair_acc", nan) for h in ev],
               marker="o", label="held-out pairs")
    ax[1].plot([h["step"] for h in ev], [h.get("val_pair_reward_acc", nan) for h in ev],
               marker="s", label="held-out reward acc (z > 0)")
    ax[1].set(xlabel="step", ylabel="accuracy", title="teacher pairs")
    ax[1].legend(fontsize=8)
    ax[2].plot([h["step"] for h in ev], [h.get("val_r@10", nan) for h in ev],
               marker="o", label="R@10")
    ax[2].set(xlabel="step", title="validation caption recall@10")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reward(history: list[dict[str, Any]], path: Path) -> None:
    """Bradley-Terry loss and pair accuracy (train means, validation votes) against step."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    tr = [h for h in history if "loss" in h]
    ev = [h for h in history if "val_acc" in h]
    ax[0].plot([h["step"] for h in tr], [h["loss"] for h in tr], label="train")
    ax[0].plot([h["step"] for h in ev], [h["val_loss"] for h in ev], marker="o", label="validation")
    ax[0].set(xlabel="step", ylabel="-log sigmoid(r_w - r_l)", title="Bradley-Terry loss")
    ax[0].legend(fontsize=8)
    ax[1].plot([h["step"] for h in tr], [h["train_acc"] for h in tr], label="train")
    ax[1].plot([h["step"] for h in ev], [h["val_acc"] for h in ev], marker="o", label="validation")
    ax[1].set(xlabel="step", ylabel="accuracy", title="agreement with the votes")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
