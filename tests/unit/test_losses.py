"""Loss math against hand-computed values (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from aligner.training.losses import align_loss, contrastive_loss, ranked_dpo_loss, weighted_mean

LOG1P_E_M1 = math.log1p(math.exp(-1.0))  # -log sigmoid(1) = 0.313262
LOG1P_E_P1 = math.log1p(math.exp(1.0))   # -log sigmoid(-1) = 1.313262


def test_ranked_dpo_hand_values():
    """s_w=.5, s_l=.3, ref .4/.4, beta .5, scale 10 -> k=5, rewards +.5/-.5, z=1.

    eps=0: -log sig(1) = 0.313262; eps=.1: .9 * 0.313262 + .1 * 1.313262 = 0.413262.
    """
    args = (torch.tensor([0.5]), torch.tensor([0.3]), torch.tensor([0.4]), torch.tensor([0.4]))
    out = ranked_dpo_loss(*args, beta=0.5, logit_scale=10.0)
    assert_close(out.losses, torch.tensor([LOG1P_E_M1]))
    assert_close(out.chosen_rewards, torch.tensor([0.5]))
    assert_close(out.rejected_rewards, torch.tensor([-0.5]))
    assert_close(out.margins, torch.tensor([1.0]))
    assert out.accuracy.item() == 1.0
    smooth = ranked_dpo_loss(*args, beta=0.5, logit_scale=10.0, label_smoothing=0.1)
    assert_close(smooth.losses, torch.tensor([0.9 * LOG1P_E_M1 + 0.1 * LOG1P_E_P1]))


def test_ranked_dpo_is_relative_to_the_reference():
    """A model equal to the reference has z = 0 and loss log 2, whatever the similarities;
    a reference that already prefers w makes the same policy margin worth less."""
    s = torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9])
    same = ranked_dpo_loss(s[0], s[1], s[0], s[1], beta=1.0, logit_scale=20.0)
    assert_close(same.losses, torch.full((2,), math.log(2.0)))
    assert same.accuracy.tolist() == [1.0, 0.0]
    a = ranked_dpo_loss(torch.tensor([0.6]), torch.tensor([0.4]), torch.tensor([0.5]),
                        torch.tensor([0.5]), beta=1.0)
    b = ranked_dpo_loss(torch.tensor([0.6]), torch.tensor([0.4]), torch.tensor([0.6]),
                        torch.tensor([0.4]), beta=1.0)
    assert a.losses.item() < b.losses.item()


def test_ranked_dpo_gradient_pushes_chosen_up_and_rejected_down():
    """d L / d s_w = -k (1 - eps - sigmoid(z)) ... at z = 0, eps = 0: -k / 2."""
    sw = torch.tensor([0.3], requires_grad=True)
    sl = torch.tensor([0.3], requires_grad=True)
    scale = torch.tensor(4.0, requires_grad=True)
    out = ranked_dpo_loss(sw, sl, torch.tensor([0.3]), torch.tensor([0.3]), beta=0.5,
                          logit_scale=scale)
    out.losses.sum().backward()
    assert_close(sw.grad, torch.tensor([-1.0]))  # k = 2, -k/2
    assert_close(sl.grad, torch.tensor([1.0]))
    assert scale.grad is None  # the temperature is not trained by the preference loss


def test_label_smoothing_bounds():
    one = torch.tensor([0.0])
    with pytest.raises(ValueError):
        ranked_dpo_loss(one, one, one, one, label_smoothing=0.5)


def test_contrastive_hand_value():
    """Orthonormal 2x2 features, scale 1: logits = I, CE per row = log(1 + e^-1)."""
    f = torch.eye(2)
    assert_close(contrastive_loss(f, f, 1.0), torch.tensor(LOG1P_E_M1))
    swapped = contrastive_loss(f, f.flip(0), 1.0)
    assert_close(swapped, torch.tensor(LOG1P_E_P1))


def test_weighted_mean_and_total():
    x = torch.tensor([1.0, 3.0])
    assert_close(weighted_mean(x, torch.tensor([1.0, 3.0])), torch.tensor(2.5))
    assert_close(weighted_mean(x, None), torch.tensor(2.0))
    assert weighted_mean(torch.zeros(0), None).item() == 0.0
    pref = ranked_dpo_loss(torch.tensor([0.5]), torch.tensor([0.3]), torch.tensor([0.4]),
                           torch.tensor([0.4]), beta=0.5, logit_scale=10.0)
    out = align_loss(pref, None, torch.tensor(2.0), pref_weight=1.0, contrastive_weight=0.5)
    assert_close(out.total, torch.tensor(LOG1P_E_M1 + 1.0))
    control = align_loss(pref, None, torch.tensor(2.0), pref_weight=0.0, contrastive_weight=1.0)
    assert_close(control.total, torch.tensor(2.0))
