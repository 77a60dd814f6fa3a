"""Serving parts without Ray: the search service (query vectors, deduplication, the aesthetic
shift), the order-consistent judge, and the rate and body-size middleware."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pytest

from aligner.evaluation.judge import Judgment, ProxyJudge, RowView, order_consistent

# ----------------------------------------------------------------------------- judge

def _row(sim, aes, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(len(sim), 8)) * spread + np.ones(8)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return RowView(np.asarray(sim, float), np.asarray(aes, float), v)


def test_proxy_judge_by_hand():
    j = ProxyJudge(accuracy_margin=0.02, aesthetic_margin=0.2, diversity_margin=0.02)
    relevant = _row([0.6, 0.6], [0.0, 0.0], spread=0.1)
    pretty = _row([0.6, 0.61], [1.0, 1.0], spread=0.1)
    out = j(relevant, pretty)
    assert out.aspects["accuracy"] == "similar" and out.aspects["aesthetics"] == "b"
    assert out.winner == "b" and "aesthetics" in out.rationale
    off = _row([0.2, 0.2], [1.0, 1.0], spread=0.1)
    assert j(relevant, off).aspects["accuracy"] == "a"
    same, agree = order_consistent(j, relevant, relevant)
    assert same.winner == "similar" and agree


def test_order_consistency_turns_a_position_bias_into_similar():
    calls = []

    def biased(a: RowView, b: RowView) -> Judgment:  # always prefers the first row shown
        calls.append(1)
        return Judgment("a", {"accuracy": "a"}, "first is best")

    x, y = _row([0.5], [0.0]), _row([0.5], [0.0], seed=1)
    out, agree = order_consistent(biased, x, y)
    assert len(calls) == 2 and not agree and out.winner == "similar"
    assert out.aspects["accuracy"] == "similar"

    def fair(a: RowView, b: RowView) -> Judgment:
        w = "a" if a.similarity.mean() > b.similarity.mean() else "b"
        return Judgment(w, {"accuracy": w})

    out, agree = order_consistent(fair, _row([0.9], [0]), _row([0.1], [0]))
    assert agree and out.winner == "a" and out.aspects == {"accuracy": "a"}


# ----------------------------------------------------------------------------- search service

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import pyarrow.parquet as pq

    from aligner.data.embeddings import embeddings_schema
    from aligner.retrieval.index_build import build_index
    from aligner.retrieval.models import ModelSpec, load_retriever
    from aligner.retrieval.service import SearchService

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 256)).astype(np.float32)
    x[1] = x[0] + 1e-3  # a near-duplicate of image 0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    aes = np.linspace(-2, 2, 200).astype(np.float32)
    root = tmp_path_factory.mktemp("svc")
    (root / "emb").mkdir()
    table = pa.table({"id": [f"img-{i:03d}" for i in range(200)],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 256),
                      "aesthetic": aes, "caption": [f"c{i}" for i in range(200)],
                      "source": ["s"] * 200}, schema=embeddings_schema(256))
    pq.write_table(table, root / "emb" / "part.parquet")
    build_index(root / "emb", root / "flat", "Flat")
    build_index(root / "emb", root / "pq", "IVF4,PQ16x4", train_sample=200)
    r = load_retriever(ModelSpec(), device="cpu")
    from aligner.retrieval.index import SearchIndex

    return SearchService(r, {"flat": SearchIndex.load(root / "flat"),
                             "pq": SearchIndex.load(root / "pq")}), x, aes


def test_query_vector_combines_and_checks(service):
    svc, x, _ = service
    q = svc.query_vector(text=x[3], image=x[4], text_weight=1, image_weight=3)
    want = (x[3] + 3 * x[4]) / np.linalg.norm(x[3] + 3 * x[4])
    np.testing.assert_allclose(q, want, atol=1e-6)
    np.testing.assert_allclose(svc.query_vector(embedding=2 * x[5]), x[5], atol=1e-6)
    with pytest.raises(ValueError, match="nothing to search"):
        svc.query_vector()
    with pytest.raises(ValueError, match="256"):
        svc.query_vector(embedding=[1.0, 2.0])
    with pytest.raises(ValueError, match="zero"):
        svc.query_vector(text=x[3], image=x[3], text_weight=0, image_weight=0)
    with pytest.raises(KeyError, match="unknown index"):
        svc.search(x[0], 3, index="hnsw")


def test_dedup_drops_the_near_duplicate_and_keeps_k(service):
    svc, x, _ = service
    plain = svc.search(x[0], 5)
    assert plain.ids[:2] == ["img-000", "img-001"]
    dd = svc.search(x[0], 5, dedup_threshold=0.99)
    assert dd.ids[0] == "img-000" and "img-001" not in dd.ids and len(dd.ids) == 5
    assert dd.removed == [1] and "dedup" in dd.timings_ms
    np.testing.assert_allclose(svc.search(x[7], 4).scores[0], 1.0, atol=1e-5)
    assert svc.search(x[0], 10_000).ids.__len__() == 200  # k is capped at the index size


def test_aesthetic_shift_moves_towards_the_best_scored(service):
    svc, x, aes = service
    d = svc.direction()
    top = np.flatnonzero(aes >= np.quantile(aes, 0.9))
    want = x[top].mean(0) / np.linalg.norm(x[top].mean(0))
    np.testing.assert_allclose(d, want, atol=1e-5)
    shifted = svc.search(x[10], 10, aesthetic_weight=3.0)
    plain = svc.search(x[10], 10)
    mean = [np.mean([aes[int(i[4:])] for i in r.ids]) for r in (shifted, plain)]
    assert mean[0] > mean[1]
    assert len(svc.search(x[10], 5, index="pq", aesthetic_weight=1.0).ids) == 5  # IVF-PQ too
    rows = svc.metadata(["img-004", "nope"])
    assert rows[0]["caption"] == "c4" and rows[1] is None


# ----------------------------------------------------------------------------- middleware

def test_rate_limit_token_bucket():
    from serving.middleware import RateLimit

    rl = RateLimit(None, rate=2.0, burst=3)  # type: ignore[arg-type]
    assert [rl.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("a", now=0.0) == pytest.approx(0.5)  # the 4th waits for a token
    assert rl.take("b", now=0.0) == 0.0  # per client
    assert rl.take("a", now=1.0) == 0.0  # refilled at 2 per second


def _run(mw, body_chunks, headers=()):
    sent, seen = [], []

    async def app(scope, receive, send):
        while True:
            msg = await receive()
            seen.append(msg)
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = list(body_chunks)

    async def receive():
        b = chunks.pop(0)
        return {"type": "http.request", "body": b, "more_body": bool(chunks)}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "path": "/v1/search", "headers": list(headers)}
    asyncio.run(type(mw)(app, mw.max_bytes)(scope, receive, send))
    return sent[0]["status"], seen


def test_body_limit_declared_and_streamed():
    from serving.middleware import BodyLimit

    mw = BodyLimit(None, max_bytes=10)  # type: ignore[arg-type]
    assert _run(mw, [b"12345"])[0] == 200
    assert _run(mw, [b"1"], headers=[(b"content-length", b"99")])[0] == 413
    status, seen = _run(mw, [b"123456", b"789012"])  # chunked: counted as it streams
    assert status == 413


# ----------------------------------------------------------------------------- OpenAPI

def _document(**over):
    from serving.config import AppArgs
    from serving.ingress import app, openapi_of

    args = AppArgs(**{"corpus": "c", "models": {
        "base": {"indexes": {"flat": "a", "hnsw": "b"}}, "aligned": {"indexes": {"flat": "c"}}},
        "limits": {"max_k": 77, "max_page_size": 9, "max_query_chars": 33,
                   "max_metadata_ids": 5, "max_nprobe": 8, "max_k_factor": 4.0}, **over})
    app.openapi_schema = None
    try:
        return openapi_of(app, args)
    finally:
        app.openapi_schema = None


def _integers(schema, where):
    """(where, schema) of every integer in a JSON schema."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            yield where, schema
        for k, v in schema.items():
            yield from _integers(v, f"{where}.{k}")
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            yield from _integers(v, f"{where}[{i}]")


