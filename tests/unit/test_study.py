"""The study summary over seeds (docs/evaluation.md's yardstick): per-run CIs, mean,
between-seed spread, all-runs flags, equal relevance with the chosen settings, the targets.

The metrics dicts follow the ``metrics.json`` contract: ``comparisons[other]`` holds paired CI
dicts of aligned minus ``other``; ``equal_relevance.families[family]`` the setting chosen on
val and aligned minus it on test.
"""

from __future__ import annotations

import pytest

from aligner.evaluation.study import (
    STUDY_ROWS,
    check_targets,
    run_targets,
    study_figure,
    study_table,
    summarise_equal_relevance,
    summarise_seeds,
)


def ci(mean, lo, hi):
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": 40}


def family(setting, lo, hi, mean=None):
    if setting is None:
        return {"setting": None, "chosen_on": "val",
                "note": "no rephrase setting is as relevant as aligned on the val queries"}
    mean = (lo + hi) / 2 if mean is None else mean
    return {"setting": setting, "chosen_on": "val", "reported_on": "test",
            "ndcg@10_diff": ci(mean, lo, hi), "precision@10_diff": ci(0.0, -0.005, 0.005)}


def metrics(ndcg=(0.04, 0.02, 0.06), beauty=(0.05, 0.01, 0.09), prec=(0.0, -0.008, 0.008),
            rec=(-0.002, -0.009, 0.005), hpir_a=(0.15, 0.08, 0.22), hpir_c=(-0.01, -0.05, 0.03),
            aes=(0.09, 0.07, 0.11), ctrl=None, families=None):
    base = {"ndcg@10_diff": ci(*ndcg), "beauty_relevant@10_diff": ci(*beauty),
            "precision@10_diff": ci(*prec), "aesthetic@10_diff": ci(*aes),
            "recall@10_diff": ci(*rec), "hpir_aesthetics_diff": ci(*hpir_a),
            "hpir_accuracy_diff": ci(*hpir_c)}
    comps = {"base": base}
    if ctrl is not None:
        comps["control"] = {"ndcg@10_diff": ci(ctrl, ctrl - 0.01, ctrl + 0.01)}
    fams = families if families is not None else {
        "cascade": family("cascade w=0.5", 0.01, 0.03),
        "query_shift": family("shift w=0.1", 0.0, 0.02),
        "rephrase": family("rephrase mix=0.5", -0.03, 0.01),
        "teacher_rerank": family("teacher_rerank w=0.25", -0.02, 0.02)}
    systems = {"aligned": {"ndcg@10": ci(0.60, 0.55, 0.65), "timing": {"ms_per_query": 1.5}}}
    return {"primary": "ndcg@10", "systems": systems, "comparisons": comps,
            "equal_relevance": {"families": fams}, "gallery": {"which": "test"}}


@pytest.fixture
def three_runs():
    """seed0 meets every target; seed1 drops precision@10 by up to 1.5 points and has no
    qualifying rephrase setting; seed2 gains 8 HPIR-aesthetics points (short of 10) and sits
    exactly on the precision@10 bound."""
    fams1 = {"cascade": family("cascade w=0.25", -0.01, 0.01),
             "rephrase": family(None, 0, 0),
             "teacher_rerank": family("teacher_rerank w=0.5", -0.05, -0.01)}
    return {"world0/seed0": metrics(ndcg=(0.04, 0.02, 0.06), ctrl=0.05),
            "world0/seed1": metrics(ndcg=(0.02, 0.005, 0.035), prec=(-0.005, -0.015, 0.005),
                                    ctrl=-0.02, families=fams1),
            "world0/seed2": metrics(ndcg=(0.03, -0.001, 0.061), hpir_a=(0.08, 0.01, 0.15),
                                    prec=(0.0, -0.01, 0.01))}


def test_rows_follow_the_yardstick_primary_first_diagnostic_last():
    labels = [r[2] for r in STUDY_ROWS]
    assert [(c, m) for c, m, _, _ in STUDY_ROWS[:4]] == [
        ("base", "ndcg@10_diff"), ("control", "ndcg@10_diff"), ("rephrase", "ndcg@10_diff"),
        ("teacher_rerank", "ndcg@10_diff")]
    assert STUDY_ROWS[4][:2] == ("base", "beauty_relevant@10_diff")
    assert {m: s for _, m, _, s in STUDY_ROWS[5:9]} == {
        "precision@10_diff": 100.0, "recall@10_diff": 100.0, "hpir_aesthetics_diff": 100.0,
        "hpir_accuracy_diff": 100.0}
    assert STUDY_ROWS[-1][:2] == ("base", "aesthetic@10_diff")
    assert labels[-1].endswith("(diagnostic: includes wrong-content results)")
    assert not any("hpir_diff" == m for _, m, _, _ in STUDY_ROWS)  # the retired HPIR utility


