"""A round of the served feedback loop, from the client's side (``jobs.loop``).

Everything here talks to the application over HTTP only, exactly as the page
(``serving/static/app.js``) does; nothing imports ``serving``:

* :class:`ApiClient` - JSON requests with the bearer key, and the retry rule of the page and of
  ``docs/votes.md``: connection errors, 429 and 5xx are retried (after ``Retry-After`` when
  given), a vote always with its own ``Idempotency-Key``;
* :func:`cast_votes` - simulated raters vote: ``POST /v1/compare`` for a training query, the
  rater sees the two rows' image ids (never the models), ``POST /v1/votes`` with its choice and
  confidence; every acknowledged vote is a line of ``votes.jsonl``, so a re-run casts only the
  votes still missing;
* :func:`export_votes` - ``GET /v1/votes/export``: every vote so far, as a preferences table;
* :class:`SearchProbe` - a client searching without pause while the application is upgraded,
  counting the requests that failed (a non-200 answer or no answer);
* round manifests (:func:`round_complete`, :func:`round_outputs`) and the loop report
  (:func:`write_report`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from aligner.data.io import atomic_write_text, json_safe

log = logging.getLogger(__name__)

#: answers a client retries (the same request; a vote with the same key)
TRANSIENT_STATUS = (429, 500, 502, 503, 504)
VOTES_LOG = "votes.jsonl"
ROUND_JOB = "loop_round"


# ----------------------------------------------------------------------------- HTTP

@dataclass
class Answer:
    """One HTTP answer: ``status`` (0: no answer: ``error`` says why), the JSON body (or the
    raw bytes when it is not JSON) and the headers (lower-case names)."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status in TRANSIENT_STATUS

    def detail(self) -> str:
        if self.error:
            return self.error
        if isinstance(self.body, dict) and "detail" in self.body:
            return f"{self.status}: {self.body['detail']}"
        return f"{self.status}: {str(self.body)[:200]}"


