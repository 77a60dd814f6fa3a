"""jobs.judge and jobs.annotate end-to-end on the session's local Ray and a tiny world.

An "evaluation" directory is made by hand from real rankings: the base model's top 4 over
the test-split images per test query, and a cascade-like "aligned" system (the base's top 8
re-ranked by the low-level aesthetic scorer, top 4 kept), so the scorer + similarity proxy
must never find aligned's row less aesthetic. One query returns the same row for both
systems (identical: similar without a call) and one names an image that is not in the
corpus (a failed row, kept with its reason).
"""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from aligner.data.judgments import read_judgments
from tests.helpers.judge import ChatServer, save_tiny_vlm

K = 4


@pytest.fixture(scope="module")
def evaluation(ray_session, tmp_path_factory) -> SimpleNamespace:
    from aligner.aesthetics.scorer import make_scorer
    from aligner.data.images import decode_rgb
    from aligner.data.results import rankings_table, write_rankings
    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint
    from aligner.world import World
    from jobs import make_world

    root = tmp_path_factory.mktemp("judge")
    make_world.run(replace(make_world.MakeWorldConfig(), output=str(root / "world"),
                           n_images=120, n_queries=40, n_paraphrases=6, progress=False))
    retriever = load_retriever(ModelSpec(), device="cpu")
    base = save_checkpoint(retriever, root / "base")
    world = World(root / "world")
    gallery = world.corpus(["id", "image"], split="test")
    ids = gallery.column("id").to_pylist()
    pixels = [decode_rgb(b) for b in gallery.column("image").to_pylist()]
    from PIL import Image

    vecs = retriever.encode_pil([Image.fromarray(p) for p in pixels])
    aes = np.asarray(make_scorer("lowlevel").score(pixels))
    q = world.queries(split="test", kind="content")
    qids, texts = q.column("query_id").to_pylist()[:10], q.column("query").to_pylist()[:10]
    sims = retriever.encode_texts(texts) @ vecs.T
    base_rows, aligned_rows = [], []
    for s in sims:
        pool = np.argsort(-s)[:2 * K]
        base_rows.append([ids[i] for i in pool[:K]])
        aligned_rows.append([ids[i] for i in sorted(pool, key=lambda i: -aes[i])[:K]])
    aligned_rows[0] = list(base_rows[0])            # identical rows
    aligned_rows[1] = aligned_rows[1][:-1] + ["no-such-image"]  # a missing image
    ev = root / "evaluate"
    write_rankings(rankings_table(qids, texts, {"base": base_rows, "aligned": aligned_rows}),
                   ev)
    (ev / "config.yaml").write_text(yaml.safe_dump({"world": str(root / "world"),
                                                    "base_checkpoint": str(base)}))
    (ev / "report.html").write_text("<html><body><h1>r</h1>\n<h2 id='grids'>Top results</h2>"
                                    "\n</body></html>\n")
    return SimpleNamespace(root=root, ev=ev, world=root / "world", qids=qids,
                           base_rows=base_rows, aligned_rows=aligned_rows)


