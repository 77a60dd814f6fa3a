"""The judge without Ray or a real VLM: the order-consistency protocol (consistent,
inconsistent and tie cases) through the real LMM judge on a deterministic back end, reading
choices from log-probabilities and text, the scorer style, the proxies, judging rows of ids,
the summary's CIs, the prompt files, the judgments / ratings / rankings contracts, and
annotation pairs derived from hand-made ratings."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pytest

from aligner.data.judgments import judgments_table, read_judgments, write_judgments
from aligner.data.ratings import ratings_table
from aligner.data.results import ranked_ids, rankings_table, read_rankings, write_rankings
from aligner.judge.annotate import LMMAnnotator, RatingItem, derive_pairs
from aligner.judge.backend import (
    ChatReply,
    choice_distribution,
    choice_logprobs_from_top,
    parse_choice,
    rationale_of,
)
from aligner.judge.images import compose_row, data_url, row_images
from aligner.judge.lmm import LMMJudge, ShownPair
from aligner.judge.prompts import available_judge_prompts, load_judge_prompt
from aligner.judge.protocol import Judgment, combine_orders, order_consistent
from aligner.judge.proxy import RewardProxyJudge, RewardRow
from aligner.judge.rows import RowJudge, RowPair, make_row_judge
from aligner.judge.summary import query_bootstrap, summarise_judgments
from tests.helpers.judge import (
    FakeReward,
    ScriptedBackend,
    grey,
    png,
    prefers,
    scorer_prefers,
)

GOOD, BAD = png((250, 250, 250)), png((10, 10, 10))


# ----------------------------------------------------------------------------- protocol

@pytest.mark.parametrize("first,second,want,agree", [
    ("a", "b", "a", True),            # consistent: a wins in both orders
    ("b", "a", "b", True),            # consistent: b wins in both orders
    ("a", "a", "similar", False),     # inconsistent: a position bias
    ("similar", "similar", "similar", True),   # a tie in both orders
    ("a", "similar", "similar", False),        # one order undecided
])
def test_combine_orders(first, second, want, agree):
    # ``second`` is the verdict on (b, a), i.e. in the swapped order's own terms
    j, ok = combine_orders(Judgment(first, {"accuracy": first}),
                           Judgment(second, {"accuracy": second}))
    assert (j.winner, ok) == (want, agree)
    assert j.aspects["accuracy"] == want
    assert j.details["first_winner"] == first


def test_order_consistent_calls_the_judge_in_both_orders():
    seen = []

    def judge(x, y):
        seen.append((x, y))
        return Judgment("a" if x > y else "b")

    j, agree = order_consistent(judge, 2, 1)
    assert seen == [(2, 1), (1, 2)] and j.winner == "a" and agree


def _lmm(policy, **kw) -> tuple[LMMJudge, ScriptedBackend]:
    backend = ScriptedBackend(policy, logprobs=kw.pop("logprobs", True), text=kw.pop("text", ""))
    return LMMJudge(backend, kw.pop("prompt", "ranker"), **kw), backend


def test_lmm_ranker_consistent_inconsistent_and_tie():
    judge, backend = _lmm(prefers(GOOD))
    [(j, agree)] = judge.judge_pairs([ShownPair("q", [BAD], [GOOD])])
    assert j.winner == "b" and agree and j.aspects == {"accuracy": "b", "aesthetics": "b",
                                                       "diversity": "b"}
    assert len(backend.requests) == 8  # 4 questions x 2 orders, each one choice token
    assert all(r.max_tokens == 1 and r.choices == ("A", "B", "C") for r in backend.requests)
    shown = [[p["image"] for p in r.messages[1]["content"] if p["type"] == "image"]
             for r in backend.requests]
    assert shown[0] == [BAD, GOOD] and shown[4] == [GOOD, BAD], "the second order swaps rows"
    assert j.details["read"] == "logprobs" and judge.name == "lmm:scripted:script"

    biased, _ = _lmm(lambda r, ims: "A")  # always the row shown first
    [(j, agree)] = biased.judge_pairs([ShownPair("q", [BAD], [GOOD])])
    assert j.winner == "similar" and not agree
    assert set(j.aspects.values()) == {"similar"} and "orders disagreed" in j.rationale

    tie, _ = _lmm(lambda r, ims: "C")
    [(j, agree)] = tie.judge_pairs([ShownPair("q", [GOOD], [GOOD])])
    assert j.winner == "similar" and agree


def test_choice_read_from_logprobs_not_from_the_text():
    judge, _ = _lmm(lambda r, ims: {"A": 0.2, "B": 0.5, "C": 0.3}, text="A, certainly")
    j = judge.judge_once("q", [GOOD], [BAD])
    assert j.winner == "b" and j.details["overall"]["p"]["B"] == pytest.approx(0.5)
    # without log-probabilities the text is parsed; a text naming no choice is 'unparsed'
    judge, _ = _lmm(prefers(GOOD), logprobs=False)
    [(j, agree)] = judge.judge_pairs([ShownPair("q", [GOOD], [BAD])])
    assert j.winner == "a" and agree and j.details["read"] == "text"
    judge, _ = _lmm(prefers(GOOD), logprobs=False, text="I cannot tell")
    [(j, agree)] = judge.judge_pairs([ShownPair("q", [GOOD], [BAD])])
    assert j.winner == "similar" and j.details["read"] == "unparsed"


def test_rationale_is_asked_for_and_kept():
    judge, backend = _lmm(prefers(GOOD), rationale=True, rationale_tokens=20)
    [(j, _)] = judge.judge_pairs([ShownPair("q", [GOOD], [BAD])])
    asked = [r for r in backend.requests if r.max_tokens > 1]
    assert len(asked) == 2 and "one short sentence" in asked[0].messages[1]["content"][-1]["text"]
    assert j.rationale.startswith("because")


def test_scorer_style_uses_expected_scores():
    judge, backend = _lmm(scorer_prefers(GOOD), prompt="scorer")
    [(j, agree)] = judge.judge_pairs([ShownPair("q", [GOOD], [BAD])])
    assert j.winner == "a" and agree and j.aspects["aesthetics"] == "a"
    assert len(backend.requests) == 12  # 3 aspects x 2 rows x 2 orders
    # expected score 0.7 * 5 + 0.3 * 4 = 4.7 for the good row, 1.7 for the bad one
    assert j.details["first"]["accuracy"] == [pytest.approx(4.7), pytest.approx(1.7)]
    close, _ = _lmm(lambda r, ims: {"3": 0.5, "4": 0.5}, prompt="scorer")
    [(j, agree)] = close.judge_pairs([ShownPair("q", [GOOD], [BAD])])
    assert j.winner == "similar" and agree


def test_a_failed_reply_fails_the_pair_with_its_reason():
    backend = ScriptedBackend(prefers(GOOD), fail="http_error: 500 boom (after 3 retries)")
    [res] = LMMJudge(backend).judge_pairs([ShownPair("q", [GOOD], [BAD])])
    assert res == "http_error: 500 boom (after 3 retries)"


def test_choice_helpers():
    assert choice_logprobs_from_top([("A", -0.1), (" A", -2.0), ("**B", -1.0), ("x", -0.5)],
                                    ("A", "B", "C")) == {
        "A": pytest.approx(math.log(math.exp(-0.1) + math.exp(-2.0))), "B": -1.0}
    probs, read = choice_distribution(ChatReply("", {"A": math.log(0.3), "B": math.log(0.1)}),
                                      ("A", "B", "C"))
    assert read == "logprobs" and probs == pytest.approx({"A": 0.75, "B": 0.25, "C": 0.0})
    assert parse_choice("B: sharper", ("A", "B", "C")) == "B"
    assert parse_choice("The answer is C.", ("A", "B", "C")) == "C"
    assert parse_choice("**4** - good light", tuple("12345")) == "4"
    assert parse_choice("neither", ("A", "B", "C")) is None
    assert rationale_of("A: row A is sharper.") == "row A is sharper."


# ----------------------------------------------------------------------------- prompts

def test_prompt_files_load_and_build_messages():
    known = available_judge_prompts()
    assert {"ranker", "scorer", "annotate"} <= set(known)
    r = load_judge_prompt("ranker")
    assert r.id == "ranker.v1" and r.style == "ranker" and "overall" in r.aspects
    assert load_judge_prompt("scorer.v1").choices == {str(i): i for i in range(1, 6)}
    a = load_judge_prompt("annotate")
    assert a.aspects == ("prompt_following", "aesthetics", "fidelity", "harmlessness")
    msgs = r.messages("two {red} circles", [[b"x"], [b"y", b"z"]], "aesthetics")
    parts = msgs[1]["content"]
    assert msgs[0]["role"] == "system" and '"two {red} circles"' in parts[0]["text"]
    assert [p["type"] for p in parts] == ["text", "text", "image", "text", "image", "image",
                                          "text"]
    assert parts[-1]["text"].startswith("Aesthetics:") and "one letter" in parts[-1]["text"]
    s = load_judge_prompt("scorer").messages("q", [[b"x"], [b"y"]], "accuracy", row="B")
    assert "Score row B" in s[1]["content"][-1]["text"]
    with pytest.raises(KeyError, match="no question for aspect"):
        r.messages("q", [[b"x"], [b"y"]], "colour")


def test_bad_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown judge prompt"):
        load_judge_prompt("nope")
    with pytest.raises(ValueError, match="has versions"):
        load_judge_prompt("ranker.v9")
    with pytest.raises(FileNotFoundError):
        load_judge_prompt(str(tmp_path / "missing.yaml"))
    f = tmp_path / "r.v1.yaml"
    f.write_text("name: r\nversion: v1\nstyle: ranker\nsystem: s\nintro: i\nlabels: [A, B]\n"
                 "choices: {A: a, B: b, C: similar}\nquestions: {accuracy: q}\n"
                 "answer_instruction: x\nrationale_instruction: y\n")
    with pytest.raises(ValueError, match="'overall' question"):
        load_judge_prompt(str(f))
    f.write_text("name: r\nversion: v1\n")
    with pytest.raises(ValueError, match="missing key"):
        load_judge_prompt(str(f))


def test_rows_are_composed_into_one_image():
    from PIL import Image

    row = compose_row([png((255, 0, 0), 40), png((0, 0, 255), 20)], thumb=32, cols=5, gap=4)
    im = Image.open(io.BytesIO(row))
    assert im.size == (68, 32)
    assert im.getpixel((16, 16)) == (255, 0, 0) and im.getpixel((52, 16)) == (0, 0, 255)
    assert len(row_images([png((1, 2, 3))] * 7, "row", 16, 5)) == 1
    assert len(row_images([png((1, 2, 3))] * 3, "images", 16)) == 3
    assert data_url(row).startswith("data:image/png;base64,iVBOR")
    with pytest.raises(ValueError, match="compose"):
        row_images([row], "grid")


# ----------------------------------------------------------------------------- rows of ids

def _fetch(images):
    return lambda ids: {i: images[i] for i in ids if i in images}


IMAGES = {"bright1": grey(230), "bright2": grey(200), "dark1": grey(20), "dark2": grey(40),
          "broken": b"not an image"}


def test_row_judge_with_the_reward_proxy():
    judge = make_row_judge("proxy:reward", fetch=_fetch(IMAGES), reward_model=FakeReward(),
                           options={"margin": 0.05, "name": "brightness"})
    pairs = [RowPair("q1", "a", ["dark1", "dark2"], ["bright1", "bright2"]),
             RowPair("q2", "b", ["bright1"], ["bright1"]),
             RowPair("q3", "c", ["bright1", "gone"], ["dark1"]),
             RowPair("q4", "d", ["broken"], ["dark1"]),
             RowPair("q5", "e", [], ["dark1"])]
    FakeReward.calls = 0
    rows = judge.judge_pairs(pairs)
    assert FakeReward.calls == 2, "one model call per judged pair (both orders reuse it)"
    assert [r["query_id"] for r in rows] == ["q1", "q2", "q3", "q4", "q5"]
    assert rows[0]["winner"] == "b" and rows[0]["orders_agree"] and rows[0]["proxy"]
    assert rows[0]["judge"] == "proxy:reward:brightness" and rows[0]["style"] == "proxy"
    assert rows[1]["winner"] == "similar" and rows[1]["decision"] == "identical"
    assert rows[2]["status"] == "failed" and "missing images: ['gone']" in rows[2]["error"]
    assert rows[3]["status"] == "failed" and rows[3]["error"].startswith("bad image")
    assert rows[4]["status"] == "failed" and rows[4]["error"].startswith("empty row")
    t = judgments_table([{**r, "system_a": "base", "system_b": "aligned"} for r in rows])
    assert t.num_rows == 5


def test_row_judge_with_an_lmm_back_end():
    from aligner.judge.lmm import LMMJudge

    def brighter(req, images):  # the composed row whose pixels are brighter wins
        from aligner.data.images import decode_rgb

        a, b = (decode_rgb(x).mean() for x in images)
        return "A" if a > b + 5 else "B" if b > a + 5 else "C"

    rj = RowJudge(LMMJudge(ScriptedBackend(brighter)), _fetch(IMAGES), thumb=16)
    rows = rj.judge_pairs([RowPair("q1", "a", ["bright1", "bright2"], ["dark1", "dark2"]),
                           RowPair("q2", "b", ["dark1"], ["dark2"])])
    assert rows[0]["winner"] == "a" and rows[0]["decision"] == "logprobs"
    assert rows[0]["prompt"] == "ranker.v1" and not rows[0]["proxy"]
    assert rows[1]["winner"] == "b"


def test_reward_proxy_needs_a_scorer_and_a_proxy_name():
    with pytest.raises(TypeError, match="score"):
        RewardProxyJudge(object())
    with pytest.raises(ValueError, match="proxy:"):
        RewardProxyJudge(FakeReward(), name="reward")
    j = RewardProxyJudge(FakeReward())
    assert j(RewardRow("q", [grey(10)]), RewardRow("q", [grey(250)])).winner == "b"


# ----------------------------------------------------------------------------- summary

def _judgments(winners, aspects=None, query_ids=None):
    rows = []
    for i, w in enumerate(winners):
        rows.append({"query_id": (query_ids or [f"q{i}" for i in range(len(winners))])[i],
                     "query": "x", "system_a": "base", "system_b": "aligned",
                     "judge": "proxy:reward", "proxy": True, "style": "proxy",
                     "status": "ok" if w else "failed", "error": "" if w else "judge_error: x",
                     "winner": w or "", "orders_agree": w != "similar",
                     "decision": "proxy", "aesthetics": (aspects or {}).get(i, "")})
    return judgments_table(rows)


def test_summary_rates_and_bootstrap_cis_over_queries():
    t = _judgments(["b"] * 6 + ["a"] * 2 + ["similar"] * 2 + [None],
                   aspects={0: "b", 1: "similar"})
    s = summarise_judgments(t, n_boot=500)
    o = s["overall"]
    assert o["win"]["mean"] == pytest.approx(0.6) and o["loss"]["mean"] == pytest.approx(0.2)
    assert o["win_plus_half_similar"]["mean"] == pytest.approx(0.7)
    for d in o.values():
        assert 0 <= d["ci_low"] <= d["mean"] <= d["ci_high"] <= 1 and d["queries"] == 10
    assert o["win"]["ci_high"] - o["win"]["ci_low"] > 0.1, "10 queries give a wide interval"
    assert s["failed"] == 1 and s["failed_by_reason"] == {"judge_error": 1}
    assert s["aspects"]["aesthetics"]["win"]["mean"] == pytest.approx(0.5)
    assert s["proxy"] and "a proxy" in s["sentence"] and s["orders_agree"] == pytest.approx(0.8)
    all_b = summarise_judgments(_judgments(["b"] * 5), n_boot=200)["overall"]["win"]
    assert (all_b["ci_low"], all_b["ci_high"]) == (1.0, 1.0)


def test_bootstrap_resamples_queries_not_rows():
    # one query with 9 identical rows and one with 1: resampling rows would be far narrower
    v = np.array([1.0] * 9 + [0.0])
    g = np.array(["q1"] * 9 + ["q2"])
    ci = query_bootstrap(v, g, n_boot=2000)
    assert ci["queries"] == 2 and ci["ci_low"] == 0.0 and ci["ci_high"] == 1.0
    with pytest.raises(ValueError, match="differ"):
        query_bootstrap(v, g[:3])


def test_summary_refuses_mixed_tables():
    t = _judgments(["b", "a"])
    t = t.set_column(t.schema.get_field_index("judge"), "judge",
                     pa.array(["proxy:reward", "lmm:x:y"]))
    with pytest.raises(ValueError, match="one judge"):
        summarise_judgments(t)


# ----------------------------------------------------------------------------- contracts

def test_judgments_contract(tmp_path):
    t = _judgments(["b", None])
    path = write_judgments(t, tmp_path)
    back = read_judgments(tmp_path)
    assert back.schema == t.schema and path.name == "judgments.parquet"
    with pytest.raises(ValueError, match="winner 'left'"):
        judgments_table([{"query_id": "q", "status": "ok", "winner": "left"}])
    with pytest.raises(ValueError, match="without a reason"):
        judgments_table([{"query_id": "q", "status": "failed"}])
    with pytest.raises(ValueError, match="missing columns"):
        from aligner.data.judgments import check_judgments

        check_judgments(pa.table({"query_id": ["q"]}))


def test_rankings_contract(tmp_path):
    t = rankings_table(["q1", "q2"], ["a", "b"], {"base": [["x", "y"], ["z"]],
                                                  "aligned": [["y", "x"], ["w", "z"]]})
    write_rankings(t, tmp_path)
    back = read_rankings(tmp_path)
    assert ranked_ids(back, "aligned") == {"q1": ("a", ["y", "x"]), "q2": ("b", ["w", "z"])}
    with pytest.raises(KeyError, match="not in the rankings"):
        ranked_ids(back, "control")
    with pytest.raises(FileNotFoundError, match="rankings.parquet"):
        read_rankings(tmp_path / "nope")
    dup = pa.concat_tables([t, t.slice(0, 1)])
    with pytest.raises(ValueError, match="appears twice"):
        write_rankings(dup, tmp_path)
    with pytest.raises(ValueError, match="rows for 2 queries"):
        rankings_table(["q1", "q2"], ["a", "b"], {"base": [["x"]]})


# ----------------------------------------------------------------------------- annotation

def _rating(q, img, aspect, r, status="ok"):
    return {"query_id": q, "query": f"text {q}", "image_id": img, "aspect": aspect,
            "rating": r if status == "ok" else 0, "status": status,
            "error": "" if status == "ok" else "http_error: 500", "annotator": "lmm:x:y/annotate.v1"}


def test_annotation_pairs_from_hand_made_ratings():
    t = ratings_table([
        _rating("q1", "i1", "aesthetics", 5), _rating("q1", "i2", "aesthetics", 3),
        _rating("q1", "i3", "aesthetics", 3), _rating("q1", "i4", "aesthetics", 0, "failed"),
        _rating("q1", "i1", "fidelity", 2), _rating("q1", "i2", "fidelity", 4),
        _rating("q2", "i1", "aesthetics", 1), _rating("q2", "i5", "aesthetics", 1),
    ])
    rows, counts = derive_pairs(t)
    got = {(r["query_id"], r["aspect"], r["chosen_id"], r["rejected_id"], r["weight"])
           for r in rows}
    assert got == {("q1", "aesthetics", "i1", "i2", 0.5), ("q1", "aesthetics", "i1", "i3", 0.5),
                   ("q1", "fidelity", "i2", "i1", 0.5)}
    assert counts["ties"] == {"aesthetics": 2} and counts["failed_ratings_skipped"] == 1
    assert all(r["source"] == "lmm" and r["teacher"] == "lmm:x:y/annotate.v1" for r in rows)
    rows2, c2 = derive_pairs(t, min_gap=3)
    assert rows2 == [] and c2["below_gap"] == {"aesthetics": 2, "fidelity": 1}
    from aligner.data.preferences import preference_schema, rows_to_table

    table = rows_to_table(rows)
    assert table.schema == preference_schema()
    assert sorted(table.column("aspect").to_pylist()) == ["aesthetics", "aesthetics", "fidelity"]
    dup = ratings_table([_rating("q1", "i1", "aesthetics", 5), _rating("q1", "i1", "aesthetics", 2)])
    with pytest.raises(ValueError, match="rated twice"):
        derive_pairs(dup)
    with pytest.raises(ValueError, match="min_gap"):
        derive_pairs(t, min_gap=0)


def test_annotated_pairs_pass_the_preferences_reader(tmp_path):
    from aligner.data.preferences import read_preferences, rows_to_table, write_preferences

    rows, _ = derive_pairs(ratings_table([_rating("q1", "i1", "fidelity", 5),
                                          _rating("q1", "i2", "fidelity", 1)]))
    write_preferences(rows_to_table(rows), tmp_path)
    back = read_preferences(tmp_path)
    assert back.column("aspect").to_pylist() == ["fidelity"]
    assert back.column("weight").to_pylist() == [1.0] and back.column("source")[0].as_py() == "lmm"


def test_lmm_annotator_rates_each_aspect():
    def policy(req, images):
        return {"5": 0.6, "4": 0.4} if images[0] == GOOD else {"1": 0.9, "2": 0.1}

    ann = LMMAnnotator(ScriptedBackend(policy), aspects=["aesthetics", "fidelity"])
    rows = ann.rate([RatingItem("q", "t", "good", GOOD), RatingItem("q", "t", "bad", BAD),
                     RatingItem("q", "t", "gone", None, "missing image 'gone'")])
    t = ratings_table(rows)
    assert t.num_rows == 6
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["image_id"], r["rating"]) for r in ok} == {("good", 5), ("bad", 1)}
    assert ok[0]["expected"] == pytest.approx(4.6) and ok[0]["rationale"] == "because"
    assert [r["error"] for r in rows if r["status"] == "failed"] == ["missing image 'gone'"] * 2
    assert ann.name == "lmm:scripted:script/annotate.v1"
    with pytest.raises(ValueError, match="not in prompt"):
        LMMAnnotator(ScriptedBackend(policy), aspects=["colour"])
    with pytest.raises(ValueError, match="not rating"):
        LMMAnnotator(ScriptedBackend(policy), prompt="ranker")


# ----------------------------------------------------------------------------- serving

def test_serving_judge_args_and_deployment_with_an_lmm_back_end(tmp_path):
    import asyncio

    from pydantic import ValidationError

    from serving.config import JudgeArgs
    from serving.deployments import Judge

    assert JudgeArgs().kind == "proxy"
    with pytest.raises(ValidationError, match=r"judge.kind=openai needs judge.options \['base_url'"):
        JudgeArgs(kind="openai")
    with pytest.raises(ValidationError, match="kind"):
        JudgeArgs(kind="gpt")
    from aligner.data.corpus import write_corpus

    write_corpus(pa.table({"id": list(IMAGES), "image": list(IMAGES.values())}),
                 tmp_path / "corpus.parquet")
    cls = Judge.func_or_class
    d = cls(None, 0.02, "proxy:reward", str(tmp_path / "corpus.parquet"),
            {"options": {"path": "x", "loader": "tests.helpers.judge:FakeReward"}})
    assert d.describe()["judge"] == "proxy:reward:brightness" and d.describe()["proxy"]
    d.check_health()
    out = asyncio.run(d.compare("grey", ["dark1"], ["bright1", "bright2"]))
    assert out["winner"] == "right" and out["orders_agree"]
    assert out["judge"] == "proxy:reward:brightness"
    bad = asyncio.run(d.compare("grey", ["dark1"], ["nope"]))
    assert bad["error"]["status"] == 400 and "nope" in bad["error"]["detail"]


def test_the_evaluation_writes_what_each_system_returned():
    """``aligner.evaluation.run.rankings``: each system's top k gallery ids per query (the
    table jobs.judge reads), from the positions the search phase keeps."""
    from types import SimpleNamespace

    from aligner.evaluation.run import rankings

    st = SimpleNamespace(gallery=SimpleNamespace(ids=["g0", "g1", "g2", "g3"]),
                         cfg=SimpleNamespace(k=2), qids=["q1", "q2"], texts=["a", "b"],
                         tops={"base": np.array([[3, 1, 0], [2, 0, 1]]),
                               "aligned": np.array([[1, 3, 2], [0, -1, -1]])})
    t = rankings(st)
    assert ranked_ids(t, "base") == {"q1": ("a", ["g3", "g1"]), "q2": ("b", ["g2", "g0"])}
    assert ranked_ids(t, "aligned")["q2"] == ("b", ["g0"]), "padding (-1) is not an image"
    assert t.num_rows == 7 and t.column("rank").type == pa.int16()


def test_the_report_shows_the_judge_beside_it(tmp_path):
    from aligner.data.io import atomic_write_json
    from aligner.evaluation.report import add_judge_summary, judge_html, write_report
    from tests.unit.test_report import fake_metrics

    summary = summarise_judgments(_judgments(["b", "b", "a", "similar"]), n_boot=100)
    atomic_write_json(tmp_path / "judge" / "summary.json", summary)
    page = write_report(tmp_path, fake_metrics())["html"].read_text()
    assert page.count("Pairwise judge") == 1 and "a proxy judge, not an LMM" in page
    assert "0.625" in page, "win + similar/2 = (2 + 0.5) / 4"
    summary["judge"], summary["proxy"] = "lmm:openai:vlm", False
    atomic_write_json(tmp_path / "judge" / "summary.json", summary)
    add_judge_summary(tmp_path)  # replaces the section, never adds a second one
    page = (tmp_path / "report.html").read_text()
    assert page.count("Pairwise judge") == 1 and "lmm:openai:vlm" in page
    assert "a proxy judge" not in page
    assert "<h2 id='judge'>" in judge_html(summary)
    with pytest.raises(FileNotFoundError, match="jobs.judge"):
        add_judge_summary(tmp_path, tmp_path / "nowhere")
    # a judge of other rankings than the ones beside the report is not shown as current
    write_rankings(rankings_table(["q1"], ["a"], {"base": [["x"]]}), tmp_path)
    summary["rankings_sha256"] = "0123456789abcdef"
    atomic_write_json(tmp_path / "judge" / "summary.json", summary)
    page = (add_judge_summary(tmp_path)).read_text()
    assert "judged other rankings" in page and "lmm:openai:vlm" not in page
