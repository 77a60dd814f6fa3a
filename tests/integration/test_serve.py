"""The Serve application over real HTTP on 127.0.0.1: search equals the library's, base and
aligned differ, auth, a table of bad inputs (all 4xx), votes (concurrent, across a restart,
exported to a table the fine-tune reads), the OpenAPI document, images, the judge, graceful
rephrase time-outs and the Prometheus metrics."""

from __future__ import annotations

import base64
import json
import struct
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(600)
QUERIES = ["two red circles on grass", "a yellow star on sand", "three blue squares on wood"]


def call(served, method: str, path: str, body: object = None, key: str | None = None,
         raw: bytes | None = None, headers: dict | None = None) -> tuple[int, object, dict]:
    """(status, JSON or bytes, headers) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"content-type": "application/json", **(headers or {})}
    if key:
        hdrs["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(served.url + path, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            payload = r.read()
            status, h = r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        payload, status, h = e.read(), e.code, dict(e.headers)
    try:
        return status, json.loads(payload), h
    except (ValueError, UnicodeDecodeError):
        return status, payload, h


def test_search_equals_the_library_and_models_differ(served):
    from aligner.retrieval.models import ModelSpec
    from aligner.retrieval.service import SearchService

    w = served.world
    lib = {m: SearchService.open(ModelSpec(checkpoint=str(ck)), {"flat": str(ix)})
           for m, ck, ix in (("base", w.base, w.index_base),
                             ("aligned", w.aligned, w.index_aligned))}
    differ = 0
    for q in QUERIES:
        got = {}
        for model, svc in lib.items():
            status, out, h = call(served, "POST", "/v1/search", {"text": q, "k": 20,
                                                                  "model": model})
            assert status == 200, out
            ranked = svc.search(svc.encode_texts([q])[0], 20)
            assert out["ids"] == ranked.ids
            np.testing.assert_allclose([r["similarity"] for r in out["results"]],
                                       ranked.scores, atol=1e-5)
            assert out["results"][0]["image_url"] == f"/v1/images/{ranked.ids[0]}"
            assert "x-request-id" in {k.lower() for k in h}
            got[model] = out["ids"]
        differ += got["base"] != got["aligned"]
    assert differ >= 2, "the aligned model must rank differently from the base"


def test_paging_large_k_metadata_rerank_dedup_and_shift(served):
    status, full, _ = call(served, "POST", "/v1/search", {"text": QUERIES[0], "k": 300,
                                                          "page_size": 10, "offset": 20})
    assert status == 200 and len(full["ids"]) == 300 and len(full["results"]) == 10
    assert [r["rank"] for r in full["results"]] == list(range(21, 31))
    assert [r["id"] for r in full["results"]] == full["ids"][20:30]
    status, meta, _ = call(served, "POST", "/v1/metadata", {"ids": full["ids"][40:45]
                                                            + ["no-such-id"]})
    assert status == 200 and meta["items"][-1] is None
    assert [m["id"] for m in meta["items"][:5]] == full["ids"][40:45]
    status, rr, _ = call(served, "POST", "/v1/search", {"text": QUERIES[0], "k": 10,
                                                        "rerank": True, "rerank_weight": 5})
    assert status == 200 and rr["reranked"] and rr["rerank"] == "ok"
    scores = [r["score"] for r in rr["results"]]
    assert scores == sorted(scores, reverse=True)
    loose = call(served, "POST", "/v1/search", {"text": QUERIES[1], "k": 10,
                                                "deduplicate": True, "dedup_threshold": 1.0})
    assert loose[0] == 200 and loose[1]["ids"] == call(served, "POST", "/v1/search", {
        "text": QUERIES[1], "k": 10})[1]["ids"]
    # the small untrained base puts every image close together: a strict threshold keeps few
    # and widens the search until the index is spent
    status, dd, _ = call(served, "POST", "/v1/search", {"text": QUERIES[1], "k": 10,
                                                        "deduplicate": True,
                                                        "dedup_threshold": 0.5})
    assert status == 200 and dd["duplicates_removed"] > 0
    assert len(dd["ids"]) == 10 or dd["duplicates_removed"] + len(dd["ids"]) == 300
    status, sh, _ = call(served, "POST", "/v1/search", {"text": QUERIES[1], "k": 10,
                                                        "aesthetic_weight": 2.0})
    plain = call(served, "POST", "/v1/search", {"text": QUERIES[1], "k": 10})[1]
    assert status == 200 and sh["ids"] != plain["ids"]
    mean = [np.nanmean([r["aesthetic"] for r in x["results"]]) for x in (sh, plain)]
    assert mean[0] > mean[1], "the aesthetic shift must raise the scorer's mean"


def test_search_by_image_url_upload_embedding_and_combined(served):
    status, plain, _ = call(served, "POST", "/v1/search", {"text": QUERIES[0], "k": 5})
    first = plain["ids"][0]
    img_status, img, h = call(served, "GET", f"/v1/images/{first}")
    assert img_status == 200 and h["content-type"] == "image/png" and img[:4] == b"\x89PNG"
    assert "max-age" in h["cache-control"] and h["etag"]
    assert call(served, "GET", f"/v1/images/{first}", headers={"if-none-match": h["etag"]}
                )[0] == 304
    by_b64 = call(served, "POST", "/v1/search", {"image_b64": base64.b64encode(img).decode(),
                                                 "k": 5})[1]
    assert by_b64["ids"][0] == first  # an image finds itself
    by_url = call(served, "POST", "/v1/search",
                  {"image_url": f"{served.url}/v1/images/{first}", "k": 5})[1]
    assert by_url["ids"] == by_b64["ids"]
    by_like = call(served, "POST", "/v1/search", {"like": first, "k": 5})[1]
    assert by_like["ids"] == by_b64["ids"]  # more like this: the corpus image by id
    boundary = "xyzBOUNDARY"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\""
            f"\r\nContent-Type: image/png\r\n\r\n").encode() + img + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n5\r\n" \
        f"--{boundary}--\r\n".encode()
    up_status, up, _ = call(served, "POST", "/v1/search/image", raw=form, headers={
        "content-type": f"multipart/form-data; boundary={boundary}"})
    assert up_status == 200 and up["ids"] == by_b64["ids"]
    from aligner.retrieval.models import ModelSpec, load_retriever

    vec = load_retriever(ModelSpec(checkpoint=str(served.world.aligned)), device="cpu"
                         ).encode_texts([QUERIES[0]])[0]
    by_vec = call(served, "POST", "/v1/search", {"embedding": vec.tolist(), "k": 5})[1]
    assert by_vec["ids"] == plain["ids"]
    both = call(served, "POST", "/v1/search", {"text": QUERIES[2], "image_url":
                f"{served.url}/v1/images/{first}", "text_weight": 1, "image_weight": 1,
                "k": 5})
    assert both[0] == 200 and both[1]["ids"] != plain["ids"]


def _bomb_png(side: int = 50_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(
        b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


BAD = [
    ("empty text", "POST", "/v1/search", {"text": "   "}, 422),
    ("nothing to search", "POST", "/v1/search", {"k": 3}, 422),
    ("huge k", "POST", "/v1/search", {"text": "a cat", "k": 10**9}, 422),  # the API's bound
    ("k over the limit", "POST", "/v1/search", {"text": "a cat", "k": 501}, 400),  # max_k
    ("k a boolean", "POST", "/v1/search", {"text": "a cat", "k": True}, 422),
    ("k a string", "POST", "/v1/search", {"text": "a cat", "k": "5"}, 422),
    ("NaN weight", "POST", "/v1/search", b'{"text": "a", "text_weight": NaN}', 422),
    ("empty model name", "POST", "/v1/search", {"text": "a", "model": ""}, 400),
    ("empty index name", "POST", "/v1/search", {"text": "a", "index": ""}, 400),
    ("k zero", "POST", "/v1/search", {"text": "a cat", "k": 0}, 422),
    ("page too big", "POST", "/v1/search", {"text": "a cat", "k": 100, "page_size": 100}, 400),
    ("long text", "POST", "/v1/search", {"text": "x" * 5000}, 400),
    ("wrong type", "POST", "/v1/search", {"text": ["a", "b"]}, 422),
    ("k not a number", "POST", "/v1/search", {"text": "a", "k": "ten"}, 422),
    ("unknown field", "POST", "/v1/search", {"text": "a", "colour": "red"}, 422),
    ("unknown model", "POST", "/v1/search", {"text": "a", "model": "gpt"}, 400),
    ("unknown index", "POST", "/v1/search", {"text": "a", "index": "nope"}, 400),
    ("bad base64", "POST", "/v1/search", {"image_b64": "@@not base64@@"}, 400),
    ("not an image", "POST", "/v1/search",
     {"image_b64": base64.b64encode(b"<html>hello</html>").decode()}, 400),
    ("decompression bomb", "POST", "/v1/search",
     {"image_b64": base64.b64encode(_bomb_png()).decode()}, 400),
    ("unreachable image_url", "POST", "/v1/search",
     {"image_url": "http://127.0.0.1:9/none.png"}, 400),
    ("image_url not http", "POST", "/v1/search", {"image_url": "file:///etc/passwd"}, 400),
    ("embedding wrong size", "POST", "/v1/search", {"embedding": [0.1, 0.2, 0.3]}, 422),
    ("embedding and text", "POST", "/v1/search", {"embedding": [0.1], "text": "a"}, 422),
    ("like unknown image", "POST", "/v1/search", {"like": "no-such-image"}, 404),
    ("like traversal", "POST", "/v1/search", {"like": "../../etc/passwd"}, 400),
    ("like and image_url", "POST", "/v1/search",
     {"like": "a", "image_url": "http://127.0.0.1:9/x.png"}, 422),
    ("path traversal id", "GET", "/v1/images/../../etc/passwd", None, 400),
    ("encoded traversal", "GET", "/v1/images/%2e%2e/%2e%2e/etc/passwd", None, 400),
    ("absolute id", "GET", "/v1/images//etc/passwd", None, 400),
    ("unknown image", "GET", "/v1/images/no-such-image", None, 404),
    ("too many metadata ids", "POST", "/v1/metadata", {"ids": ["a"] * 5000}, 400),
    ("compare k too big", "POST", "/v1/compare", {"text": "a cat", "k": 500}, 422),
    ("compare blank text", "POST", "/v1/compare", {"text": "   "}, 422),
    ("votes offset overflow", "GET", "/v1/votes?offset=128207008073614580776960", None, 422),
    ("votes limit zero", "GET", "/v1/votes?limit=0", None, 422),
    ("export confidence 9", "GET", "/v1/votes/export?min_confidence=9", None, 422),
    ("judge unknown ids", "POST", "/v1/judge", {"text": "a", "left": ["x"], "right": ["y"]},
     400),
    ("vote unknown comparison", "POST", "/v1/votes",
     {"comparison_id": "nope", "preferred": "left"}, 404),
    ("vote bad preference", "POST", "/v1/votes",
     {"comparison_id": "nope", "preferred": "middle"}, 422),
    ("vote bad confidence", "POST", "/v1/votes",
     {"comparison_id": "nope", "preferred": "left", "confidence": 9}, 422),
    ("malformed JSON", "POST", "/v1/search", b"{not json", 422),
]


@pytest.mark.parametrize("what,method,path,body,want", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx(served, what, method, path, body, want):
    raw = body if isinstance(body, bytes) else None
    status, out, _ = call(served, method, path, None if raw else body, key=served.api_key,
                          raw=raw)
    assert status == want, (what, out)
    assert isinstance(out, dict) and out.get("detail"), "a 4xx says why"


def test_oversize_body_is_413_declared_or_streamed(served):
    big = json.dumps({"text": "a", "image_b64": "A" * (1 << 20)}).encode()
    status, out, _ = call(served, "POST", "/v1/search", raw=big)
    assert status == 413 and "limit" in out["detail"]


def test_auth_accepts_and_rejects(served):
    cmp = call(served, "POST", "/v1/compare", {"text": QUERIES[0], "k": 4})[1]
    body = {"comparison_id": cmp["comparison_id"], "preferred": "left", "confidence": 4}
    assert call(served, "POST", "/v1/votes", body)[0] == 401
    assert call(served, "POST", "/v1/votes", body, key="wrong")[0] == 401
    assert call(served, "GET", "/v1/votes")[0] == 401
    assert call(served, "GET", "/v1/votes/export")[0] == 401
    status, v, _ = call(served, "POST", "/v1/votes", body, key=served.api_key)
    assert status == 200 and {v["left_model"], v["right_model"]} == {"base", "aligned"}
    assert call(served, "POST", "/v1/search", {"text": "a"})[0] == 200  # reads stay open


def test_compare_randomises_and_records_then_votes_export(served):
    sides = []
    for i in range(12):
        c = call(served, "POST", "/v1/compare", {"text": QUERIES[i % 3], "k": 4})[1]
        assert len(c["left"]["results"]) == len(c["right"]["results"]) == 4
        v = call(served, "POST", "/v1/votes", {"comparison_id": c["comparison_id"],
                                               "preferred": "left", "confidence": 5},
                 key=served.api_key)[1]
        sides.append(v["left_model"])
    assert set(sides) == {"base", "aligned"}, "left/right must be randomised"
    status, table, h = call(served, "GET", "/v1/votes/export", key=served.api_key)
    assert status == 200 and int(h["x-pairs"]) > 0
    import pyarrow.parquet as pq

    from aligner.data.preferences import read_preferences

    out = served.data_dir / "downloaded"
    out.mkdir(exist_ok=True)
    (out / "preferences.parquet").write_bytes(table)
    prefs = read_preferences(out)
    assert set(prefs["source"].to_pylist()) == {"human"}
    assert pq.read_table(out / "preferences.parquet").num_rows == int(h["x-pairs"])
    from aligner.retrieval.models import ModelSpec
    from aligner.training.align_data import prepare_align_data

    w = served.world
    data, counts = prepare_align_data(str(out), str(w.corpus), str(w.root / "world" / "queries"),
                                      ModelSpec(checkpoint=str(w.base)))
    # every exported pair trains, validates, or names a test-split image (the page searches
    # the whole corpus; held-out images never train): exactly those are dropped
    from aligner.data.corpus import read_corpus

    test_ids = set(read_corpus(w.corpus, ["id"], split="test")["id"].to_pylist())
    naming_test = sum(a in test_ids or b in test_ids for a, b in zip(
        prefs["chosen_id"].to_pylist(), prefs["rejected_id"].to_pylist(), strict=True))
    assert counts["dropped_held_out_image_pairs"] == naming_test
    assert counts["train_pairs"] + counts["val_pairs"] + naming_test == prefs.num_rows > 0
    assert counts["train_pairs"] > 0


def test_votes_from_concurrent_writers_survive_a_restart(served):
    from tests.helpers.serving import app_args, deploy

    before = call(served, "GET", "/v1/votes", key=served.api_key)[1]["counts"]["votes"]
    cmps = [call(served, "POST", "/v1/compare", {"text": QUERIES[i % 3], "k": 3})[1]
            for i in range(4)]

    def vote(i: int) -> int:
        return call(served, "POST", "/v1/votes", {
            "comparison_id": cmps[i % 4]["comparison_id"], "preferred": "right",
            "confidence": 1 + i % 5, "comment": f"vote {i}"}, key=served.api_key)[0]

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(vote, range(48))) == {200}
    assert call(served, "GET", "/v1/votes", key=served.api_key)[1]["counts"]["votes"] == \
        before + 48
    # a restart: the application is redeployed (new replicas), here with protect=all
    deploy(app_args(served.world, served.data_dir, served.llm,
                    auth={"api_key": served.api_key, "protect": "all"}))
    try:
        assert call(served, "POST", "/v1/search", {"text": "a"})[0] == 401
        assert call(served, "GET", "/v1/health")[0] == 200  # probes stay open
        after = call(served, "GET", "/v1/votes?limit=1000", key=served.api_key)[1]
        assert after["counts"]["votes"] == before + 48
        assert sum(v["comment"] == "vote 7" for v in after["votes"]) == 1
    finally:
        deploy(served.args)


def test_judge_is_an_order_consistent_proxy(served):
    base = call(served, "POST", "/v1/search", {"text": QUERIES[0], "k": 5,
                                               "model": "base"})[1]["ids"]
    far = call(served, "POST", "/v1/search", {"text": "something else entirely", "k": 5,
                                              "model": "base"})[1]["ids"]
    status, j, _ = call(served, "POST", "/v1/judge", {"text": QUERIES[0], "left": base,
                                                      "right": far})
    assert status == 200 and j["judge"].startswith("proxy:")
    assert set(j["aspects"]) == {"accuracy", "aesthetics", "diversity"}
    assert j["orders_agree"] and j["winner"] in ("left", "right", "similar")
    same = call(served, "POST", "/v1/judge", {"text": QUERIES[0], "left": base,
                                              "right": base})[1]
    assert same["winner"] == "similar"


def test_rephrase_ok_and_time_out_gracefully(served):
    status, ok, _ = call(served, "POST", "/v1/search", {"text": QUERIES[0], "k": 5,
                                                        "rephrase": True})
    assert status == 200 and ok["query"]["rephrase"] in ("ok", "fallback")
    t0 = time.time()
    status, slow, _ = call(served, "POST", "/v1/search", {"text": "red circles slowly", "k": 5,
                                                          "rephrase": True})
    assert status == 200 and slow["query"]["rephrase"] == "timeout"
    assert slow["query"]["searched"] == "red circles slowly" and len(slow["ids"]) == 5
    assert time.time() - t0 < 2.9, "the rephrase time-out (1 s) bounds the wait"


def test_openapi_lists_every_route_and_health(served):
    status, spec, _ = call(served, "GET", "/openapi.json")
    assert status == 200
    want = {"/v1/health", "/v1/indexes", "/v1/search", "/v1/search/image", "/v1/metadata",
            "/v1/images/{image_id}", "/v1/compare", "/v1/judge", "/v1/votes",
            "/v1/votes/export"}
    assert want <= set(spec["paths"]), want - set(spec["paths"])
    status, h, _ = call(served, "GET", "/v1/health")
    assert status == 200 and h["status"] == "ok" and "retriever_aligned" in h["deployments"]
    idx = call(served, "GET", "/v1/indexes")[1]
    assert set(idx["models"]) == {"base", "aligned"}
    assert idx["models"]["base"]["indexes"]["flat"]["vectors"] == 300
    assert call(served, "GET", "/")[0] == 200


def test_prometheus_metrics_for_each_step(served, metrics_port):
    call(served, "POST", "/v1/search", {"text": QUERIES[0], "k": 5, "rerank": True,
                                        "rephrase": True, "deduplicate": True})
    call(served, "POST", "/v1/judge", {"text": "a", "left": call(
        served, "POST", "/v1/search", {"text": "a", "k": 2})[1]["ids"], "right": call(
        served, "POST", "/v1/search", {"text": "b", "k": 2})[1]["ids"]})
    want = {"encode_text", "knn", "metadata", "dedup", "rephrase", "rerank", "judge"}
    seen: set[str] = set()
    text = ""
    for _ in range(40):  # metrics are exported with a delay of seconds
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=10) as r:
                text = r.read().decode()
        except OSError:
            text = ""
        seen = {s for s in want if f'step="{s}"' in text and "aligner_step_ms" in text}
        if seen == want and "aligner_requests" in text:
            break
        time.sleep(2)
    assert seen == want, f"missing steps {want - seen}"
    assert "aligner_request_ms" in text and "ray_serve_" in text  # Serve's own beside ours
