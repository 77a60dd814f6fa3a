"""The OpenAI-compatible judge back end against a real small HTTP server on 127.0.0.1
speaking the chat-completions protocol: the request's shape (data-URL images, log-probs),
answers read from log-probs, time-outs, retries on 503, and malformed replies as clear
errors."""

from __future__ import annotations

import base64

import pytest

from aligner.judge.backend import ChatRequest
from aligner.judge.lmm import LMMJudge, ShownPair
from aligner.judge.openai_vlm import OpenAIVLM
from tests.helpers.judge import ChatServer, grey

BRIGHT, DARK = grey(230), grey(20)


def _backend(server: ChatServer, **kw) -> OpenAIVLM:
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("api_key_env", "JUDGE_TEST_KEY")
    return OpenAIVLM(server.base_url, "tiny-vlm", **kw)


def _request() -> ChatRequest:
    msgs = [{"role": "system", "content": "judge"},
            {"role": "user", "content": [{"type": "text", "text": "Row A:"},
                                         {"type": "image", "image": BRIGHT},
                                         {"type": "text", "text": "Row B:"},
                                         {"type": "image", "image": DARK},
                                         {"type": "text", "text": "Which? A, B or C."}]}]
    return ChatRequest(msgs, ("A", "B", "C"))


def test_request_shape_images_and_logprobs(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-1")
    with ChatServer() as server:
        b = _backend(server, extra_body={"seed": 7})
        [reply] = b.complete([_request()])
        body, headers = server.bodies[0], server.headers[0]
    assert reply.error == "" and reply.text == "A"
    assert reply.choice_logprobs["A"] > reply.choice_logprobs["B"] > reply.choice_logprobs["C"]
    assert body["model"] == "tiny-vlm" and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["seed"] == 7
    assert body["messages"][0] == {"role": "system", "content": "judge"}
    parts = body["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    url = parts[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == BRIGHT
    assert headers["Authorization"] == "Bearer sk-secret-1"
    assert "sk-secret-1" not in str(b.describe())


def test_no_key_no_auth_header_and_logprobs_can_be_off(monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with ChatServer("no_logprobs") as server:
        [reply] = _backend(server, logprobs=False).complete([_request()])
        body, headers = server.bodies[0], server.headers[0]
    assert "Authorization" not in headers and "logprobs" not in body
    assert reply.text == "A" and reply.choice_logprobs is None


def test_a_judgment_through_the_endpoint_reads_logprobs():
    with ChatServer() as server:
        judge = LMMJudge(_backend(server, max_concurrency=4))
        [(j, agree)] = judge.judge_pairs([ShownPair("grey squares", [DARK], [BRIGHT])])
        n = len(server.bodies)
    assert j.winner == "b" and agree and j.details["read"] == "logprobs"
    assert j.aspects == {"accuracy": "b", "aesthetics": "b", "diversity": "b"}
    assert n == 8 and judge.name == "lmm:openai:tiny-vlm"


def test_text_answers_without_logprobs_are_parsed():
    with ChatServer("no_logprobs") as server:
        [(j, _)] = LMMJudge(_backend(server)).judge_pairs([ShownPair("q", [BRIGHT], [DARK])])
    assert j.winner == "a" and j.details["read"] == "text"


def test_retries_on_503_then_succeeds():
    with ChatServer("flaky") as server:
        b = _backend(server, max_retries=2)
        [reply] = b.complete([_request()])
        attempts = server.attempts
    assert reply.error == "" and reply.text == "A"
    assert attempts == 2 and b.stats["retries"] == 1


def test_time_out_then_give_up_with_the_reason():
    with ChatServer("slow", delay=1.0) as server:
        b = _backend(server, timeout_s=0.2, max_retries=1)
        [reply] = b.complete([_request()])
        attempts = server.attempts
    assert reply.error.startswith("connection_error:") and "timed out" in reply.error
    assert reply.error.endswith("(after 1 retries)") and attempts == 2
    assert b.stats["failed"] == 1


@pytest.mark.parametrize("mode,message,attempts", [
    ("garbage", "bad_response: not JSON", 1),
    ("no_choices", "bad_response: no 'choices' in the reply", 1),
    ("bad_logprobs", "bad_response: malformed logprobs", 1),
    ("error", "http_error: 400", 1),  # a client error is not retried
])
def test_malformed_replies_are_clear_errors(mode, message, attempts):
    with ChatServer(mode) as server:
        b = _backend(server, max_retries=3)
        [reply] = b.complete([_request()])
        seen = server.attempts
        # the judge keeps the reason; the pair fails, nothing raises
        [res] = LMMJudge(b).judge_pairs([ShownPair("q", [BRIGHT], [DARK])])
    assert reply.error.startswith(message) and reply.text == ""
    assert seen == attempts
    assert isinstance(res, str) and res.startswith(message)


def test_unreachable_server_and_missing_settings():
    b = OpenAIVLM("http://127.0.0.1:9/v1", "m", timeout_s=0.5, max_retries=0,
                  api_key_env="")
    [reply] = b.complete([_request()])
    assert reply.error.startswith("connection_error:") and b.url.endswith("/chat/completions")
    with pytest.raises(ValueError, match="base_url and model"):
        OpenAIVLM("", "m")
