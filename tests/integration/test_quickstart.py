"""The README's main command in a small configuration: every stage runs for real (world,
Ray Train pre-training because the shipped base does not fit a 400-image world, Ray Data
embedding, faiss, the rephrase job, preference pairs, a 2-worker ranked-DPO fine-tune and its
control, re-embedding, evaluation, search), and a re-run skips them all."""

import json

import pytest

STAGES = {"world", "base", "embed", "index", "rephrase", "preferences:both+degraded",
          "preferences:rephrase", "preferences:scorer", "preferences:both", "aligned",
          "control", "re-embed", "index:aligned", "evaluate", "search"}


@pytest.mark.timeout(900)
def test_quickstart_small(ray_session, tmp_path, capsys):
    from jobs.quickstart import main

    argv = ["--fast", f"workdir={tmp_path}", "n_images=400", "n_queries=120",
            "pretrain_steps=30", "align_steps=10", "eval_every=5", "pairs_per_step=16",
            "captions_per_step=32", "k=5", 'queries=["two red circles on grass"]',
            "control=true"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "quickstart:" in out and "aligned - base: nDCG@10" in out
    assert "HPIR-aesthetics" in out and "gallery    " in out
    assert "pre-trained here" in out and "another world" in out  # not the shipped base
    assert "teachers   pairs agreeing with the oracle: rephrase" in out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["timings_s"]) == STAGES
    for sub in ("world", "base", "embeddings", "index", "rephrased", "aligned", "control",
                "embeddings_aligned", "index_aligned", "evaluate", "search"):
        assert (tmp_path / sub / "manifest.json").is_file(), sub
    reph = json.loads((tmp_path / "rephrased" / "manifest.json").read_text())
    assert reph["backend"] == "template" and reph["rows_out"] == 120
    m = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert list(m["systems"]) == ["base", "cascade", "query_shift", "rephrase",
                                  "teacher_rerank", "aligned", "control"]
    assert m["gallery"]["which"] == "test" and "held out" in m["gallery"]["view"]
    assert m["equal_relevance"]["chosen_on"] == "val"  # knobs chosen on val, reported on test
    assert set(m["teacher"]) == {"rephrase", "scorer", "both", "both+degraded"}
    assert m["teacher"]["both+degraded"]["all"]["degraded_pairs"] > 0
    assert m["equal_relevance"]["families"] and m["verdict"]
    # the aligned model was evaluated on the embeddings the re-embed stage wrote
    ev = json.loads((tmp_path / "evaluate" / "manifest.json").read_text())
    assert "embeddings" in ev["timings"]["models"]["aligned"]
    assert (tmp_path / "evaluate" / "report.html").is_file()
    assert (tmp_path / "search" / "search.png").is_file()

    # a second run finds every stage complete (which stages a change redoes: unit tests)
    assert main(argv) == 0
    again = json.loads((tmp_path / "manifest.json").read_text())
    assert again["timings_s"] == {} and set(again["skipped"]) == STAGES