def test_the_openapi_document_has_the_configured_names_and_limits():
    spec = _document()
    comp = spec["components"]["schemas"]
    search = comp["SearchRequest"]["properties"]
    assert search["model"]["anyOf"][0]["enum"] == ["aligned", "base"]
    assert search["index"]["anyOf"][0]["enum"] == ["flat", "hnsw"]
    # the models' indexes differ: each model is tied to its own
    ways = {w["properties"]["model"].get("const", "default"): w["properties"]["index"]["anyOf"][0]
            ["enum"] for w in comp["SearchRequest"]["anyOf"]}
    assert ways == {"base": ["flat", "hnsw"], "default": ["flat"]}
    assert search["k"]["maximum"] == 77 and search["page_size"]["anyOf"][0]["maximum"] == 9
    assert search["nprobe"]["anyOf"][0]["maximum"] == 8
    assert search["k_factor"]["anyOf"][0]["maximum"] == 4.0
    assert search["text"]["anyOf"][0]["maxLength"] == 33
    assert comp["CompareRequest"]["properties"]["text"]["maxLength"] == 33
    assert comp["MetadataRequest"]["properties"]["ids"]["maxItems"] == 5
    assert comp["MetadataRequest"]["properties"]["model"]["anyOf"][0]["enum"] == ["aligned",
                                                                                "base"]
    form = next(v for k, v in comp.items() if k.startswith("Body_search"))["properties"]
    assert form["k"]["maximum"] == 77 and form["model"]["anyOf"][0]["enum"] == ["aligned", "base"]
    # the same index names everywhere: a plain enum, no anyOf
    same = _document(models={"base": {"indexes": {"flat": "a"}},
                             "aligned": {"indexes": {"flat": "c"}}})
    assert "anyOf" not in same["components"]["schemas"]["SearchRequest"]


