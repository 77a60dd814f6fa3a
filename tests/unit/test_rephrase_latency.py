"""The query-time cost of a rephrasing (``aligner.rephrase.latency``), without Ray or an LLM.

A real ``jobs.rephrase`` output is written through :func:`aligner.rephrase.run.run_rephrase`
with the Ray Data stage replaced by the same template UDF run in-process; the local LLM is
never loaded here (too slow for a unit test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from aligner.rephrase import latency as L
from aligner.rephrase.latency import query_latency, read_rephrase_setup
from aligner.rephrase.prompt import load_prompt
from aligner.rephrase.template import TEMPLATE_VERSION

DETAIL = load_prompt("detail").id  # the prompt version this tree has, e.g. detail.v2
TV = TEMPLATE_VERSION

QUERIES = ["two red circles on grass", "a cat on a sofa", "three blue stars on sand",
           "a dog", "a lighthouse by the sea"]


def _queries(tmp_path: Path) -> Path:
    p = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in range(len(QUERIES))],
                             "query": QUERIES, "split": ["test"] * len(QUERIES),
                             "kind": ["content"] * len(QUERIES)}), p)
    return p


def _rephrase_output(tmp_path: Path, monkeypatch, **over) -> Path:
    """A finished ``jobs.rephrase`` output (manifest, config.yaml, queries.parquet), made by
    the library with its Ray Data stage swapped for the template UDF in this process."""
    from aligner.rephrase import pipeline as P
    from aligner.rephrase import run as R

    def no_ray(cfg, out, pending):
        table = pq.read_table(cfg.input)
        table = table.filter(pc.is_in(table["query_id"], pa.array(pending)))
        batch = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
        cols = P.template_batch(batch, style="detail", polarity=cfg.polarity,
                                max_chars=cfg.max_chars or None)
        writer = P.PartWriter(out, cfg.rows_per_part)
        writer.add(pa.table({k: list(v) for k, v in cols.items()}))
        writer.flush()
        return {"pipeline_s": 0.0}

    monkeypatch.setattr(R, "_rephrase", no_ray)
    out = tmp_path / "rephrased"
    R.run_rephrase(R.RephraseConfig(input=str(_queries(tmp_path)), output=str(out),
                                    backend="template", **over))
    return out


def test_template_output_is_rebuilt_and_timed_one_query_per_call(tmp_path, monkeypatch):
    out = _rephrase_output(tmp_path, monkeypatch)
    assert {"manifest.json", "config.yaml", "queries.parquet"} <= {p.name for p in out.iterdir()}
    manifest, config = read_rephrase_setup(out)
    assert config["backend"] == "template" and manifest["prompt"] == DETAIL
    recorded = pq.read_table(out / "queries.parquet")["rephraser"].to_pylist()

    calls = []
    real = L.build_rephraser

    def spy(*a, **k):
        r = real(*a, **k)
        inner = r.rephrase_rows
        r.rephrase_rows = lambda qs: calls.append(list(qs)) or inner(qs)
        return r

    monkeypatch.setattr(L, "build_rephraser", spy)
    res = query_latency(out, QUERIES, n=4, warmup=2)
    assert res["measured"] is True and res["n"] == 4
    assert res["backend"] == f"template:good/detail.{TV}" == recorded[0]  # as the rows say
    assert res["where"] == "this machine, one query per call"
    assert 0 <= res["ms_per_query"] <= res["p90_ms"] < 1000 and res["load_s"] >= 0
    assert "note" not in res and "threads" not in res  # no torch for the template
    # 2 warm-up calls after the timed queries, then one query per call: the first n
    assert calls == [[QUERIES[4]], [QUERIES[0]], *[[q] for q in QUERIES[:4]]]


def test_the_same_rephraser_is_rebuilt_from_the_manifest(tmp_path, monkeypatch):
    out = _rephrase_output(tmp_path, monkeypatch, polarity="bad", max_chars=500)
    manifest, config = read_rephrase_setup(out)
    r = L.build_rephraser(manifest, config)
    assert (r.version, r.polarity, r.max_chars) == (f"template:bad/detail.{TV}", "bad", 500)
    rows = pq.read_table(out / "queries.parquet").to_pylist()
    assert [r.rephrase_rows([x["query"]])[0].text for x in rows] == [x["rephrased"] for x in rows]
    # the file itself names its output too; fewer queries than n are cycled
    res = query_latency(out / "queries.parquet", QUERIES[:2], n=5, warmup=0)
    assert res["measured"] and res["n"] == 5 and res["backend"] == f"template:bad/detail.{TV}"


def test_local_llm_settings_are_those_of_the_job(monkeypatch):
    """The local back end is rebuilt with the job's model, prompt version and decoding (the
    constructor is stubbed: no model is loaded)."""
    import aligner.rephrase.base as B

    got = {}
    monkeypatch.setattr(B, "make_rephraser", lambda backend, **kw: got.update(kw, b=backend))
    manifest = {"prompt": DETAIL, "rephraser_versions": {
        f"local:smollm2-135m/{DETAIL}": 40, f"template:good/detail.{TV}": 60}}
    config = {"backend": "local", "style": "detail", "max_chars": 0, "strict": True,
              "batch_size": 32, "local": {"model_path": None, "max_new_tokens": 24,
                                          "repetition_penalty": 1.2, "temperature": 0.0}}
    L.build_rephraser(manifest, config, num_threads=1)
    assert got == {"b": "local", "prompt": DETAIL, "max_chars": None, "strict": True,
                   "batch_size": 1, "num_threads": 1, "model_path": None,
                   "max_new_tokens": 24, "repetition_penalty": 1.2, "temperature": 0.0}
    # the LLM's own version, not the fallback's (more frequent) one
    assert L.expected_version(manifest, config) == f"local:smollm2-135m/{DETAIL}"
    assert L.expected_version({"prompt": DETAIL}, config) == f"local:smollm2-135m/{DETAIL}"
    # threads as the job's actors: 1 (2 above 4 CPUs), or the job's threads_per_actor
    assert L.job_threads(config, cpus=2) == 1 and L.job_threads(config, cpus=16) == 2
    assert L.job_threads({**config, "threads_per_actor": 3}, cpus=2) == 3
    L.build_rephraser(manifest, config)
    assert got["num_threads"] == L.job_threads(config)
    # a prompt version this tree no longer has: the style's current one is built instead
    L.build_rephraser({"prompt": "detail.v0"}, config)
    assert got["prompt"] == "detail"


@pytest.mark.parametrize("backend,model", [("openai", "gpt-x"), ("vllm", "org/m")])
def test_remote_and_gpu_back_ends_are_not_measured(tmp_path, backend, model):
    out = tmp_path / "r"
    out.mkdir()
    cfg = {"backend": backend, "style": "detail", backend: {"model": model}}
    (out / "manifest.json").write_text(json.dumps({
        "job": "rephrase", "config": cfg, "backend": backend, "prompt": "detail.v1",
        "rephraser_versions": {f"{backend}:{model}/detail.v1": 3}}))
    res = query_latency(out, QUERIES)
    assert res["measured"] is False and res["backend"] == f"{backend}:{model}/detail.v1"
    assert res["why"] and "ms_per_query" not in res


def test_an_older_version_is_timed_as_this_tree_builds_it_and_said_so(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({
        "backend": "template", "prompt": "detail.v0", "polarity": "good",
        "config": {"backend": "template", "style": "detail", "polarity": "good"},
        "rephraser_versions": {"template:good/detail.v0": 5}}))
    res = query_latency(out, QUERIES, n=2, warmup=0)
    assert res["measured"] and res["backend"] == "template:good/detail.v0"
    assert res["note"] == (f"timed template:good/detail.{TV} (what this tree builds); the "
                           "output's rows say template:good/detail.v0")


def test_config_yaml_alone_is_enough(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("backend: template\nstyle: k_list\npolarity: good\n")
    res = query_latency(out, QUERIES, n=2, warmup=1)
    assert res["measured"] and res["backend"] == f"template:good/k_list.{TV}"


def test_missing_or_unreadable_manifests_never_raise(tmp_path):
    res = query_latency(tmp_path / "nowhere", QUERIES)
    assert res["measured"] is False and res["backend"] is None and "manifest" in res["why"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    assert query_latency(bad, QUERIES)["measured"] is False
    (bad / "manifest.json").write_text(json.dumps({"job": "rephrase"}))  # no back end
    assert query_latency(bad, QUERIES)["measured"] is False


def test_a_failing_rebuild_or_no_queries_is_reported_not_raised(tmp_path, monkeypatch):
    out = tmp_path / "r"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({
        "backend": "local", "prompt": "detail.v1", "config": {"backend": "local"}}))

    def boom(*a, **k):
        raise ModuleNotFoundError("the local rephraser needs the model wheel")

    monkeypatch.setattr(L, "build_rephraser", boom)
    res = query_latency(out, QUERIES)
    assert res == {"backend": "local:smollm2-135m/detail.v1", "measured": False,
                   "why": "could not rebuild or run it here: ModuleNotFoundError: the local "
                          "rephraser needs the model wheel"}
    assert query_latency(out, [])["why"] == "no queries to time"
