"""The fine-tune's selection rule (never reads the oracle) and weight interpolation."""

import torch

from aligner.training.selection import better, interpolate_states

START = {"val_r@10": 0.80, "val_pair_loss": 0.693, "val_pair_margin": 0.0}


def m(r10, margin=None, loss=0.6):
    out = {"val_r@10": r10, "val_pair_loss": loss}
    if margin is not None:
        out["val_pair_margin"] = margin
    return out


def test_the_largest_teacher_margin_within_the_recall_budget_wins():
    assert better(m(0.80, 0.2), None, START, 0.01)  # the first candidate always
    assert better(m(0.79, 0.5), m(0.80, 0.2), START, 0.01)  # moved further, recall within tol
    assert not better(m(0.80, 0.1), m(0.80, 0.2), START, 0.01)
    # a larger move bought with recall beyond the tolerance never wins over one within it
    assert not better(m(0.70, 2.0), m(0.80, 0.2), START, 0.01)
    assert better(m(0.80, 0.2), m(0.70, 2.0), START, 0.01)
    # equal margin: the lower held-out DPO loss breaks the tie
    assert better(m(0.80, 0.2, loss=0.5), m(0.80, 0.2, loss=0.6), START, 0.01)


def test_outside_the_tolerance_or_without_pairs_recall_decides():
    assert better(m(0.75, 0.1), m(0.70, 0.9), START, 0.01)  # both too far: the better recall
    assert better(m(0.81), m(0.80), START, 0.01)  # no validation pairs
    assert not better(m(0.79), m(0.80), START, 0.01)


def test_interpolate_states_is_wise_ft():
    start = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    end = {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(5)}
    mid = interpolate_states(start, end, 0.25)
    torch.testing.assert_close(mid["w"], torch.tensor([0.25, 1.5]))
    assert int(mid["n"]) == 5  # integer buffers are taken from the end state
    torch.testing.assert_close(interpolate_states(start, end, 1.0)["w"], end["w"])
