"""Serving test helpers: the application's args over the serving world, deploying it, and a
fake OpenAI-compatible LLM server (loopback only)."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace

API_KEY = "test-key-123"


class FakeLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: a rephrasing at once, or after 3 s for "slowly"."""

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        text = body["messages"][-1]["content"]
        if "slowly" in text:
            time.sleep(3)
        query = text.rsplit(":", 1)[-1].strip().strip('"')
        answer = f"{query}, crisp, well-lit, vivid colours"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, *args: object) -> None:
        pass


def app_args(world: SimpleNamespace, data_dir: Path, llm: str, **over: object) -> dict:
    """The application's args over the serving world (``over``: top-level overrides)."""
    args = {
        "corpus": str(world.corpus),
        "models": {"base": {"checkpoint": str(world.base),
                            "indexes": {"flat": str(world.index_base)}},
                   "aligned": {"checkpoint": str(world.aligned),
                               "indexes": {"flat": str(world.index_aligned)}}},
        "data_dir": str(data_dir),
        "rephraser": {"backend": "openai", "timeout_s": 1.0,
                      "options": {"base_url": llm, "model": "fake", "timeout_s": 10,
                                  "max_retries": 0, "api_key_env": ""}},
        "auth": {"api_key": API_KEY, "protect": "writes"},
        "limits": {"max_k": 500, "max_page_size": 50, "max_body_bytes": 512 * 1024,
                   "max_image_pixels": 4_000_000, "allow_private_image_urls": True,
                   "max_query_chars": 200, "rate_per_s": 1000, "rate_burst": 1000},
    }
    args.update(over)
    return args


def deploy(args: dict) -> None:
    """(Re)deploy the application under the name ``aligner`` at ``/``."""
    from ray import serve

    from serving.app import build_app

    serve.run(build_app(args), name="aligner", route_prefix="/")


