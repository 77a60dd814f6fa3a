"""POST a JSON body to an HTTP endpoint with timeouts and retries (stdlib only).

The one retry loop behind the OpenAI-compatible clients (the rephraser and the LMM judge):
connection errors, time-outs and the statuses in :data:`RETRY_STATUS` are retried with
exponential back-off and jitter (a ``Retry-After`` header wins, capped at 60 s); any other
status, a body that is not JSON, or retries used up raise :class:`HttpFailure` with a short
reason that never holds the request's headers (the API key stays out of errors and logs).
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class HttpFailure(Exception):
    """A request that got no usable answer; ``str()`` is the reason."""


def json_headers(api_key_env: str = "") -> dict[str, str]:
    """JSON request headers, with ``Authorization: Bearer <key>`` when the environment
    variable ``api_key_env`` holds a key (read at call time, never logged)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def backoff_wait(attempt: int, backoff_s: float, retry_after: str | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based)."""
    wait = backoff_s * (2 ** attempt) * (0.75 + 0.5 * random.random())
    if retry_after:
        try:
            wait = min(float(retry_after), 60.0)
        except ValueError:
            pass
    return wait


def post_json(url: str, body: Mapping[str, Any], headers: Mapping[str, str], timeout_s: float,
              max_retries: int, backoff_s: float,
              count: Callable[[str], None] | None = None) -> Any:
    """POST ``body`` as JSON; the parsed JSON reply.

    Args:
        count: called with ``"requests"`` per attempt and ``"retries"`` per retry.

    Raises:
        HttpFailure: a non-retryable status, retries used up, or a reply that is not JSON.
    """
    data = json.dumps(body).encode()
    last = "no attempt"
    for attempt in range(max_retries + 1):
        if count:
            count("requests")
        req = urllib.request.Request(url, data=data, headers=dict(headers), method="POST")
        retry_after = None
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read()
            try:
                return json.loads(raw)
            except ValueError:
                raise HttpFailure(f"bad_response: not JSON ({raw[:60]!r})") from None
        except urllib.error.HTTPError as e:
            last = f"http_error: {e.code} {e.reason}"
            retry_after = e.headers.get("Retry-After") if e.headers else None
            if e.code not in RETRY_STATUS:
                raise HttpFailure(last) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            last = f"connection_error: {type(reason).__name__}: {reason}"[:200]
        if attempt < max_retries:
            if count:
                count("retries")
            time.sleep(backoff_wait(attempt, backoff_s, retry_after))
    raise HttpFailure(f"{last} (after {max_retries} retries)")
