"""The in-process transformers back end on a tiny randomly initialised Llava-style model and
its processor, built in code (no downloads): a judgment and ratings through the real code
path, the choice read from the next-token logits (the same with or without generation, alone
or in a padded batch), loading from a saved directory, and errors per request."""

from __future__ import annotations

import math

import pytest

from aligner.judge.annotate import LMMAnnotator, RatingItem
from aligner.judge.backend import ChatRequest
from aligner.judge.lmm import LMMJudge, ShownPair
from aligner.judge.prompts import load_judge_prompt
from aligner.judge.transformers_vlm import TransformersVLM
from tests.helpers.judge import png, save_tiny_vlm, tiny_vlm

RED, BLUE = png((220, 30, 30), 24), png((30, 30, 220), 24)


@pytest.fixture(scope="module")
def vlm() -> TransformersVLM:
    model, processor = tiny_vlm()
    return TransformersVLM(model=model, processor=processor, device="cpu", batch_size=4,
                           name="tiny-llava")


def _req(query: str = "a red square", aspect: str = "overall", max_tokens: int = 1,
         rows=((RED,), (BLUE,))) -> ChatRequest:
    p = load_judge_prompt("ranker")
    return ChatRequest(p.messages(query, [list(r) for r in rows], aspect,
                                  rationale=max_tokens > 1), tuple(p.choices), max_tokens)


def test_a_judgment_through_the_real_code_path(vlm):
    judge = LMMJudge(vlm, "ranker")
    [(j, agree)] = judge.judge_pairs([ShownPair("a red square", [RED], [BLUE])])
    assert judge.name == "lmm:transformers:tiny-llava"
    assert j.winner in ("a", "b", "similar") and isinstance(agree, bool)
    assert set(j.aspects) == {"accuracy", "aesthetics", "diversity"}
    assert j.details["read"] == "logprobs", "in-process: always read from the logits"
    for order in ("first", "second"):
        p = j.details[order]["overall"]["p"]
        assert set(p) == {"A", "B", "C"} and sum(p.values()) == pytest.approx(1.0, abs=1e-3)
    # a win only when both orders (the second turned back into (a, b) terms) name it
    first, second = j.details["first_winner"], j.details["second_winner"]
    assert agree == (first == second)
    assert j.winner == (first if agree else "similar")


def test_scorer_style_and_annotation_on_the_tiny_vlm(vlm):
    [(j, _)] = LMMJudge(vlm, "scorer").judge_pairs([ShownPair("q", [RED], [BLUE])])
    for a in ("accuracy", "aesthetics", "diversity"):
        sa, sb = j.details["first"][a]
        assert 1.0 <= sa <= 5.0 and 1.0 <= sb <= 5.0
    rows = LMMAnnotator(vlm, aspects=["aesthetics"], rationale=False).rate(
        [RatingItem("q1", "a red square", "red", RED)])
    assert len(rows) == 1 and rows[0]["status"] == "ok" and 1 <= rows[0]["rating"] <= 5
    assert 1.0 <= rows[0]["expected"] <= 5.0 and rows[0]["decision"] == "logprobs"


def test_choice_logprobs_are_the_next_token_distribution(vlm):
    [one] = vlm.complete([_req()])
    assert one.error == "" and set(one.choice_logprobs) == {"A", "B", "C"}
    assert all(lp <= 0 for lp in one.choice_logprobs.values())
    assert sum(math.exp(v) for v in one.choice_logprobs.values()) <= 1.0 + 1e-6
    # generating a rationale reads the choice from the first generated step: same numbers
    [gen] = vlm.complete([_req(max_tokens=5)])
    assert gen.error == "" and isinstance(gen.text, str)
    gen_short = vlm.complete([_req(max_tokens=1, query="a red square")])[0]
    assert gen_short.choice_logprobs == pytest.approx(one.choice_logprobs)
    # the rationale request has a different prompt (it asks for a reason), so compare it with
    # its own single-step forward pass
    [step] = vlm.complete([ChatRequest(_req(max_tokens=5).messages, ("A", "B", "C"), 1)])
    assert gen.choice_logprobs == pytest.approx(step.choice_logprobs, abs=1e-4)