def test_summary_over_seeds(three_runs, tmp_path):
    s = summarise_seeds(three_runs)
    assert s["runs"] == list(three_runs) and s["primary"] == "ndcg@10"
    rows = {r["label"]: r for r in s["rows"]}
    assert list(rows)[0] == "nDCG@10, aligned - base"
    a = rows["nDCG@10, aligned - base"]
    assert a["n_runs"] == 3 and a["mean"] == pytest.approx(0.03)
    assert a["sd"] == pytest.approx(0.01) and (a["min"], a["max"]) == (0.02, 0.04)
    assert not a["ci_excludes_0_in_all"]  # seed 2's CI reaches below 0
    c = rows["nDCG@10, aligned - control"]
    assert c["n_runs"] == 2 and c["ci_excludes_0_in_all"] and not c["ci_above_0_in_all"]
    assert c["mean"] == pytest.approx(0.015) and c["sd"] == pytest.approx(0.07 / 2 ** 0.5)
    p = rows["precision@10 points, aligned - base"]
    assert p["mean"] == pytest.approx(-0.005 / 3) and p["scale"] == 100.0
    assert rows["beauty among relevant@10, aligned - base"]["ci_above_0_in_all"]
    assert "nDCG@10, aligned - teacher_rerank" not in rows  # no run compares it: skipped
    assert list(rows)[-1].startswith("aesthetic@10, aligned - base (diagnostic")
    table = study_table(s)
    assert "+0.030" in table and "world0/seed2" in table and "n/a" in table
    assert table.index("nDCG@10, aligned - base") < table.index("aesthetic@10, aligned - base")
    study_figure(s, str(tmp_path / "seeds.png"))
    assert (tmp_path / "seeds.png").stat().st_size > 1000


def test_equal_relevance_rows_keep_each_runs_setting_and_note(three_runs):
    eq = {r["family"]: r for r in summarise_equal_relevance(three_runs)}
    assert list(eq) == ["cascade", "query_shift", "rephrase", "teacher_rerank"]
    tr = eq["teacher_rerank"]
    assert tr["label"] == "nDCG@10, aligned - teacher_rerank"
    assert (tr["chosen_on"], tr["reported_on"]) == ("val", "test")
    assert [v["setting"] for v in tr["per_run"].values()] == [
        "teacher_rerank w=0.25", "teacher_rerank w=0.5", "teacher_rerank w=0.25"]
    assert tr["n_runs"] == 3 and tr["mean"] == pytest.approx(-0.01)
    assert tr["ci_below_0_in_all"] is False
    reph = eq["rephrase"]
    assert reph["n_runs"] == 2 and reph["per_run"]["world0/seed1"] == {
        "setting": None, "note": "no rephrase setting is as relevant as aligned on the val queries"}
    assert reph["mean"] == pytest.approx(-0.01)
    assert eq["query_shift"]["n_runs"] == 2 and "world0/seed1" not in eq["query_shift"]["per_run"]
    table = study_table(summarise_seeds(three_runs))
    assert "At equal relevance: aligned - the setting chosen on val, reported on test" in table
    assert "teacher_rerank w=0.25" in table and "shift w=0.1" in table
    assert "n/a (note 1)" in table
    assert ("note 1: world0/seed1, rephrase: no rephrase setting is as relevant as aligned on "
            "the val queries") in table


def test_one_runs_targets_hand_checked():
    got = {t["key"]: t for t in run_targets(metrics())}
    assert list(got) == ["ndcg@10", "beauty_relevant@10", "precision@10", "recall@10",
                         "hpir_aesthetics", "hpir_accuracy", "equal_relevance:teacher_rerank",
                         "equal_relevance:rephrase"]
    assert all(t["met"] is True for t in got.values())
    assert got["precision@10"]["shown"] == "+0.0 [-0.8, +0.8] pt"
    assert got["hpir_aesthetics"]["shown"] == "+15.0 [+8.0, +22.0] pt"
    er = got["equal_relevance:rephrase"]
    assert er["shown"] == "-0.010 [-0.030, +0.010]" and er["value"]["setting"] == "rephrase mix=0.5"
    # each rule on its edge
    edge = {t["key"]: t["met"] for t in run_targets(metrics(
        ndcg=(0.02, 0.0, 0.04),                 # CI touches 0: not above it
        beauty=(0.02, 0.001, 0.04),
        prec=(-0.005, -0.01, 0.0),              # the drop's bound is exactly 1 point: met
        rec=(-0.005, -0.0101, 0.0),             # just over 1 point: not met
        hpir_a=(0.10, 0.02, 0.18),              # exactly +10 points: met
        hpir_c=(-0.021, -0.06, 0.02),           # more than 2 points below: not met
        families={"teacher_rerank": family("teacher_rerank w=1", -0.04, 0.0),  # reaches 0
                  "rephrase": family("rephrase mix=1", -0.04, -0.001)}))}
    assert edge == {"ndcg@10": False, "beauty_relevant@10": True, "precision@10": True,
                    "recall@10": False, "hpir_aesthetics": True, "hpir_accuracy": False,
                    "equal_relevance:teacher_rerank": True, "equal_relevance:rephrase": False}
    low = {t["key"]: t["met"] for t in run_targets(metrics(hpir_a=(0.09, 0.02, 0.16)))}
    assert low["hpir_aesthetics"] is False  # CI above 0 but short of +10 points