class ApiClient:
    """The application's HTTP API at ``base_url`` (``http://127.0.0.1:8000``).

    Args:
        base_url: the application's root.
        api_key: the bearer token for protected routes (votes, export).
        timeout_s: per request.
    """

    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             auth: bool = False, timeout_s: float | None = None) -> Answer:
        """One request; never raises for HTTP or network errors (see :class:`Answer`)."""
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"content-type": "application/json", **(headers or {})}
        if auth and self.api_key:
            hdrs["authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=data, headers=hdrs,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                payload, status, h = r.read(), r.status, r.headers
        except urllib.error.HTTPError as e:
            try:
                payload = e.read()
            except OSError:
                payload = b""
            status, h = e.code, e.headers
        except (OSError, ValueError) as e:  # URLError, reset, refused, timeout, bad reply
            return Answer(0, error=f"{type(e).__name__}: {e}")
        heads = {k.lower(): v for k, v in (h.items() if h is not None else [])}
        try:
            parsed: Any = json.loads(payload) if payload else None
        except (ValueError, UnicodeDecodeError):
            parsed = payload
        return Answer(status, parsed, heads)

    def call_retrying(self, method: str, path: str, body: Any = None,
                      headers: dict[str, str] | None = None, auth: bool = False,
                      deadline_s: float = 120.0, on_retry: Callable[[Answer], None] | None = None
                      ) -> Answer:
        """:meth:`call`, repeated while the answer is transient (no answer, 429, 5xx) until
        ``deadline_s`` has passed; waits ``Retry-After`` when given, else 0.2 s doubling up to
        2 s. Returns the last answer."""
        end = time.monotonic() + deadline_s
        pause = 0.2
        while True:
            a = self.call(method, path, body, headers, auth)
            if not a.transient or time.monotonic() >= end:
                return a
            if on_retry is not None:
                on_retry(a)
            try:
                wait = float(a.headers.get("retry-after", "")) if a.headers else pause
            except ValueError:
                wait = pause
            time.sleep(min(max(wait, 0.05), max(0.0, end - time.monotonic())))
            pause = min(2.0, pause * 2)


# ----------------------------------------------------------------------------- votes

class Population(Protocol):
    """What :func:`cast_votes` needs of the raters (:class:`aligner.world.raters.
    RaterPopulation`): a choice between two rows of image ids for a query."""

    def row_vote(self, query_id: str, left_ids: list[str], right_ids: list[str],
                 rng: np.random.Generator) -> tuple[str, int, int]: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Query:
    """A query a rater may ask: the world's id (what the rater knows it by) and its text (what
    the page sends)."""

    query_id: str
    text: str


class VoteError(RuntimeError):
    """A comparison or vote the application refused (not a transient failure)."""


def read_votes_log(path: Path) -> dict[int, dict[str, Any]]:
    """The acknowledged votes of a round by vote number (a torn last line is ignored)."""
    out: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        out[int(rec["i"])] = rec
    return out


def cast_votes(client: ApiClient, population: Population, queries: Sequence[Query], n: int,
               k: int, seed: int, round_no: int, out_dir: Path, threads: int = 4,
               deadline_s: float = 120.0) -> dict[str, Any]:
    """Cast votes ``0 .. n-1`` of round ``round_no`` through the API (those already in
    ``out_dir/votes.jsonl`` are not cast again); returns the round's vote counts.

    Vote ``i`` draws its query and the rater's choice from ``default_rng([seed, round_no,
    i])``: ``POST /v1/compare {text, k}``, the rater chooses between the rows' image ids, then
    ``POST /v1/votes {comparison_id, preferred, confidence}`` with the API key and an
    ``Idempotency-Key`` (one uuid4 per vote, resent with every retry of that vote).

    Raises:
        VoteError: the application refused a comparison or vote (a wrong key: 401 ...).
        ValueError: no queries.
    """
    if not queries:
        raise ValueError("no queries to vote on")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / VOTES_LOG
    done = read_votes_log(path)
    if path.is_file() and not path.read_text().endswith("\n"):  # a torn last line: drop it
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in done.values()))
    todo = [i for i in range(n) if i not in done]
    lock, pop_lock = threading.Lock(), threading.Lock()
    retries = {"compare": 0, "vote": 0}
    t0 = time.time()

    def retried(kind: str) -> Callable[[Answer], None]:
        def note(a: Answer) -> None:
            with lock:
                retries[kind] += 1
            log.info("retrying %s after %s", kind, a.detail())
        return note

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, round_no, i])
        q = queries[int(rng.integers(len(queries)))]
        c = client.call_retrying("POST", "/v1/compare", {"text": q.text, "k": k},
                                 deadline_s=deadline_s, on_retry=retried("compare"))
        if not c.ok:
            raise VoteError(f"/v1/compare for {q.text!r}: {c.detail()}")
        left = [r["id"] for r in c.body["left"]["results"]]
        right = [r["id"] for r in c.body["right"]["results"]]
        with pop_lock:  # the rater sees ids only: never the models behind the rows
            preferred, confidence, rater = population.row_vote(q.query_id, left, right, rng)
        key = str(uuid.uuid4())
        v = client.call_retrying(
            "POST", "/v1/votes", {"comparison_id": c.body["comparison_id"],
                                  "preferred": preferred, "confidence": int(confidence)},
            headers={"Idempotency-Key": key}, auth=True, deadline_s=deadline_s,
            on_retry=retried("vote"))
        if not v.ok:
            raise VoteError(f"/v1/votes for comparison {c.body['comparison_id']}: {v.detail()}")
        winner = {"left": v.body["left_model"], "right": v.body["right_model"]}.get(preferred,
                                                                                    "tie")
        rec = {"i": i, "query_id": q.query_id, "query": q.text,
               "comparison_id": c.body["comparison_id"], "vote_id": v.body["vote_id"],
               "idempotency_key": key, "replayed": bool(v.body.get("replayed")),
               "preferred": preferred, "confidence": int(confidence), "rater": int(rater),
               "left_model": v.body["left_model"], "right_model": v.body["right_model"],
               "winner": winner, "left_ids": left, "right_ids": right}
        with lock, open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()

    before = database_votes(client)
    if todo:
        log.info("round %d: casting %d votes (%d already cast) through %s", round_no, len(todo),
                 len(done), client.base_url)
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for f in [pool.submit(one, i) for i in todo]:
                f.result()
    after = database_votes(client)
    counts = vote_counts(read_votes_log(path), n, len(done), retries, time.time() - t0)
    counts["database"] = {"votes_before": before, "votes_after": after,
                          "recorded_now": after - before, "cast_now": len(todo),
                          "recorded_equals_cast": after - before == len(todo)}
    if after - before != len(todo):
        log.warning("round %d: %d votes cast now but the database grew by %d", round_no,
                    len(todo), after - before)
    return counts


