"""The rephrase job on the session's local Ray, and the openai back end over real HTTP.

A tiny stdlib HTTP server on 127.0.0.1 implements ``POST /v1/chat/completions`` in a few
modes: ``ok`` (a canned, label-wrapped completion that keeps the query), ``flaky`` (500 on the
first request of each query, then 200), ``garbage`` (200 with a body that is not JSON),
``slow`` (answers after the client's timeout) and ``bad_key`` (401 without the right key).
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligner.rephrase.base import check_rephrase
from aligner.rephrase.openai_compat import OpenAICompatRephraser
from aligner.rephrase.run import RephraseConfig
from aligner.rephrase.run import run_rephrase as run
from aligner.rephrase.template import TemplateRephraser
from jobs.rephrase import main

QUERIES = ["two red circles on grass", "a cat on a sofa", "three blue stars on sand",
           "a pair of scarlet donuts on sandy ground", "a single mauve diamond shape",
           "one purple star shape on wood", "a lone green ring over grass",
           "blood-red circle outlines over wood", "a couple of orange donuts over grass",
           "two lilac discs in front of a white background", "rose rhombuses on sand",
           "a set of three violet boxes in front of a wooden table"]


def _answer(query: str) -> str:
    return f'Rephrased: "{query}, soft window light, sharp focus"\nHope this helps!'


class FakeLLM:
    """An OpenAI-compatible chat-completions server on a free loopback port."""

    def __init__(self, mode: str = "ok", key: str = "sk-test-123") -> None:
        self.mode, self.key = mode, key
        self.seen: Counter[str] = Counter()
        self.auth: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                query = body["messages"][-1]["content"]
                if body.get("continue_final_message"):
                    query = body["messages"][-2]["content"]
                fake.seen[query] += 1
                fake.auth.append(self.headers.get("Authorization"))
                if fake.mode == "bad_key" and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    return self._send(401, b'{"error": "bad key"}')
                if fake.mode == "flaky" and fake.seen[query] == 1:
                    return self._send(500, b"internal error", "text/plain")
                if fake.mode == "garbage":
                    return self._send(200, b"<html>this is not json</html>", "text/html")
                if fake.mode == "slow":
                    threading.Event().wait(1.5)
                content = _answer(query)
                if body.get("continue_final_message"):
                    content = " golden light, crisp focus"
                if "drop me" in query:
                    content = "something else entirely, soft light"
                reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}
                return self._send(200, json.dumps(reply).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _client(url: str, **kw) -> OpenAICompatRephraser:
    kw = {"max_retries": 2, "backoff_s": 0.01, "timeout_s": 5.0, "max_concurrency": 4} | kw
    return OpenAICompatRephraser(base_url=url, model="fake-llm", **kw)


# ---------------------------------------------------------------- openai back end over HTTP


def test_openai_ok_cleans_answers_and_sends_the_key(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test-123")
    with FakeLLM("bad_key") as srv:
        r = _client(srv.url, api_key_env="FAKE_KEY")
        rows = r.rephrase_rows(QUERIES[:4])
        assert [x.text for x in rows] == [f"{q}, soft window light, sharp focus"
                                          for q in QUERIES[:4]]
        assert not any(x.fallback for x in rows)
        assert {x.rephraser for x in rows} == {"openai:fake-llm/detail.v2"}
        assert set(srv.auth) == {"Bearer sk-test-123"}
        assert "sk-test-123" not in json.dumps(r.describe())
        monkeypatch.setenv("FAKE_KEY", "wrong")  # 401 is not retried; rows fall back
        rows = r.rephrase_rows(["a cat on a sofa"])
        assert rows[0].fallback and rows[0].reason == "http_error: 401 Unauthorized"
        assert srv.seen["a cat on a sofa"] == 2  # one request each time: no retry on 401


def test_openai_retries_500_then_succeeds():
    with FakeLLM("flaky") as srv:
        r = _client(srv.url)
        rows = r.rephrase_rows(QUERIES[:3])
        assert not any(x.fallback for x in rows), rows
        assert all(srv.seen[q] == 2 for q in QUERIES[:3])
        assert r.stats["retries"] == 3 and r.stats["failed"] == 0
        r0 = _client(srv.url, max_retries=0)  # no retries left: falls back, never raises
        rows = r0.rephrase_rows(["a brand new query about a dog"])
        assert rows[0].fallback and rows[0].reason.startswith("http_error: 500")


def test_openai_garbage_timeout_and_unfaithful_answers_fall_back():
    with FakeLLM("garbage") as srv:
        rows = _client(srv.url).rephrase_rows(QUERIES[:2])
        assert all(x.fallback and x.reason.startswith("bad_response") for x in rows)
        assert [x.text for x in rows] == TemplateRephraser("detail").rephrase_batch(QUERIES[:2])
    with FakeLLM("slow") as srv:
        rows = _client(srv.url, timeout_s=0.3, max_retries=1).rephrase_rows(["a cat on a sofa"])
        assert rows[0].fallback and rows[0].reason.startswith("connection_error")
    with FakeLLM("ok") as srv:
        rows = _client(srv.url).rephrase_rows(["please drop me", "a cat on a sofa"])
        assert rows[0].fallback and rows[0].reason.startswith("drops_content")
        assert not rows[1].fallback
    with FakeLLM("ok") as srv:  # nobody listens on the old port any more
        url = srv.url
    rows = _client(url, max_retries=1).rephrase_rows(["a cat on a sofa"])
    assert rows[0].fallback and rows[0].reason.startswith("connection_error")


def test_openai_prefill_continues_the_answer_prefix():
    with FakeLLM("ok") as srv:
        r = _client(srv.url, prefill=True)
        body = r.payload("a cat on a sofa")
        assert body["continue_final_message"] and body["messages"][-1] == {
            "role": "assistant", "content": "a cat on a sofa,"}
        assert r.rephrase_batch(["a cat on a sofa"]) == ["a cat on a sofa, golden light, crisp focus"]


# ---------------------------------------------------------------- the job on Ray Data


def _write_queries(path, n: int = 12, **extra) -> list[str]:
    ids = [f"q-{i:03d}" for i in range(n)]
    cols = {"query_id": ids, "query": [QUERIES[i % len(QUERIES)] for i in range(n)],
            "split": ["train" if i % 3 else "test" for i in range(n)],
            "kind": ["content"] * n, **extra}
    pq.write_table(pa.table(cols), path)
    return ids


def test_job_template_end_to_end_skip_and_overwrite(ray_session, tmp_path):
    src = tmp_path / "queries.parquet"
    ids = _write_queries(src, 12)
    out = tmp_path / "out"
    args = [f"input={src}", f"output={out}", "backend=template", "style=kw_dict",
            "progress=false", "rows_per_part=5"]
    assert main(args) == 0
    t = pq.read_table(out / "queries.parquet")
    assert t.column_names == ["query_id", "query", "split", "kind", "rephrased", "rephraser",
                              "fallback", "fallback_reason"]
    assert t["query_id"].to_pylist() == ids  # input order
    for q, r in zip(t["query"].to_pylist(), t["rephrased"].to_pylist(), strict=True):
        assert r == TemplateRephraser("kw_dict").rephrase_one(q)
    assert set(t["rephraser"].to_pylist()) == {"template:good/kw_dict.v3"}
    m = json.loads((out / "manifest.json").read_text())
    assert (m["rows_in"], m["rows_out"], m["fallbacks"], m["backend"], m["prompt"]) == (
        12, 12, 0, "template", "kw_dict.v2")
    assert m["this_run"]["rows"] == 12 and m["this_run"]["queries_per_s"] > 0
    assert (out / "config.yaml").is_file() and not (out / "parts").exists()
    # a complete output is skipped
    assert run(RephraseConfig(input=str(src), output=str(out), style="kw_dict",
                              progress=False))["skipped"]
    # another configuration on the same output is refused; overwrite redoes it
    with pytest.raises(ValueError, match="another configuration"):
        run(RephraseConfig(input=str(src), output=str(out), style="reorg", progress=False))
    m = run(RephraseConfig(input=str(src), output=str(out), style="reorg", polarity="bad",
                           splits=["test"], overwrite=True, progress=False))
    t3 = pq.read_table(out / "queries.parquet")
    assert m["rows_out"] == 4 and set(t3["split"].to_pylist()) == {"test"}
    assert all(r.startswith("a low-quality, unfocused, grain-ridden")
               for r in t3["rephrased"].to_pylist())


def test_job_resumes_from_finished_parts(ray_session, tmp_path):
    src = tmp_path / "queries.parquet"
    ids = _write_queries(src, 12)
    out = tmp_path / "out"
    cfg = RephraseConfig(input=str(src), output=str(out), style="repeat", limit=10,
                         progress=False, rows_per_part=3)
    done = pq.read_table(src).slice(0, 4).append_column(
        "rephrased", pa.array(["kept from before"] * 4)).append_column(
        "rephraser", pa.array(["template:good/repeat.v3"] * 4)).append_column(
        "fallback", pa.array([False] * 4)).append_column("fallback_reason", pa.array([""] * 4))
    (out / "parts").mkdir(parents=True)
    pq.write_table(done, out / "parts" / "part-00000.parquet")
    m = run(cfg)  # as if a run had stopped after its first part
    assert m["this_run"]["rows"] == 6 and m["rows_out"] == 10
    t = pq.read_table(out / "queries.parquet")
    assert t["query_id"].to_pylist() == ids[:10]
    got = t["rephrased"].to_pylist()
    assert got[:4] == ["kept from before"] * 4
    assert got[4:] == TemplateRephraser("repeat").rephrase_batch(t["query"].to_pylist()[4:])


def test_job_rejects_wrong_schema(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["a cat"]}), bad)
    assert main([f"input={bad}", f"output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "ValueError" in err and re.search(r"needs columns \['query_id', 'query'\]", err)
    assert main([f"input={tmp_path / 'missing.parquet'}", f"output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "FileNotFoundError" in err
    ok = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"query_id": ["a"], "query": ["x"]}), ok)
    assert main([f"input={ok}", f"output={tmp_path / 'o'}", "kinds=[content]"]) == 2
    err = capsys.readouterr().err
    assert "ValueError" in err and re.search("no 'kind' column", err)
    num = tmp_path / "num.parquet"
    pq.write_table(pa.table({"query_id": [1], "query": ["x"]}), num)
    assert main([f"input={num}", f"output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "ValueError" in err and re.search("'query_id' must be a string", err)
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"query_id": ["a", "a"], "query": ["x", "y"]}), dup)
    assert main([f"input={dup}", f"output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "ValueError" in err and re.search("not unique", err)
    assert main([f"input={ok}", f"output={tmp_path / 'o'}", "backend=openai"]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and re.search("openai.base_url", err)


def test_job_openai_backend_against_fake_server(ray_session, tmp_path):
    src = tmp_path / "queries.parquet"
    _write_queries(src, 8)
    extra = pa.table({"query_id": ["q-drop"], "query": ["please drop me"],
                      "split": ["train"], "kind": ["content"]})
    pq.write_table(pa.concat_tables([pq.read_table(src), extra]), src)
    out = tmp_path / "out"
    with FakeLLM("flaky") as srv:
        assert main([f"input={src}", f"output={out}", "backend=openai", "progress=false",
                     f"openai.base_url={srv.url}", "openai.model=fake-llm",
                     "openai.backoff_s=0.01", "batch_size=4"]) == 0
    t = pq.read_table(out / "queries.parquet")
    assert t.num_rows == 9
    rows = t.to_pylist()
    for row in rows:
        assert check_rephrase(row["query"], row["rephrased"]) is None
    drop = [r for r in rows if r["query_id"] == "q-drop"][0]
    assert drop["fallback"] and drop["rephraser"] == "template:good/detail.v3"
    assert sum(r["fallback"] for r in rows) == 1
    m = json.loads((out / "manifest.json").read_text())
    assert m["fallbacks_by_reason"] == {"drops_content": 1}
    assert m["rephraser_versions"] == {"openai:fake-llm/detail.v2": 8,
                                       "template:good/detail.v3": 1}


def test_vllm_processor_builds_lazily_without_vllm(ray_session, tmp_path):
    """The GPU path is Ray's own processor; building it needs neither vllm nor a GPU."""
    from aligner.rephrase.vllm_batch import build_vllm_processor

    proc = build_vllm_processor(str(tmp_path / "no-model"), "k_list", concurrency=1,
                                batch_size=8)
    assert callable(proc)