def test_targets_over_runs(three_runs):
    rows = {t["key"]: t for t in check_targets(three_runs)}
    assert rows["ndcg@10"]["met_in_all"] is False and rows["ndcg@10"]["n_met"] == 2
    assert [v["met"] for v in rows["ndcg@10"]["per_run"].values()] == [True, True, False]
    assert rows["beauty_relevant@10"]["met_in_all"] is True
    prec = rows["precision@10"]
    assert [v["met"] for v in prec["per_run"].values()] == [True, False, True]
    assert not prec["met_in_all"]  # missed in one run: not met in all
    assert rows["recall@10"]["met_in_all"] and rows["hpir_accuracy"]["met_in_all"]
    assert [v["met"] for v in rows["hpir_aesthetics"]["per_run"].values()] == [True, True, False]
    # teacher_rerank: seed1's CI is below 0
    assert [v["met"] for v in rows["equal_relevance:teacher_rerank"]["per_run"].values()] == [
        True, False, True]
    # rephrase: no qualifying setting in seed1 is n/a, never counted as met
    reph = rows["equal_relevance:rephrase"]
    s1 = reph["per_run"]["world0/seed1"]
    assert s1["met"] is None and s1["shown"] == "n/a" and "as relevant" in s1["note"]
    assert reph["n_met"] == 2 and reph["met_in_all"] is False

    table = study_table(summarise_seeds(three_runs))
    tlines = table[table.index("Targets (docs/evaluation.md, section 5)"):].splitlines()
    prec_line = next(ln for ln in tlines if ln.startswith("precision@10: drop"))
    assert prec_line.count("NOT met") == 2 and prec_line.endswith("  NOT met (2/3 runs)")
    beauty_line = next(ln for ln in tlines if ln.startswith("aligned - base beauty"))
    assert beauty_line.endswith("  met") and "NOT" not in beauty_line
    assert "n/a (not counted as met): world0/seed1, equal_relevance:rephrase:" in table


def test_a_run_without_a_measure_is_missing_not_met():
    m = metrics()
    del m["comparisons"]["base"]["hpir_accuracy_diff"]
    del m["equal_relevance"]["families"]["teacher_rerank"]
    rows = {t["key"]: t for t in check_targets({"a": m, "b": metrics()})}
    assert rows["hpir_accuracy"]["per_run"]["a"] == {"value": None, "met": None,
                                                     "shown": "missing"}
    assert rows["hpir_accuracy"]["met_in_all"] is False
    assert rows["equal_relevance:teacher_rerank"]["per_run"]["a"]["met"] is None
    assert check_targets({}) and not any(t["met_in_all"] for t in check_targets({}))


def test_every_ci_above_zero_is_flagged():
    s = summarise_seeds({"a": metrics(ndcg=(0.1, 0.05, 0.15)),
                         "b": metrics(ndcg=(0.2, 0.1, 0.3))})
    row = s["rows"][0]
    assert row["label"] == "nDCG@10, aligned - base"
    assert row["ci_above_0_in_all"] and row["ci_excludes_0_in_all"]
    assert study_table(s).splitlines()[4].endswith(" *")


def test_the_job_writes_and_prints_rows_equal_relevance_and_targets(three_runs, tmp_path,
                                                                     monkeypatch, capsys):
    """``jobs.study`` with its runs stubbed: summary.json / summary.md hold the three parts and
    the job prints them."""
    import json

    import jobs.study as J

    monkeypatch.setattr(J, "run_world", lambda cfg, w, out: three_runs)
    assert J.main([f"workdir={tmp_path}", f"output={tmp_path / 'study'}"]) == 0
    out = tmp_path / "study"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == list(three_runs) and summary["gallery"] == ["test"]
    assert summary["rows"][0]["label"] == "nDCG@10, aligned - base"
    assert [r["family"] for r in summary["equal_relevance"]] == [
        "cascade", "query_shift", "rephrase", "teacher_rerank"]
    assert sum(t["met_in_all"] for t in summary["targets"]) == 3  # beauty, recall, accuracy
    md = (out / "summary.md").read_text()
    assert "Targets met in every run: 3 of 8" in md and "primary metric: ndcg@10" in md
    printed = capsys.readouterr().out
    for text in ("nDCG@10, aligned - base", "teacher_rerank w=0.5", "NOT met (2/3 runs)"):
        assert text in md and text in printed
    assert (out / "seeds.png").stat().st_size > 1000


@pytest.mark.parametrize("arg", ["workdir=/tmp/x", "seed=3", "control=false"])
def test_the_study_owns_the_quickstart_workdir_seed_and_control(arg):
    """The study sets these itself (every seed trains the control); a quickstart argument that
    sets one is refused, not silently overridden."""
    from jobs.study import StudyConfig

    with pytest.raises(ValueError, match="must not set workdir, seed or control"):
        StudyConfig(quickstart=[arg])
