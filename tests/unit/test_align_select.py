"""The fine-tune's selection rule (never reads the oracle): the non-inferiority test on validation
recall@10, the choice among passing states, the start as the fallback, the fixed control rule,
and weight interpolation."""

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from aligner.training.config import AlignLoopConfig, control_loop
from aligner.training.selection import (
    NOTHING_PASSED,
    SE_KEY,
    Selection,
    better,
    interpolate_states,
    noninferior,
    recall_drop_bound,
)

MARGIN, Z = 0.01, 1.645
START = {"step": 0, "val_r@10": 0.80, "val_pair_loss": 0.693, "val_pair_margin": 0.0}


def m(r10, margin=None, loss=0.6, se=0.0):
    out = {"val_r@10": r10, "val_pair_loss": loss, SE_KEY: se}
    if margin is not None:
        out["val_pair_margin"] = margin
    return out


def test_the_test_is_the_upper_bound_of_the_paired_drop_within_the_margin():
    start = {"val_r@10": 0.886}
    # 0.6-point drop: .006 + 1.645 * .002 = .00929 <= .01 passes; with SE .003: .01094 fails
    assert recall_drop_bound(m(0.880, se=0.002), start, Z) == pytest.approx(0.00929)
    assert noninferior(m(0.880, se=0.002), start, MARGIN, Z)
    assert not noninferior(m(0.880, se=0.003), start, MARGIN, Z)
    # exactly at the margin passes; the measured drop alone (z = 0) ignores the SE
    assert noninferior(m(0.876, se=0.0), start, MARGIN, Z)
    assert noninferior(m(0.877, se=0.05), start, MARGIN, 0.0)
    assert not noninferior(m(0.875, se=0.0), start, MARGIN, 0.0)
    # a measured gain passes when its bound is within the margin, and fails when too noisy:
    # -.014 + 1.645 * .005 = -.0058 passes; -.004 + 1.645 * .01 = .01245 fails
    assert noninferior(m(0.900, se=0.005), start, MARGIN, Z)
    assert not noninferior(m(0.890, se=0.010), start, MARGIN, Z)
    # the start itself: drop 0, SE 0
    assert noninferior({**start, SE_KEY: 0.0}, start, 0.0, Z)


def test_a_noisier_state_needs_a_smaller_drop_the_old_26_point_case_now_fails():
    start = {"val_r@10": 0.886}
    # the former budget .01 + 1.645 SE accepted this 2.6-point drop (SE 1.05 points): 1 + 1.73
    # points; its upper bound is 2.6 + 1.73 = 4.3 points, far beyond the 1-point margin
    noisy = {"val_r@10": 0.860, SE_KEY: 0.0105, "val_pair_margin": 0.8, "val_pair_loss": 0.6}
    assert recall_drop_bound(noisy, start, Z) == pytest.approx(0.0432725)
    assert not noninferior(noisy, start, MARGIN, Z)
    assert not noninferior({**noisy, SE_KEY: 0.0}, start, MARGIN, Z)  # 2.6 > 1 even at SE 0
    # a quieter 0.6-point drop passes and wins despite its smaller reward margin
    tight = {"val_r@10": 0.880, SE_KEY: 0.002, "val_pair_margin": 0.4, "val_pair_loss": 0.6}
    assert noninferior(tight, start, MARGIN, Z)
    assert better(tight, noisy, start, MARGIN, Z) and not better(noisy, tight, start, MARGIN, Z)
    # with SE .004 the 0.6-point drop fails too (.006 + .00658): then only the start passes
    tight4 = {**tight, SE_KEY: 0.004}
    assert not noninferior(tight4, start, MARGIN, Z)
    start_row = {**start, SE_KEY: 0.0, "val_pair_margin": 0.0, "val_pair_loss": 0.693}
    for state in (noisy, tight4):
        assert better(start_row, state, start, MARGIN, Z)
        assert not better(state, start_row, start, MARGIN, Z)


DROPS = [-0.02, -0.005, 0.0, 0.002, 0.005, 0.008, 0.01, 0.012, 0.02, 0.026, 0.05]
SES = [0.0, 0.001, 0.002, 0.003, 0.004, 0.006, 0.0105, 0.02]


