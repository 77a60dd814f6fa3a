"""The README's main command, in a small configuration: every stage runs for real (world,
Ray Train pre-training, Ray Data embedding, faiss index, search) and a re-run skips them."""

import json

import pytest


@pytest.mark.timeout(600)
def test_quickstart_small(ray_session, tmp_path, capsys):
    from jobs.quickstart import main

    argv = [f"workdir={tmp_path}", "n_images=400", "steps=30", "k=5",
            'queries=["two red circles on grass", "a gloomy picture of three crimson discs"]']
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "quickstart:" in out and "premise" in out and "search grids" in out
    for sub in ("world", "base", "embeddings", "index", "search"):
        assert (tmp_path / sub / "manifest.json").is_file(), sub
    emb = json.loads((tmp_path / "embeddings" / "manifest.json").read_text())
    assert emb["rows_out"] + emb["rows_failed"] == 400 and emb["rows_failed"] == 0
    results = json.loads((tmp_path / "search" / "results.json").read_text())
    assert len(results) == 2 and all(len(v) == 5 for v in results.values())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["timings_s"]) == {"world", "pretrain", "embed", "index", "search"}

    # a second run finds every stage complete and only searches again
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["timings_s"]) == {"search"}
