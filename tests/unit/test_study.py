"""The study summary over seeds: per-run CIs, mean, between-seed spread, all-runs flags."""

from __future__ import annotations

import pytest

from aligner.evaluation.study import study_figure, study_table, summarise_seeds


def _metrics(a_base, lo, hi, a_ctrl=None):
    comps = {"base": {"aesthetic@10_diff": {"mean": a_base, "ci_low": lo, "ci_high": hi},
                      "recall@10_diff": {"mean": -0.01, "ci_low": -0.02, "ci_high": 0.0}}}
    if a_ctrl is not None:
        comps["control"] = {"aesthetic@10_diff": {"mean": a_ctrl, "ci_low": a_ctrl - 0.01,
                                                  "ci_high": a_ctrl + 0.01}}
    return {"comparisons": comps, "gallery": {"which": "test"}}


def test_summary_over_seeds(tmp_path):
    m = {"world0/seed0": _metrics(0.10, 0.08, 0.12, 0.05),
         "world0/seed1": _metrics(0.06, 0.02, 0.10, -0.02),
         "world0/seed2": _metrics(0.02, -0.01, 0.05)}
    s = summarise_seeds(m)
    assert s["runs"] == list(m)
    rows = {r["label"]: r for r in s["rows"]}
    a = rows["aesthetic@10, aligned - base"]
    assert a["n_runs"] == 3 and a["mean"] == pytest.approx(0.06)
    assert a["sd"] == pytest.approx(0.04) and (a["min"], a["max"]) == (0.02, 0.10)
    assert not a["ci_excludes_0_in_all"]  # seed 2's CI reaches 0
    r = rows["recall@10 points, aligned - base"]
    assert r["ci_below_0_in_all"] is False and r["ci_excludes_0_in_all"] is False
    c = rows["aesthetic@10, aligned - control"]
    assert c["n_runs"] == 2 and c["ci_excludes_0_in_all"] and not c["ci_above_0_in_all"]
    assert "aligned - teacher_rerank" not in " ".join(rows)  # no run has it: skipped
    table = study_table(s)
    assert "+0.060" in table and "world0/seed2" in table and "n/a" in table
    study_figure(s, str(tmp_path / "seeds.png"))
    assert (tmp_path / "seeds.png").stat().st_size > 1000


def test_every_ci_above_zero_is_flagged():
    s = summarise_seeds({"a": _metrics(0.1, 0.05, 0.15), "b": _metrics(0.2, 0.1, 0.3)})
    row = s["rows"][0]
    assert row["ci_above_0_in_all"] and row["ci_excludes_0_in_all"]
    assert "*" in study_table(s).splitlines()[2]