def database_votes(client: ApiClient) -> int:
    """How many votes the application's database holds (``GET /v1/votes``, with the key).

    Raises:
        VoteError: the route refused (a wrong key) or never answered.
    """
    a = client.call_retrying("GET", "/v1/votes?limit=1", auth=True)
    if not a.ok:
        raise VoteError(f"/v1/votes: {a.detail()}")
    return int(a.body["counts"]["votes"])


def vote_counts(votes: dict[int, dict[str, Any]], n: int, resumed: int,
                retries: dict[str, int], seconds: float) -> dict[str, Any]:
    """The counts a round's manifest records of its votes."""
    recs = list(votes.values())
    by = {p: sum(r["preferred"] == p for r in recs) for p in ("left", "right", "tie")}
    winners: dict[str, int] = {}
    for r in recs:
        winners[r["winner"]] = winners.get(r["winner"], 0) + 1
    return {"votes_wanted": n, "votes_cast": len(recs), "resumed_with": resumed,
            "preferred": by, "winners": winners, "retries": retries,
            "replayed": sum(bool(r.get("replayed")) for r in recs),
            "mean_confidence": round(float(np.mean([r["confidence"] for r in recs])), 3)
            if recs else None,
            "raters": len({r["rater"] for r in recs}), "queries": len({r["query_id"]
                                                                        for r in recs}),
            "seconds": round(seconds, 1)}


def export_votes(client: ApiClient, out: Path) -> dict[str, Any]:
    """``GET /v1/votes/export`` into ``out/preferences.parquet`` (checked) + manifest."""
    from aligner.data.io import atomic_write
    from aligner.data.preferences import read_preferences
    from aligner.runtime.manifest import write_manifest

    started = time.time()
    a = client.call_retrying("GET", "/v1/votes/export?min_confidence=1", auth=True)
    if not a.ok or not isinstance(a.body, (bytes, bytearray)):
        raise RuntimeError(f"/v1/votes/export: {a.detail()}")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "preferences.parquet") as tmp:
        Path(tmp).write_bytes(bytes(a.body))
    rows = read_preferences(out).num_rows
    counts = {"votes": int(a.headers.get("x-votes", -1)),
              "pairs": int(a.headers.get("x-pairs", -1)), "rows": rows, "bytes": len(a.body)}
    write_manifest(out, "loop_export", {"route": "/v1/votes/export", "min_confidence": 1},
                   started, counts=counts, source="human (the served page's API; simulated "
                   "raters)")
    return counts


# ----------------------------------------------------------------------------- the probe

