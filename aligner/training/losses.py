"""Losses of the alignment fine-tune: ranked DPO against a frozen reference + contrastive term.

Pure tensor math (no I/O, no distributed calls); the training loop gathers features across
workers before calling :func:`contrastive_loss` when it wants global negatives.

Ranked DPO (``docs/method.md``; Rafailov et al.'s DPO applied to a retriever as a policy
``pi(v | q) ∝ exp(s(q, v) / tau)``). For a pair where image ``w`` is preferred over ``l``::

    z      = (beta / tau) * [ (s(q, w) - s(q, l)) - (s_ref(q, w) - s_ref(q, l)) ]
    L_pref = -[ (1 - eps) * log sigmoid(z) + eps * log sigmoid(-z) ]        (eps: label smoothing)
    L      = sum_i weight_i * L_pref_i / sum_i weight_i  +  lambda * L_contrastive

``s`` is the cosine similarity under the model being trained, ``s_ref`` under the frozen
starting model, ``tau`` the temperature (``1 / logit_scale``), so ``beta / tau`` is
``beta * logit_scale``. The normaliser cancels out of the softmax over images, which is why
a pair loss on similarity differences is the policy's log-ratio difference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLossOutput(NamedTuple):
    """Per-pair losses and detached diagnostics (all ``[P]`` tensors).

    Attributes:
        losses: ``L_pref`` per pair (with gradient).
        chosen_rewards: implicit rewards ``(beta / tau) * (s(q, w) - s_ref(q, w))``, detached.
        rejected_rewards: ``(beta / tau) * (s(q, l) - s_ref(q, l))``, detached.
        margins: ``z`` (chosen minus rejected reward), detached.
        accuracy: 1.0 where the model's own similarity ranks ``w`` above ``l``, detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor


def ranked_dpo_loss(sim_chosen: torch.Tensor, sim_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                    beta: float = 0.5, logit_scale: float | torch.Tensor = 1.0,
                    label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """Ranked DPO with label smoothing for a batch of preference pairs.

    Args:
        sim_chosen: ``[P]`` cosine ``s(q, w)`` under the trained model.
        sim_rejected: ``[P]`` cosine ``s(q, l)`` under the trained model.
        ref_chosen: ``[P]`` cosine ``s_ref(q, w)`` under the frozen reference.
        ref_rejected: ``[P]`` cosine ``s_ref(q, l)`` under the frozen reference.
        beta: DPO strength (how far from the reference the policy may move).
        logit_scale: ``1 / tau``; a tensor is detached (the temperature is not a preference
            knob).
        label_smoothing: ``eps`` in [0, 0.5): the probability that a pair's label is wrong.

    Returns:
        :class:`PreferenceLossOutput`.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError("label_smoothing must be in [0, 0.5)")
    if isinstance(logit_scale, torch.Tensor):
        logit_scale = logit_scale.detach()
    k = beta * logit_scale
    chosen = k * (sim_chosen - ref_chosen)
    rejected = k * (sim_rejected - ref_rejected)
    z = chosen - rejected
    losses = -((1.0 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z))
    return PreferenceLossOutput(losses, chosen.detach(), rejected.detach(), z.detach(),
                                (sim_chosen > sim_rejected).float().detach())


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum(w * x) / sum(w)`` (plain mean without weights; 0 for an empty batch)."""
    if values.numel() == 0:
        return values.sum()
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP over ``[B, D]`` normalised features (row i matches row i).

    ``(CE(scale * T I^T, arange) + CE(scale * I T^T, arange)) / 2``.
    """
    logits = logit_scale * text_features @ image_features.T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class AlignLossOutput(NamedTuple):
    """Total loss and its parts (scalars; ``total`` has the gradient)."""

    total: torch.Tensor
    preference: torch.Tensor
    contrastive: torch.Tensor
    pref: PreferenceLossOutput


def align_loss(pref: PreferenceLossOutput, weights: torch.Tensor | None,
               contrastive: torch.Tensor, pref_weight: float = 1.0,
               contrastive_weight: float = 1.0) -> AlignLossOutput:
    """``pref_weight * weighted_mean(L_pref) + contrastive_weight * L_contrastive``.

    ``pref_weight = 0`` is the contrastive-only control (same data, same steps).
    """
    p = weighted_mean(pref.losses, weights)
    total = pref_weight * p + contrastive_weight * contrastive
    return AlignLossOutput(total, p.detach(), contrastive.detach(), pref)
