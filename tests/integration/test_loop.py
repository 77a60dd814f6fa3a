"""The closed feedback loop through the real product (``python -m jobs.loop``), two rounds on
the small serving world: the Serve application of ``serving.app`` on Serve's HTTP proxy
(127.0.0.1), simulated raters voting through ``/v1/compare`` and ``/v1/votes`` with the API
key, the export through ``/v1/votes/export``, a reward model and a re-aligned model per round,
and the running application upgraded in place while a client searches; then the same command
again, which does nothing.

Lean on purpose (CI time): the session's serving world (its base, its aligned model as
round 1's model, their embeddings, indexes and rephrased queries are reused), 8 votes a round,
the frozen-backbone reward head, 4 alignment steps on one Ray Train worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)


def _argv(w, work: Path, port: int) -> list[str]:
    return [f"world={w.root / 'world'}", f"workdir={work}", f"base={w.base}",
            f"base_embeddings={w.root / 'emb_base'}", f"base_index={w.index_base}",
            f"rephrased={w.root / 'rephrased'}", f"initial={w.aligned}",
            f"initial_index={w.index_aligned}", "rounds=2", "votes_per_round=8", "k=8",
            "rater_threads=2", "index_factory=Flat", "raters.n_raters=10",
            "retrain.reward_kind=head", "retrain.reward_steps=20", "retrain.align_steps=4",
            "retrain.pairs_per_step=16", "retrain.captions_per_step=32",
            "retrain.eval_every=0", "retrain.selection=last", f"serve.port={port}",
            "serve.probe_period_s=0.02"]


def test_two_rounds_through_serve_and_http_upgrade_in_place_and_resume(
        serving_world, serve_http, tmp_path, monkeypatch):
    from ray import serve

    from aligner.data.preferences import read_preferences
    from aligner.feedback.rounds import ApiClient, read_votes_log
    from aligner.retrieval.models import ModelSpec
    from aligner.retrieval.service import SearchService
    from aligner.runtime.config import build_config
    from jobs.loop import DEFAULT_YAML, LoopConfig, main, run

    monkeypatch.delenv("ALIGNER_API_KEY", raising=False)  # the loop draws its own key
    work = tmp_path / "loop"
    argv = _argv(serving_world, work, int(serve_http.rsplit(":", 1)[1]))
    try:
        assert main(argv) == 0
        rounds = [json.loads((work / "rounds" / f"r0{r}" / "manifest.json").read_text())
                  for r in (1, 2)]
        for r, m in enumerate(rounds, 1):
            rd = work / "rounds" / f"r0{r}"
            assert m["complete"] and m["round"] == r
            # every vote the raters cast through HTTP is in the database, once
            assert m["votes"]["votes_cast"] == 8 and m["votes_cast_total"] == 8 * r
            assert m["votes"]["database"]["recorded_equals_cast"]
            assert m["export"]["votes"] == 8 * r and m["votes_recorded_equals_cast"]
            assert m["export"]["rows"] == m["export"]["pairs"] == read_preferences(
                rd / "export").num_rows > 0
            # a reward checkpoint and an aligned checkpoint per round, trained on votes whose
            # images are training material only
            ckpt = rd / "retrain"
            assert (ckpt / "reward" / "checkpoint" / "reward_head.safetensors").is_file()
            assert (ckpt / "aligned" / "checkpoint" / "open_clip_model.safetensors").is_file()
            kept = m["reward"]["votes"]
            assert kept["pairs_in"] == m["export"]["rows"]
            assert kept["pairs_kept"] + kept["pairs_dropped"] == kept["pairs_in"]
            # the upgrade in place: searches kept coming, none failed
            assert m["upgrade"]["requests"] > 0 and m["upgrade"]["failed"] == 0, m["upgrade"]
            assert m["new"]["checkpoint"] == str(ckpt / "aligned" / "checkpoint")
        assert rounds[0]["served"]["aligned"] == str(serving_world.aligned.resolve())
        assert rounds[1]["served"]["aligned"] == rounds[0]["new"]["checkpoint"]

        # round 2's raters saw round 1's model: its rows are that model's search results
        r1 = rounds[0]["new"]
        svc = SearchService.open(ModelSpec(checkpoint=r1["checkpoint"]), {"main": r1["index"]})
        votes = list(read_votes_log(work / "rounds" / "r02" / "votes" / "votes.jsonl").values())
        assert len(votes) == 8
        for v in votes[:3]:
            row = v["left_ids"] if v["left_model"] == "aligned" else v["right_ids"]
            assert row == svc.search(svc.encode_texts([v["query"]])[0], 8).ids
            assert v["preferred"] in ("left", "right", "tie") and 1 <= v["confidence"] <= 5

        # the application now serves round 2's model
        client = ApiClient(serve_http)
        now = client.call("GET", "/v1/indexes").body["models"]
        assert now["aligned"]["model"]["checkpoint"] == rounds[1]["new"]["checkpoint"]
        report = (work / "loop_report.md").read_text()
        assert report.count("\n| ") == 3 and "0 failed of" in report  # header + 2 rounds

        # the same command again does nothing (finished rounds are never redone)
        before = {p: p.read_bytes() for p in (work / "rounds").rglob("manifest.json")}
        again = run(build_config(LoopConfig, DEFAULT_YAML, argv))
        assert again["ran"] == [] and len(again["rounds"]) == 2
        assert {p: p.read_bytes() for p in before} == before
    finally:
        serve.delete("aligner")
