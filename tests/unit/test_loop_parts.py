"""The feedback loop without Ray: its config, the vote filter (test-split and gallery images
never reach training), the raters' HTTP client against a fake API (retries, idempotency keys,
resume), the upgrade probe's counting, finished rounds and the report."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from aligner.data.preferences import rows_to_table
from aligner.feedback.retrain import (
    RetrainSettings,
    align_config,
    filter_votes,
    read_votes,
    teacher_components,
    votes_fingerprint,
)
from aligner.feedback.rounds import (
    ApiClient,
    Query,
    SearchProbe,
    cast_votes,
    read_votes_log,
    report_row,
    round_complete,
    write_report,
)
from aligner.runtime.config import ConfigError, build_config

# ----------------------------------------------------------------------------- config


def test_loop_config_defaults_overrides_and_validation():
    from jobs.loop import DEFAULT_YAML, LoopConfig

    cfg = build_config(LoopConfig, DEFAULT_YAML, [])
    assert (cfg.k, cfg.serve.port, cfg.retrain.teacher, cfg.retrain.reward_kind) == (
        8, 8000, "reward", "finetune")
    cfg = build_config(LoopConfig, DEFAULT_YAML, [
        "rounds=2", "votes_per_round=10", "retrain.teacher=mix", "retrain.reward_kind=head",
        "serve.port=18000", "raters.n_raters=5", "ray_address=127.0.0.1:6379"])
    assert (cfg.rounds, cfg.retrain.teacher, cfg.serve.port, cfg.raters.n_raters) == (
        2, "mix", 18000, 5)
    assert cfg.retrain.ray_address == "127.0.0.1:6379"  # the trainers join the same cluster
    for bad in (["rounds=0"], ["k=0"], ["retrain.teacher=oracle"], ["retrain.reward_kind=x"],
                ["serve.port=70000"], ["serve.replicas=0"], ["initial_index=/x"],
                ["retrain.image_splits=[train,test]"], ["no_such_key=1"],
                ["retrain.reward_batch_size=63", "retrain.num_workers=2"]):
        with pytest.raises(ConfigError):
            build_config(LoopConfig, DEFAULT_YAML, bad)


def test_teachers_and_align_config():
    assert teacher_components("reward") == {"aesthetic": ["reward"], "aesthetic_weights": [1.0]}
    mix = teacher_components("mix", 2.0)
    assert mix["aesthetic"] == ["scorer", "contrast", "reward"]
    assert mix["aesthetic_weights"] == [1.0, 1.0, 2.0]
    s = RetrainSettings(align_steps=6, eval_every=60, checkpoint_every=50, selection="last",
                        threads_per_worker=1)
    ac = align_config("/w", "/b/checkpoint", "/p", "/o", s)
    assert (ac.model.checkpoint, ac.train.steps, ac.train.eval_every,
            ac.train.checkpoint_every, ac.threads_per_worker) == ("/b/checkpoint", 6, 6, 6, 1)


def test_app_args_pass_the_applications_own_checks(tmp_path):
    from aligner.feedback.prepare import Prep, Served
    from jobs.loop import LoopConfig
    from serving.config import AppArgs
    from serving.rollout import app_args, deployment_options

    cfg = LoopConfig(serve=build_config(LoopConfig, None, ["serve.replicas=3"]).serve)
    prep = Prep(tmp_path, tmp_path / "world", tmp_path / "base", tmp_path / "emb",
                tmp_path / "index", tmp_path / "reph", Served(tmp_path / "a0", tmp_path / "i0"))
    args = app_args(cfg.serve, prep, Served(tmp_path / "a1", tmp_path / "i1"), "secret")
    a = AppArgs(**args)  # unknown keys or bad values would raise
    assert a.compare == ("base", "aligned") and a.default_model == "aligned"
    assert a.models["aligned"].checkpoint == str(tmp_path / "a1")
    assert a.auth.key() == "secret" and a.auth.protect == "writes"
    assert a.data_dir == str(tmp_path / "serving")
    assert a.limits.request_timeout_s == cfg.serve.request_timeout_s
    opts = deployment_options(cfg.serve)
    assert opts["ingress"]["num_replicas"] == opts["retriever_aligned"]["num_replicas"] == 3
    # every deployment starts its new replicas before stopping old ones, and reserves no CPU
    assert set(opts) == {"ingress", "retriever_aligned", "retriever_base", "reranker",
                         "rephraser", "judge"}
    assert all(o["max_surge_percent"] == 100 and o["ray_actor_options"] == {"num_cpus": 0.0}
               for o in opts.values())


# ----------------------------------------------------------------------------- votes


def _votes(pairs: list[tuple[str, str]]) -> pa.Table:
    return rows_to_table([{"query_id": f"q{i % 3}", "query": f"query {i % 3}", "chosen_id": a,
                           "rejected_id": b, "source": "human", "weight": 0.8}
                          for i, (a, b) in enumerate(pairs)])


def test_filter_votes_drops_test_gallery_unknown_and_degraded_images():
    split = {"a": "train", "b": "train", "c": "val", "t": "test", "g": "val"}
    table = _votes([("a", "b"), ("a", "c"), ("a", "t"), ("t", "g"), ("g", "b"), ("a", "zz"),
                    ("a~blur", "a"), ("b", "a")])
    kept, counts = filter_votes(table, split, {"g"})
    assert [(r["chosen_id"], r["rejected_id"]) for r in kept.to_pylist()] == [
        ("a", "b"), ("a", "c"), ("b", "a")]
    assert counts["dropped"] == {"degraded": 1, "unknown": 1, "gallery": 2, "test": 1,
                                 "split": 0}
    assert counts["pairs_in"] == 8 and counts["pairs_kept"] == 3
    train_only, c2 = filter_votes(table, split, {"g"}, keep_splits=["train"])
    assert train_only.num_rows == 2 and c2["dropped"]["split"] == 1
    # a corpus without a split column holds nothing out by split (galleries still go)
    none_split = dict.fromkeys(split)
    assert filter_votes(table, none_split, {"g"})[0].num_rows == 4


def test_votes_from_paths_and_fingerprints(tmp_path):
    from aligner.data.preferences import write_preferences

    t1, t2 = _votes([("a", "b")]), _votes([("b", "c"), ("c", "a")])
    write_preferences(t1, tmp_path / "r1")
    write_preferences(t2, tmp_path / "r2")
    both = read_votes([tmp_path / "r1", tmp_path / "r2"])
    assert both.num_rows == 3 and read_votes(t1).num_rows == 1
    assert votes_fingerprint(both) == votes_fingerprint(read_votes([tmp_path / "r1",
                                                                    tmp_path / "r2"]))
    assert votes_fingerprint(both) != votes_fingerprint(t2)


class FakeApi(BaseHTTPRequestHandler):
    """/v1/compare and /v1/votes as the ingress answers them: keyed votes, a 503 now and
    then, a 401 without the key."""

    state: dict = {}

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        out = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.headers.get("authorization") != "Bearer k3y":
            self._send(401, {"detail": "a valid API key is needed"})
            return
        with self.state["lock"]:
            self._send(200, {"counts": {"votes": len(self.state["votes"])}, "votes": []})

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        s = self.state
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        with s["lock"]:
            s["calls"].append(self.path)
            n = s["calls"].count(self.path)
        if self.path == "/v1/search":
            self._send(200 if n % 4 else 503, {"ids": ["a"]})
        elif self.path == "/v1/compare":
            if n % 5 == 0:  # a transient failure: retried by the client
                self._send(503, {"detail": "busy"}, {"Retry-After": "0"})
                return
            with s["lock"]:
                cid = f"c{len(s['comparisons'])}"
                s["comparisons"][cid] = body["text"]
            self._send(200, {"comparison_id": cid, "query": body["text"],
                             "left": {"results": [{"id": f"L{i}"} for i in range(body["k"])]},
                             "right": {"results": [{"id": f"R{i}"} for i in range(body["k"])]}})
        elif self.path == "/v1/votes":
            if self.headers.get("authorization") != "Bearer k3y":
                self._send(401, {"detail": "a valid API key is needed"})
                return
            key = self.headers.get("idempotency-key")
            with s["lock"]:
                first = key not in s["votes"]
                if first:
                    s["votes"][key] = body
                    if len(s["votes"]) % 3 == 0 and not s.get("dropped_once"):
                        s["dropped_once"] = True  # written, but the answer is lost
                        self.close_connection = True
                        return
            self._send(200, {"vote_id": list(s["votes"]).index(key) + 1,
                             "comparison_id": body["comparison_id"], "replayed": not first,
                             "left_model": "aligned", "right_model": "base"})

    def log_message(self, *args: object) -> None:
        pass


class FakePopulation:
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def row_vote(self, query_id, left_ids, right_ids, rng):
        self.seen.append((query_id, tuple(left_ids), tuple(right_ids)))
        return ("left", "right", "tie")[int(rng.integers(3))], int(rng.integers(1, 6)), 7

    def stats(self):
        return {"agreement": 0.65}


@pytest.fixture()
def fake_api():
    FakeApi.state = {"lock": threading.Lock(), "calls": [], "comparisons": {}, "votes": {}}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeApi.state
    server.shutdown()


QUERIES = [Query("q1", "two red circles"), Query("q2", "a yellow star"), Query("q3", "sand")]


def test_cast_votes_through_http_retries_and_resumes(fake_api, tmp_path):
    url, state = fake_api
    client = ApiClient(url, "k3y", timeout_s=5)
    pop = FakePopulation()
    counts = cast_votes(client, pop, QUERIES, 7, 4, seed=1, round_no=1, out_dir=tmp_path,
                        threads=3, deadline_s=20)
    log = read_votes_log(tmp_path / "votes.jsonl")
    assert counts["votes_cast"] == 7 == len(log) == len(state["votes"])  # none twice
    assert counts["retries"]["compare"] >= 1 and counts["retries"]["vote"] >= 1
    assert counts["replayed"] >= 1  # the vote whose answer was lost was resent with its key
    assert counts["database"] == {"votes_before": 0, "votes_after": 7, "recorded_now": 7,
                                  "cast_now": 7, "recorded_equals_cast": True}
    assert all(len(left) == 4 and left[0] == "L0" for _, left, _ in pop.seen)
    assert {r["winner"] for r in log.values()} <= {"aligned", "base", "tie"}
    for r in log.values():  # the rater's choice is what the API stored
        assert state["votes"][r["idempotency_key"]]["preferred"] == r["preferred"]
    # the same vote numbers draw the same queries; a re-run casts only what is missing
    first = {i: (r["query_id"], r["preferred"]) for i, r in log.items()}
    lines = (tmp_path / "votes.jsonl").read_text().splitlines()
    (tmp_path / "votes.jsonl").write_text("\n".join(lines[:4]) + "\n{torn")
    again = cast_votes(client, FakePopulation(), QUERIES, 7, 4, seed=1, round_no=1,
                       out_dir=tmp_path, threads=2, deadline_s=20)
    assert again["resumed_with"] == 4 and again["votes_cast"] == 7
    assert again["database"]["cast_now"] == 3
    assert {i: (r["query_id"], r["preferred"]) for i, r in
            read_votes_log(tmp_path / "votes.jsonl").items()} == first


def test_cast_votes_without_the_key_fails_clearly(fake_api, tmp_path):
    from aligner.feedback.rounds import VoteError

    url, _ = fake_api
    with pytest.raises(VoteError, match="401"):  # the vote count, before any vote
        cast_votes(ApiClient(url, "wrong"), FakePopulation(), QUERIES, 2, 3, 0, 1, tmp_path,
                   deadline_s=5)


def test_probe_counts_failed_requests_in_a_window(fake_api):
    import time

    url, _ = fake_api
    probe = SearchProbe(ApiClient(url, timeout_s=5), ["q"], period_s=0.01)
    probe.start()
    t0 = time.time()
    while len(probe.requests) < 12:
        time.sleep(0.01)
    probe.stop()
    w = probe.window(0, time.time())
    assert w["requests"] == len(probe.requests) >= 12
    assert w["failed"] == sum(s != 200 for _, _, s, _ in probe.requests) >= 2
    assert w["failed_by_status"] == {"503": w["failed"]}
    assert probe.window(t0 + 3600, t0 + 7200)["requests"] == 0
    # no server: every request is a failure with status 0
    dead = ApiClient("http://127.0.0.1:9", timeout_s=1).call("POST", "/v1/search", {})
    assert dead.status == 0 and dead.transient and dead.error


# ----------------------------------------------------------------------------- rounds


def _round(r: int, failed: int = 0) -> dict:
    return {"job": "loop_round", "complete": True, "round": r, "wall_time_s": 100.0 + r,
            "served": {"aligned": f"/w/r{r - 1:02d}/aligned/checkpoint"},
            "votes_cast_total": 10 * r, "votes": {"winners": {"aligned": 6, "base": 3, "tie": 1}},
            "export": {"votes": 10 * r, "pairs": 70 * r},
            "reward": {"val_acc_vs_votes": 0.61, "votes": {
                "pairs_kept": 40 * r, "pairs_dropped": 30 * r,
                "dropped": {"test": 20 * r, "gallery": 10 * r}}},
            "upgrade": {"failed": failed, "requests": 120, "seconds_until_new_version": 14.2},
            "timings_s": {"votes": 9.0, "reward": 7.0, "preferences": 5.0, "aligned": 30.0,
                          "embed+index": 20.0}}


def test_round_complete_only_for_a_finished_round(tmp_path):
    assert round_complete(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({**_round(1), "complete": False}))
    assert round_complete(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{torn")
    assert round_complete(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps(_round(1)))
    assert round_complete(tmp_path)["round"] == 1



def test_round_outputs_reads_back_what_a_round_left(tmp_path):
    from aligner.feedback.rounds import round_outputs

    def put(path: Path, data) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data if isinstance(data, str) else json.dumps(data))

    rounds = tmp_path / "rounds"
    line = {"rater": 1, "query_id": "q1", "preferred": "left", "winner": "aligned",
            "confidence": 4}
    put(rounds / "r01" / "votes" / "votes.jsonl", "".join(
        json.dumps({**line, "i": i}) + "\n" for i in range(3)))
    put(rounds / "r02" / "votes" / "votes.jsonl", json.dumps({**line, "i": 0}) + "\n")
    put(rounds / "r03" / "votes" / "votes.jsonl", json.dumps({**line, "i": 0}) + "\n")
    rd = rounds / "r02"
    counts = {"votes_cast": 1, "database": {"recorded_equals_cast": True, "votes_after": 4}}
    put(rd / "votes" / "manifest.json", {"counts": counts, "raters": {"agreement": 0.7}})
    put(rd / "export" / "manifest.json", {"counts": {"votes": 4, "pairs": 9}})
    put(rd / "upgrade" / "manifest.json", {"requests": 50, "failed": 0, "other": 1})
    o = round_outputs(rd, votes_wanted=1)
    assert o["votes"] == counts and o["raters"] == {"agreement": 0.7}
    assert o["votes_cast_total"] == 4  # rounds 1 and 2, not the later round 3
    assert o["export"] == {"votes": 4, "pairs": 9} and o["votes_recorded_equals_cast"]
    assert o["upgrade"]["requests"] == 50 and "other" not in o["upgrade"]
    # a round without a votes manifest counts its log; an export that disagrees is flagged
    (rd / "votes" / "manifest.json").unlink()
    put(rd / "export" / "manifest.json", {"counts": {"votes": 3}})
    o = round_outputs(rd, votes_wanted=1)
    assert o["votes"]["votes_cast"] == 1 and not o["votes_recorded_equals_cast"]


def test_prepare_needs_a_made_world(tmp_path):
    from aligner.feedback.prepare import prepare
    from aligner.feedback.retrain import RetrainSettings
    from aligner.runtime.pipeline import Pipeline
    from jobs.loop import LoopConfig

    cfg = LoopConfig(world=str(tmp_path / "world"), workdir=str(tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="no corpus"):
        prepare(cfg, RetrainSettings(), Pipeline(tmp_path / "w", fresh=False), tmp_path / "w")

def test_report_has_one_row_per_round(tmp_path: Path):
    md = write_report(tmp_path, [_round(1), _round(2, failed=1)], {"teacher": "reward"})
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "round" not in line]
    assert len(rows) == 2 and "0 / 120" in rows[0] and "1 / 120" in rows[1]
    assert "1 failed of 240 searches" in text and "- teacher: reward" in text
    data = json.loads((tmp_path / "loop_report.json").read_text())
    assert [r["round"] for r in data["rows"]] == [1, 2]
    row = report_row(_round(2))
    assert (row["votes_cast"], row["votes_recorded"], row["pairs_kept"]) == (20, 20, 80)
    assert row["pairs_dropped"] == "60 (40 / 20)" and row["aligned_won"] == "6 / 9"
    assert row["seconds"] == "9, 7, 5, 30, 20"


def test_with_options_reaches_nested_deployments_once_and_versions_them():
    from ray import serve

    from serving.rollout import code_fingerprint, with_options

    @serve.deployment
    class Leaf:
        def __init__(self, n: int) -> None:
            self.n = n

    @serve.deployment
    class Root:
        def __init__(self, leaves: dict, again: object, path: str) -> None:
            self.leaves = leaves

    def graph(path: str, n: int = 1, code: str = "c1"):
        leaf = Leaf.options(name="leaf").bind(n)
        return with_options(Root.options(name="root").bind({"a": leaf}, leaf, path),
                            {"leaf": {"num_replicas": 2}, "root": {"num_replicas": 3}}, code)

    app = graph("/r01")
    root = app._bound_deployment
    assert root.num_replicas == 3
    nested, again, _ = root.init_args
    leaf = nested["a"]._bound_deployment
    assert leaf.num_replicas == 2 and nested["a"] is again
    assert np.array_equal(leaf.init_args, (1,))

    def versions(a):
        r = a._bound_deployment
        return r.version, r.init_args[0]["a"]._bound_deployment.version

    # the same graph, the same versions (Serve restarts nothing); a new path restarts only
    # the deployment that takes it; new code or new arguments restart what they touch
    assert versions(graph("/r01")) == versions(app)
    assert versions(graph("/r02"))[0] != versions(app)[0]
    assert versions(graph("/r02"))[1] == versions(app)[1]
    assert versions(graph("/r01", n=2))[1] != versions(app)[1]
    assert all(a != b for a, b in zip(versions(graph("/r01", code="c2")), versions(app),
                                      strict=True))
    assert len(code_fingerprint()) == 16 and code_fingerprint() == code_fingerprint()


def test_a_finished_loop_does_nothing_not_even_ray(tmp_path, monkeypatch):
    import ray

    from jobs.loop import DEFAULT_YAML, LoopConfig, run

    calls = []  # the whole suite shares one Ray: check that nothing starts or joins one
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("ray.init"))

    for r in (1, 2):
        d = tmp_path / "rounds" / f"r0{r}"
        d.mkdir(parents=True)
        m = {**_round(r), "new": {"checkpoint": str(d / "ckpt"), "index": str(d / "index")}}
        (d / "manifest.json").write_text(json.dumps(m))
    cfg = build_config(LoopConfig, DEFAULT_YAML, [f"workdir={tmp_path}", "rounds=2",
                                                  f"world={tmp_path / 'world'}"])
    out = run(cfg)
    assert out["ran"] == [] and [m["round"] for m in out["rounds"]] == [1, 2]
    assert calls == []
    assert (tmp_path / "loop_report.md").is_file()
    assert out["header"]["serving now"] == str(tmp_path / "rounds" / "r02" / "ckpt")
