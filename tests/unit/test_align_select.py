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


def test_the_recall_budget_widens_by_the_paired_standard_error_of_the_drop():
    from aligner.training.selection import SE_KEY, recall_within

    start = {"val_r@10": 0.886}
    drop_26 = {"val_r@10": 0.860}  # a 2.6-point drop
    assert not recall_within(drop_26, start, 0.01)  # the fixed tolerance alone rejects it
    assert not recall_within(drop_26, start, 0.01, z=1.645)  # no SE known: the same
    assert recall_within({**drop_26, SE_KEY: 0.0105}, start, 0.01, z=1.645)  # 1+1.73 pts
    assert not recall_within({**drop_26, SE_KEY: 0.0090}, start, 0.01, z=1.645)  # 1+1.48 pts
    # the SE decides which of two candidates is within the budget, then the margin wins
    noisy = {**drop_26, SE_KEY: 0.0105, "val_pair_margin": 0.8, "val_pair_loss": 0.6}
    tight = {"val_r@10": 0.880, SE_KEY: 0.004, "val_pair_margin": 0.4, "val_pair_loss": 0.6}
    assert better(noisy, tight, start, 0.01, z=1.645)
    assert not better(noisy, tight, start, 0.01, z=0.0)


def test_paired_drop_se_counts_only_the_captions_that_changed():
    import numpy as np
    import pytest

    from aligner.retrieval.metrics import paired_drop_se

    a = np.array([1, 1, 1, 1, 0, 0, 1, 0], bool)
    assert paired_drop_se(a, a) == 0.0  # the same outcomes: no noise in the difference
    b = a.copy()
    b[0], b[4] = False, True  # one lost, one gained
    d = b.astype(float) - a.astype(float)
    assert paired_drop_se(a, b) == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    with pytest.raises(ValueError, match="shape"):
        paired_drop_se(a, b[:-1])


def test_caption_hits_are_the_outcomes_behind_caption_recall():
    import pytest

    from aligner.retrieval.metrics import caption_hits, caption_recall

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(40, 8, generator=g), dim=1)
    for k in (1, 5, 10):
        hits = caption_hits(img, txt, k)
        assert hits.dtype == bool and hits.shape == (40,)
        assert hits.mean() == pytest.approx(caption_recall(img, txt, (k,))[f"r@{k}"])