@pytest.mark.parametrize("z", [0.0, 1.0, Z])
@pytest.mark.parametrize("margin", [0.0, 0.005, MARGIN, 0.02])
def test_the_test_is_monotone_in_the_drop_and_its_se(margin, z):
    """drop_A >= drop_B and SE_A >= SE_B: A passes => B passes, and A (same reward margin)
    is never preferred to B."""
    start = {"val_r@10": 0.9}
    states = [{"val_r@10": 0.9 - d, SE_KEY: se, "val_pair_margin": 0.5, "val_pair_loss": 0.6,
               "drop": d} for d, se in itertools.product(DROPS, SES)]
    checked = 0
    for a, b in itertools.product(states, states):
        if a["drop"] >= b["drop"] and a[SE_KEY] >= b[SE_KEY]:
            if noninferior(a, start, margin, z):
                assert noninferior(b, start, margin, z), (a, b)
            assert not better(a, b, start, margin, z), (a, b)
            checked += 1
    assert checked > 1000


def test_the_largest_teacher_margin_among_passing_states_wins():
    assert better(m(0.80, 0.2), None, START, MARGIN, Z)  # the first candidate always
    assert better(m(0.795, 0.5, se=0.002), m(0.80, 0.2), START, MARGIN, Z)  # moved further
    assert not better(m(0.80, 0.1), m(0.80, 0.2), START, MARGIN, Z)
    # a larger move that fails the test never wins over a passing one, whatever its margin
    assert not better(m(0.70, 2.0), m(0.80, 0.2), START, MARGIN, Z)
    assert not better(m(0.795, 2.0, se=0.005), m(0.80, 0.2), START, MARGIN, Z)
    assert better(m(0.80, 0.2), m(0.70, 2.0), START, MARGIN, Z)
    # equal margin: the lower held-out DPO loss breaks the tie
    assert better(m(0.80, 0.2, loss=0.5), m(0.80, 0.2, loss=0.6), START, MARGIN, Z)


def test_among_failing_states_or_without_pairs_recall_decides():
    assert better(m(0.75, 0.1), m(0.70, 0.9), START, MARGIN, Z)  # both fail: the better recall
    assert better(m(0.81), m(0.80), START, MARGIN, Z)  # no validation pairs
    assert not better(m(0.79), m(0.80), START, MARGIN, Z)


# -- the rules on a tiny model: the validation is a function of the weights (w: 0 at the start,
#    1 at the final state, alpha in between) --

def tiny(drop_per_alpha, se=0.001):
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    calls = []

    def validate():
        w = float(model.weight.detach().mean())
        calls.append(w)
        out = {"val_r@10": 0.80 - drop_per_alpha * w, "val_pair_margin": w,
               "val_pair_loss": 0.693 - 0.1 * w}
        if se is not None:
            out[SE_KEY] = se
        return out

    return model, validate, calls


def train_to_final(model):
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)


def run_rule(rule, alphas, drop_per_alpha, se=0.001, margin=MARGIN):
    model, validate, calls = tiny(drop_per_alpha, se)
    sel = Selection(model, rule, alphas, validate, margin=margin, z=Z)
    sel.set_start(dict(START), np.ones(8, bool))
    train_to_final(model)
    sel.update({"step": 10, "loss": 0.1}, evaluated=False, last=True)
    return sel, model, calls


def saved(sel):
    out = {}

    def write(module, directory, **meta):
        out.update(module=module, directory=directory, meta=meta)

    sel.save(Path("/tmp/x"), write)
    return out


def test_wise_picks_the_largest_margin_that_passes():
    # drop 1 point per unit alpha, SE .1 point: alpha .4 (.4 + .16), .6 (.6 + .16) and .8 pass
    sel, model, calls = run_rule("wise", [0.4, 0.6, 0.8, 1.0], 0.01)
    assert [r["alpha"] for r in sel.rows] == [0.0, 0.4, 0.6, 0.8, 1.0]
    assert [r["noninferior"] for r in sel.rows] == [True, True, True, True, False]
    assert sel.best["alpha"] == 0.8 and sel.best["step"] == 10
    assert len(calls) == 4  # alpha 0 is the start's own validation, not validated again
    assert float(model.weight.detach().mean()) == 1.0  # the model keeps its final weights
    w = saved(sel)
    assert w["meta"]["alpha"] == 0.8 and w["meta"]["noninferiority"] == {"margin": MARGIN, "z": Z}
    torch.testing.assert_close(w["module"].weight, torch.full((1, 2), 0.8))


