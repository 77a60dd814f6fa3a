"""The served application against its own OpenAPI document: schemathesis (the CLI, every
check, a fixed seed, a bounded number of cases per operation) over real HTTP on 127.0.0.1,
with the API key, must find nothing.

Every check runs. One is narrowed, for four operations, in the config below: whether a
schema-valid request is accepted (``positive_data_acceptance``) cannot be promised where
validity depends on content or state no JSON schema can express. ``POST /v1/search`` and
``POST /v1/search/image``: whether bytes decode as an image, a URL is reachable, an embedding
has the model's dimension, which of text / image / like / embedding go together (400, 422);
``POST /v1/judge``: whether the ids are in the corpus (400); ``POST /v1/votes``: an
idempotency key already used for another vote (422, as the Idempotency-Key draft says).
There those documented statuses also count as answers to valid-looking data; everything
else about those operations (status codes, content types, response schemas and headers,
negative data, auth, server errors) is checked as everywhere.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(600)
SEED = 20261207
MAX_EXAMPLES = 15  # per operation and phase: about a minute on 2 cores

_ACCEPT = '"2xx", "3xx", "401", "403", "404", "409", "429", "5xx"'  # schemathesis's default
CONFIG = f"""
[[operations]]
include-name = "POST /v1/search"
checks.positive_data_acceptance.expected-statuses = [{_ACCEPT}, "400", "422"]

[[operations]]
include-name = "POST /v1/search/image"
checks.positive_data_acceptance.expected-statuses = [{_ACCEPT}, "400", "422"]

[[operations]]
include-name = "POST /v1/judge"
checks.positive_data_acceptance.expected-statuses = [{_ACCEPT}, "400"]

[[operations]]
include-name = "POST /v1/votes"
checks.positive_data_acceptance.expected-statuses = [{_ACCEPT}, "422"]
"""


def test_schemathesis_finds_no_failure(served, tmp_path):
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    cmd = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
           "--config-file", str(tmp_path / "schemathesis.toml"), "--no-color",
           "run", f"{served.url}/openapi.json",
           "--checks", "all", "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES),
           "--header", f"Authorization: Bearer {served.api_key}",
           "--generation-database", "none", "--request-timeout", "30",
           "--wait-for-schema", "30"]
    t0 = time.monotonic()
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    out = run.stdout + run.stderr
    summary = out[out.rfind("SUMMARY"):] if "SUMMARY" in out else out[-4000:]
    print(f"schemathesis ({time.monotonic() - t0:.0f} s, exit {run.returncode}):\n{summary}")
    tested = re.search(r"Tested: (\d+)", out)
    assert tested and int(tested[1]) >= 11, "every operation of the document is tested"
    assert run.returncode == 0, out[-20000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert cases and cases[1] == cases[2] and int(cases[1]) > 300, summary
    assert "Failures:" not in summary and "Errors:" not in summary


def _call(served, method: str, path: str, key: str | None = None) -> tuple[int, bytes, dict]:
    import urllib.error
    import urllib.request

    hdrs = {"authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(served.url + path, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def test_the_served_document_is_the_configurations(served):
    import json

    status, body, _ = _call(served, "GET", "/openapi.json")
    spec = json.loads(body)
    search = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert search["model"]["anyOf"][0]["enum"] == ["aligned", "base"]
    assert search["index"]["anyOf"][0]["enum"] == ["flat"]
    assert search["k"]["maximum"] == served.args["limits"]["max_k"]
    secured = {(m, p) for p, ops in spec["paths"].items() for m, op in ops.items()
               if op.get("security")}
    assert secured == {("post", "/v1/votes"), ("get", "/v1/votes"),
                       ("get", "/v1/votes/export")}  # auth.protect = writes
    # what schemathesis found before: HEAD / answered 405, Allow named one route's methods,
    # the export said JSON
    assert _call(served, "HEAD", "/")[0] == 200
    status, _, h = _call(served, "OPTIONS", "/v1/votes")
    assert status == 405 and {m.strip() for m in h["allow"].split(",")} >= {"GET", "POST"}
    status, table, h = _call(served, "GET", "/v1/votes/export", key=served.api_key)
    assert status == 200 and h["content-type"] == "application/vnd.apache.parquet"
    assert table[:4] == b"PAR1"