class SearchProbe(threading.Thread):
    """Searches ``POST /v1/search`` one request after another (``period_s`` apart) until
    :meth:`stop`; every request is kept as ``(start, end, status, error)`` (status 0: no
    answer). A failed request is any answer but 200, or none."""

    def __init__(self, client: ApiClient, texts: Sequence[str], k: int = 8,
                 model: str | None = None, period_s: float = 0.05,
                 timeout_s: float = 60.0) -> None:
        super().__init__(daemon=True, name="search-probe")
        if not texts:
            raise ValueError("the probe needs at least one query")
        self.client, self.texts, self.k, self.model = client, list(texts), k, model
        self.period_s, self.timeout_s = period_s, timeout_s
        self.requests: list[tuple[float, float, int, str]] = []
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        i = 0
        while not self._stop_event.is_set():
            body: dict[str, Any] = {"text": self.texts[i % len(self.texts)], "k": self.k}
            if self.model:
                body["model"] = self.model
            t = time.time()
            a = self.client.call("POST", "/v1/search", body, timeout_s=self.timeout_s)
            with self._lock:
                self.requests.append((t, time.time(), a.status, "" if a.ok else a.detail()))
            i += 1
            self._stop_event.wait(self.period_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(self.timeout_s + 5)

    def answered(self) -> int:
        """Requests answered 200 so far."""
        with self._lock:
            return sum(s == 200 for _, _, s, _ in self.requests)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """The requests that overlap ``[start, end]`` (epoch seconds): how many, how many
        failed and why (a few examples), and their latencies."""
        with self._lock:
            reqs = [r for r in self.requests if r[1] >= start and r[0] <= end]
        failed = [r for r in reqs if r[2] != 200]
        lat = sorted(e - s for s, e, _, _ in reqs)
        statuses: dict[str, int] = {}
        for r in failed:
            statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
        return {"requests": len(reqs), "failed": len(failed), "failed_by_status": statuses,
                "errors": [r[3] for r in failed[:5]],
                "latency_s": {"median": round(lat[len(lat) // 2], 3) if lat else None,
                              "max": round(lat[-1], 3) if lat else None}}


def wait_for(predicate: Callable[[], bool], timeout_s: float, period_s: float = 0.5,
             what: str = "a condition") -> float:
    """Poll ``predicate`` until it holds; returns the seconds waited.

    Raises:
        TimeoutError: it did not hold within ``timeout_s``.
    """
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(period_s)
    return time.monotonic() - t0


# ----------------------------------------------------------------------------- rounds

def round_name(round_no: int) -> str:
    return f"r{round_no:02d}"


def round_complete(round_dir: Path) -> dict[str, Any] | None:
    """The finished round's manifest, or None while the round is unfinished (a finished round
    is never redone)."""
    path = round_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except ValueError:
        return None
    return m if m.get("job") == ROUND_JOB and m.get("complete") else None



#: what a round's manifest keeps of its upgrade's manifest
UPGRADE_KEYS = ("requests", "failed", "failed_by_status", "errors", "latency_s",
                "seconds_serve_run", "seconds_until_new_version", "probe")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def round_outputs(round_dir: Path, votes_wanted: int) -> dict[str, Any]:
    """What a round's votes, export and upgrade left in ``round_dir`` (``votes/``,
    ``export/``, ``upgrade/``; a resumed round has them all), as the round's manifest records
    it: ``votes`` (+ ``database``), ``raters``, ``votes_cast_total`` (this round's and the
    earlier rounds' beside it), ``export``, ``votes_recorded_equals_cast`` and ``upgrade``."""
    vm = _read_json(round_dir / "votes" / "manifest.json")
    all_votes = sum(len(read_votes_log(d / "votes" / VOTES_LOG))
                    for d in sorted(round_dir.parent.glob("r[0-9][0-9]"))
                    if d.name <= round_dir.name)
    export = _read_json(round_dir / "export" / "manifest.json").get("counts", {})
    db = (vm.get("counts") or {}).get("database", {})
    up = _read_json(round_dir / "upgrade" / "manifest.json")
    return {"votes": vm.get("counts") or vote_counts(
                read_votes_log(round_dir / "votes" / VOTES_LOG), votes_wanted, 0, {}, 0),
            "raters": vm.get("raters", {}), "votes_cast_total": all_votes, "export": export,
            "votes_recorded_equals_cast": bool(db.get("recorded_equals_cast"))
            and export.get("votes") == db.get("votes_after"),
            "upgrade": {k: up.get(k) for k in UPGRADE_KEYS}}

REPORT_COLUMNS = (
    ("round", "round"), ("served", "served (vs base)"), ("votes_cast", "votes cast"),
    ("votes_recorded", "votes in the database"), ("pairs_exported", "pairs exported"),
    ("pairs_kept", "pairs trained on"), ("pairs_dropped", "pairs dropped (test / gallery)"),
    ("aligned_won", "aligned won / decisive"), ("reward_val_acc", "reward acc (held-out votes)"),
    ("upgrade", "upgrade failed / requests"), ("upgrade_s", "upgrade s"),
    ("seconds", "seconds (votes, reward, preferences, align, embed+index)"), ("total_s", "round s"))


def short_path(path: Any, root: Path | None) -> str:
    """``path`` relative to ``root`` when it is inside it."""
    if not path:
        return ""
    try:
        return str(Path(path).relative_to(root)) if root else str(path)
    except ValueError:
        return str(path)


def report_row(m: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """One report row from a finished round's manifest (paths relative to ``root``)."""
    v, e, rw = m.get("votes", {}), m.get("export", {}), m.get("reward", {})
    up, t = m.get("upgrade", {}), m.get("timings_s", {})
    counts = rw.get("votes", {})
    dropped = counts.get("dropped", {})
    decisive = sum(n for w, n in (v.get("winners") or {}).items() if w != "tie")

    def sec(*names: str) -> str:
        return ", ".join(f"{t[n]:.0f}" if n in t else "-" for n in names)

    return {
        "round": m.get("round"), "served": short_path(m.get("served", {}).get("aligned"), root),
        "votes_cast": m.get("votes_cast_total"), "votes_recorded": e.get("votes"),
        "pairs_exported": e.get("pairs"), "pairs_kept": counts.get("pairs_kept"),
        "pairs_dropped": f"{counts.get('pairs_dropped', '-')} ({dropped.get('test', 0)} / "
                         f"{dropped.get('gallery', 0)})",
        "aligned_won": f"{(v.get('winners') or {}).get('aligned', 0)} / {decisive}",
        "reward_val_acc": rw.get("val_acc_vs_votes"),
        "upgrade": f"{up.get('failed', '-')} / {up.get('requests', '-')}",
        "upgrade_s": up.get("seconds_until_new_version"),
        "seconds": sec("votes", "reward", "preferences", "aligned", "embed+index"),
        "total_s": m.get("wall_time_s"),
    }


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"
    return str(v).replace("|", "/")


def write_report(work: Path, rounds: list[dict[str, Any]], header: dict[str, Any]) -> Path:
    """``work/loop_report.md`` (one row per finished round) and ``loop_report.json`` (the
    rows, the rounds' manifests and ``header``); returns the Markdown path."""
    rows = [report_row(m, work) for m in rounds]
    lines = ["# Feedback loop", ""]
    lines += [f"- {k}: {_cell(v)}" for k, v in header.items()]
    lines += ["", "| " + " | ".join(t for _, t in REPORT_COLUMNS) + " |",
              "|" + "---|" * len(REPORT_COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[k]) for k, _ in REPORT_COLUMNS) + " |" for r in rows]
    up = [m.get("upgrade", {}) for m in rounds]
    lines += ["", f"Upgrades in place: {sum(u.get('failed', 0) for u in up)} failed of "
                  f"{sum(u.get('requests', 0) for u in up)} searches sent while the "
                  "application was upgraded (target: none failed).", ""]
    atomic_write_text(work / "loop_report.md", "\n".join(lines))
    atomic_write_text(work / "loop_report.json", json.dumps(json_safe(
        {"header": header, "rows": rows, "rounds": rounds}), indent=2))
    return work / "loop_report.md"