def test_judge_job_with_the_proxy(evaluation):
    from jobs.judge import main

    args = [f"evaluation={evaluation.ev}", f"k={K}", "batch_size=4", "progress=false",
            "n_boot=300"]
    assert main(args) == 0
    out = evaluation.ev / "judge"
    t = read_judgments(out)
    rows = {r["query_id"]: r for r in t.to_pylist()}
    assert list(rows) == evaluation.qids, "one judgment per query, in order"
    assert all(r["judge"] == "proxy:scorer+similarity" and r["proxy"] for r in rows.values())
    same, broken = rows[evaluation.qids[0]], rows[evaluation.qids[1]]
    assert same["winner"] == "similar" and same["decision"] == "identical"
    assert broken["status"] == "failed" and "no-such-image" in broken["error"]
    ok = [r for r in rows.values() if r["status"] == "ok" and r["decision"] == "proxy"]
    assert len(ok) == 8 and all(r["orders_agree"] for r in ok), "a proxy has no order bias"
    assert all(r["aesthetics"] in ("b", "similar") for r in ok), \
        "aligned re-ranks base's pool by the scorer: its row is never less aesthetic"
    assert any(r["aesthetics"] == "b" for r in ok)
    assert all(r["ids_a"] == evaluation.base_rows[i] for i, r in enumerate(rows.values()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judged"] == 9 and summary["failed"] == 1 and summary["proxy"]
    assert summary["aspects"]["aesthetics"]["loss"]["mean"] == 0.0
    w = summary["overall"]["win_plus_half_similar"]
    assert w["ci_low"] <= w["mean"] <= w["ci_high"] and "a proxy" in summary["sentence"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"pairs": 10, "judged": 9, "failed": 1,
                                  "failed_by_reason": {"missing images": 1}}
    assert manifest["this_run"]["actor_pool"]["size"] == 1
    page = (evaluation.ev / "report.html").read_text()
    assert "Pairwise judge" in page and "a proxy judge, not an LMM" in page
    assert page.index("Pairwise judge") < page.index("id='grids'")
    # the same configuration again: skipped; another one on the same output: refused
    assert main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["created_utc"] == \
        manifest["created_utc"]
    assert main(args + ["k=3"]) == 2
    assert summary["rankings_sha256"] == manifest["inputs"]["rankings_sha256"]
    # a new evaluation (new rankings) is judged again into the same output
    from aligner.data.results import rankings_table, write_rankings

    evaluation.aligned_rows[-1] = list(evaluation.base_rows[-1])
    write_rankings(rankings_table(evaluation.qids, [r["query"] for r in rows.values()],
                                  {"base": evaluation.base_rows,
                                   "aligned": evaluation.aligned_rows}), evaluation.ev)
    assert main(args) == 0
    again = json.loads((out / "manifest.json").read_text())
    assert again["identity"]["rankings_sha256"] != manifest["identity"]["rankings_sha256"]
    last = read_judgments(out).to_pylist()[-1]
    assert last["decision"] == "identical"


def test_judge_job_with_a_reward_proxy_and_an_http_lmm(evaluation):
    from jobs.judge import main

    out = evaluation.root / "judge_reward"
    assert main([f"evaluation={evaluation.ev}", f"output={out}", "backend=proxy:reward",
                 "reward.path=unused", "reward.loader=tests.helpers.judge:FakeReward",
                 "limit=4", "progress=false", "n_boot=100"]) == 0
    t = read_judgments(out)
    assert t.num_rows == 4 and set(t.column("judge").to_pylist()) == {"proxy:reward:brightness"}
    with ChatServer() as server:
        out = evaluation.root / "judge_http"
        assert main([f"evaluation={evaluation.ev}", f"output={out}", "backend=openai",
                     f"openai.base_url={server.base_url}", "openai.model=tiny",
                     "openai.api_key_env=", "limit=4", "thumb=32", "progress=false",
                     "n_boot=100"]) == 0
        bodies = len(server.bodies)
    t = read_judgments(out)
    ok = [r for r in t.to_pylist() if r["decision"] == "logprobs"]
    assert len(ok) == 2 and bodies == 2 * 8, "identical and failed pairs make no request"
    assert all(r["judge"] == "lmm:openai:tiny" and not r["proxy"] for r in ok)
    assert all(r["orders_agree"] for r in ok), "the server's answer does not depend on order"


def test_annotate_job_with_the_tiny_vlm(evaluation, tmp_path):
    from aligner.data.preferences import read_preferences
    from aligner.data.ratings import read_ratings
    from jobs.annotate import main

    vlm = save_tiny_vlm(tmp_path / "vlm")
    out = tmp_path / "annotate"
    assert main([f"queries={evaluation.world / 'queries' / 'queries.parquet'}",
                 "splits=[test]", "kinds=[content]", "limit=3",
                 f"candidates={evaluation.ev / 'rankings.parquet'}", "n=3", "pool_splits=[]",
                 f"corpus={evaluation.world / 'corpus'}", "backend=transformers",
                 f"transformers.model_path={vlm}", "aspects=[aesthetics,fidelity]",
                 "rationale=false", f"output={out}", "progress=false"]) == 0
    ratings = read_ratings(out)
    assert ratings.num_rows == 3 * 3 * 2
    assert set(ratings.column("status").to_pylist()) == {"ok"}
    assert set(ratings.column("annotator").to_pylist()) == {"lmm:transformers:vlm/annotate.v1"}
    c = json.loads((out / "manifest.json").read_text())["counts"]
    made = sum(c["pairs_by_aspect"].values()) + sum(c["ties_by_aspect"].values())
    # 3 queries x 2 aspects x C(3, 2) image pairs: each a pair or a tie (min_gap=1)
    assert made == 3 * 2 * 3 and c["pairs"] == sum(c["pairs_by_aspect"].values())
    prefs = read_preferences(out)
    assert prefs.num_rows == c["pairs"]
    assert set(prefs.column("source").to_pylist()) <= {"lmm"}
    assert set(prefs.column("aspect").to_pylist()) <= {"aesthetics", "fidelity"}
    assert pq.read_table(out / "preferences.parquet").num_rows == c["pairs"]
    # an annotator that is not an LMM, or a prompt of the wrong style, is refused
    assert main(["backend=proxy"]) == 2
    assert main(["backend=transformers", f"transformers.model_path={vlm}", "prompt=ranker",
                 f"queries={evaluation.world / 'queries' / 'queries.parquet'}"]) == 2