def test_wise_outputs_the_start_when_no_interpolation_passes(caplog):
    # 5 points lost per unit alpha: every alpha > 0 fails (.4 -> 2 points)
    with caplog.at_level(logging.WARNING, logger="aligner.training.selection"):
        sel, model, _ = run_rule("wise", [0.4, 0.6, 0.8, 1.0], 0.05)
    assert [r["noninferior"] for r in sel.rows] == [True, False, False, False, False]
    assert sel.best["alpha"] == 0.0 and sel.best[SE_KEY] == 0.0
    assert sel.best["val_r@10"] == START["val_r@10"]
    assert NOTHING_PASSED in caplog.text
    w = saved(sel)  # the checkpoint is the start's weights, alpha 0.0
    assert w["meta"]["alpha"] == 0.0
    torch.testing.assert_close(w["module"].weight, torch.zeros(1, 2))
    torch.testing.assert_close(w["module"].bias, torch.zeros(1))
    assert float(model.weight.detach().mean()) == 1.0


def test_an_unknown_se_counts_as_zero_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="aligner.training.selection"):
        sel, _, _ = run_rule("wise", [0.4, 0.6, 0.8, 1.0], 0.01, se=None)
    assert sel.best["alpha"] == 1.0  # a 1-point drop alone is within the margin
    assert caplog.text.count("paired standard error") == 1


def test_early_stopping_starts_from_the_start_and_never_takes_a_failing_step():
    model, validate, _ = tiny(0.05)
    sel = Selection(model, "early_stopping", [1.0], validate, margin=MARGIN, z=Z)
    sel.set_start(dict(START), None)
    assert sel.best["step"] == 0 and sel.best["alpha"] == 0.0
    train_to_final(model)
    sel.update({"step": 5, **m(0.75, 0.9, se=0.01)}, evaluated=True, last=False)  # fails
    assert sel.best["step"] == 0
    torch.testing.assert_close(saved(sel)["module"].weight, torch.zeros(1, 2))
    sel.update({"step": 10, **m(0.80, 0.3, se=0.001)}, evaluated=True, last=True)  # passes
    assert sel.best["step"] == 10 and "alpha" not in sel.best
    torch.testing.assert_close(saved(sel)["module"].weight, torch.ones(1, 2))


def test_fixed_outputs_the_given_alpha_without_a_test():
    # alpha .6 loses 3 points (it would fail): fixed outputs it anyway
    sel, _, calls = run_rule("fixed", [0.6], 0.05)
    assert sel.best["alpha"] == 0.6 and len(calls) == 1 and [r["alpha"] for r in sel.rows] == [0.6]
    torch.testing.assert_close(saved(sel)["module"].weight, torch.full((1, 2), 0.6))
    # alpha 0: the control is the start as well (its own validation, no new one)
    sel, _, calls = run_rule("fixed", [0.0], 0.05)
    assert sel.best["alpha"] == 0.0 and not calls
    w = saved(sel)
    assert w["meta"]["alpha"] == 0.0
    torch.testing.assert_close(w["module"].weight, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="exactly one"):
        Selection(torch.nn.Linear(2, 1), "fixed", [0.4, 1.0], dict, margin=MARGIN, z=Z)


def test_the_config_of_the_rule_and_the_control():
    cfg = AlignLoopConfig()
    assert (cfg.recall_margin, cfg.recall_z) == (0.01, 1.645)
    assert not hasattr(cfg, "recall_tolerance")
    for bad in ({"recall_margin": -0.01}, {"wise_alphas": [0.0]},
                {"selection": "fixed", "wise_alphas": [0.4, 1.0]},
                {"selection": "fixed", "wise_alphas": [1.5]}):
        with pytest.raises(ValueError, match="recall_margin|wise_alphas"):
            AlignLoopConfig(**bad)
    for alpha in (0.0, 0.6):
        c = control_loop(cfg, alpha)
        assert (c.selection, c.wise_alphas, c.pref_weight) == ("fixed", [alpha], 0.0)
        assert (c.steps, c.seed, c.pairs_per_step) == (cfg.steps, cfg.seed, cfg.pairs_per_step)
    assert AlignLoopConfig(selection="fixed", wise_alphas=[0.6], eval_every=0).eval_every == 0


def test_interpolate_states_is_wise_ft():
    start = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    end = {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(5)}
    mid = interpolate_states(start, end, 0.25)
    torch.testing.assert_close(mid["w"], torch.tensor([0.25, 1.5]))
    assert int(mid["n"]) == 5  # integer buffers are taken from the end state
    torch.testing.assert_close(interpolate_states(start, end, 1.0)["w"], end["w"])


def test_paired_drop_se_counts_only_the_captions_that_changed():
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
    from aligner.retrieval.metrics import caption_hits, caption_recall

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(40, 8, generator=g), dim=1)
    for k in (1, 5, 10):
        hits = caption_hits(img, txt, k)
        assert hits.dtype == bool and hits.shape == (40,)
        assert hits.mean() == pytest.approx(caption_recall(img, txt, (k,))[f"r@{k}"])