def test_left_padding_keeps_each_request_its_own_answer(vlm):
    short = _req(query="red")
    long = _req(query="a very long query about many red squares on a wide blue background")
    [alone] = vlm.complete([short])
    batch = vlm.complete([long, short])
    assert batch[1].choice_logprobs == pytest.approx(alone.choice_logprobs, abs=1e-4)


def test_loading_a_saved_model_directory(tmp_path, vlm):
    d = save_tiny_vlm(tmp_path / "tiny")
    loaded = TransformersVLM(model_path=str(d), device="cpu")
    assert loaded.model == "tiny"
    [a] = loaded.complete([_req()])
    [b] = vlm.complete([_req()])
    assert a.choice_logprobs == pytest.approx(b.choice_logprobs, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TransformersVLM(model_path=str(tmp_path / "none"))


def test_errors_stay_with_their_request(vlm):
    bad = _req(rows=((b"not an image",), (BLUE,)))
    out = vlm.complete([bad])
    assert out[0].error.startswith("model_error:") and out[0].choice_logprobs is None
    with pytest.raises(ValueError, match="same token"):
        vlm.choice_token_ids(("A", "a"))  # the MiniLM tokenizer lower-cases


def test_vllm_back_end_reads_first_position_logprobs(monkeypatch):
    """The vLLM back end's handling of ``LLM.chat`` outputs, with a stand-in ``vllm`` module
    (the real one needs a GPU: see the gpu test below)."""
    import sys
    import types

    class Logprob:
        def __init__(self, logprob, decoded_token):
            self.logprob, self.decoded_token, self.rank = logprob, decoded_token, 1

    class FakeLLM:
        def __init__(self, model, **kw):
            self.kw, self.calls = kw, []

        def get_tokenizer(self):
            return types.SimpleNamespace(decode=lambda ids: {7: "B"}.get(ids[0], "?"))

        def chat(self, messages, params, use_tqdm=False):
            self.calls.append((messages, params))
            outs = []
            for m in messages:
                url = m[1]["content"][2]["image_url"]["url"]
                assert url.startswith("data:image/png;base64,")
                first = {1: Logprob(-0.2, "A"), 7: Logprob(-1.8, None), 9: Logprob(-3.0, "zz")}
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(
                    text="A", logprobs=[first])]))
            return outs

    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from aligner.judge.vllm_vlm import VLLMVLM

    b = VLLMVLM("tiny", engine_kwargs={"max_model_len": 512})
    assert b.llm.kw["max_model_len"] == 512 and b.llm.kw["limit_mm_per_prompt"] == {"image": 16}
    [reply] = b.complete([_req()])
    assert reply.text == "A" and reply.choice_logprobs == {"A": -0.2, "B": -1.8}
    params = b.llm.calls[0][1]
    assert params == [{"temperature": 0.0, "max_tokens": 1, "logprobs": 20}]


@pytest.mark.gpu
def test_vllm_back_end_on_a_gpu(tmp_path):
    """The tiny Llava saved to disk, served by vLLM offline inference (needs CUDA and the gpu
    extra; skipped otherwise)."""
    pytest.importorskip("vllm")
    from aligner.judge.vllm_vlm import VLLMVLM

    d = save_tiny_vlm(tmp_path / "tiny")
    b = VLLMVLM(str(d), engine_kwargs={"max_model_len": 1024, "gpu_memory_utilization": 0.2,
                                       "enforce_eager": True,
                                       "limit_mm_per_prompt": {"image": 2}})
    replies = b.complete([_req(), _req(max_tokens=4)])
    assert all(r.error == "" and r.choice_logprobs is not None for r in replies)
    [(j, agree)] = LMMJudge(b).judge_pairs([ShownPair("a red square", [RED], [BLUE])])
    assert j.winner in ("a", "b", "similar") and isinstance(agree, bool)