def test_every_integer_a_request_can_carry_is_bounded():
    spec = _document()
    found = []
    for name, schema in spec["components"]["schemas"].items():
        if name.endswith("Request") or name.startswith("Body_"):
            found += list(_integers(schema, name))
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                found += list(_integers(p["schema"], f"{method} {path} {p['name']}"))
    assert len(found) >= 10
    unbounded = [w for w, s in found if "maximum" not in s or "minimum" not in s]
    assert unbounded == []
    votes = {p["name"]: p["schema"] for p in spec["paths"]["/v1/votes"]["get"]["parameters"]}
    assert votes["limit"]["maximum"] == 1000 and votes["offset"]["maximum"] >= 10**6


def test_every_route_documents_its_statuses_and_media_types():
    spec = _document()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert {"200", "413", "503"} <= codes, (method, path)
            if path != "/v1/health":
                assert "429" in codes and op["responses"]["429"]["headers"]["Retry-After"]
            if method == "post" or op.get("parameters"):
                assert "422" in codes, (method, path)
            for code, r in op["responses"].items():
                if code.startswith(("4", "5")):
                    assert r["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}, (method, path, code)
    paths = spec["paths"]
    assert list(paths["/v1/votes/export"]["get"]["responses"]["200"]["content"]) == [
        "application/vnd.apache.parquet"]
    assert "image/png" in paths["/v1/images/{image_id}"]["get"]["responses"]["200"]["content"]
    assert "304" in paths["/v1/images/{image_id}"]["get"]["responses"]
    assert {"400", "404"} <= set(paths["/v1/search"]["post"]["responses"])
    assert "502" in paths["/v1/judge"]["post"]["responses"]
    assert "504" in paths["/v1/search"]["post"]["responses"]
    from serving.ingress import app, routes_of

    by_path: dict[str, set[str]] = {}
    for r in routes_of(app.routes):
        by_path.setdefault(getattr(r, "path", ""), set()).update(getattr(r, "methods", ()))
    assert {"GET", "HEAD"} <= by_path["/"], "HEAD / answers"
    assert {"GET", "POST"} <= by_path["/v1/votes"]  # one path, two routes: 405 names both


def test_the_routes_auth_covers_carry_its_security():
    def secured(spec):
        return {(m, p) for p, ops in spec["paths"].items() for m, op in ops.items()
                if op.get("security") == [{"bearer": []}] and "401" in op["responses"]}

    writes = _document(auth={"protect": "writes"})
    assert secured(writes) == {("post", "/v1/votes"), ("get", "/v1/votes"),
                               ("get", "/v1/votes/export")}
    assert writes["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "401" not in writes["paths"]["/v1/search"]["post"]["responses"]
    every = _document(auth={"protect": "all"})
    assert {p for _, p in secured(every)} == set(every["paths"]) - {"/v1/health"}
    none = _document(auth={"protect": "none"})
    assert secured(none) == set() and "securitySchemes" not in none["components"]


def test_a_rejected_nan_is_a_422_not_a_500():
    import json

    import pydantic
    from fastapi.exceptions import RequestValidationError

    from serving.ingress import _invalid
    from serving.schemas import SearchRequest

    with pytest.raises(pydantic.ValidationError) as e:
        SearchRequest.model_validate(json.loads('{"text": "a", "text_weight": NaN}'))
    r = asyncio.run(_invalid(None, RequestValidationError(e.value.errors())))  # type: ignore[arg-type]
    assert r.status_code == 422 and json.loads(r.body)["detail"][0]["input"] == "nan"
