"""Votes in PostgreSQL through the served application: real Ray Serve, real HTTP on 127.0.0.1,
two ingress replicas, a throwaway PostgreSQL server (tests/helpers/postgres.py) restarted
while clients vote.

The application is deployed under its own name and route prefix (``votes_pg`` at
``/votes-pg``) with ``votes.database_url`` on the throwaway server, so it neither replaces
nor depends on the ``aligner`` application of the other serving tests, and it is deleted at
the end. It reuses their session fixtures (the serving world, Serve's HTTP proxy, the fake
LLM). Skipped without PostgreSQL's binaries or psycopg, saying why.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tests.helpers.postgres import PostgresServer, unavailable
from tests.helpers.serving import API_KEY, app_args

REASON = unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no PostgreSQL: {REASON}"),
              pytest.mark.timeout(600)]

APP, PREFIX = "votes_pg", "/votes-pg"
QUERIES = ["two red circles on grass", "a yellow star on sand", "three blue squares on wood"]
#: clients, votes per client; the server goes down twice (after these shares of the votes)
CLIENTS, VOTES_EACH = 6, 8
RESTARTS = ((0.3, "fast"), (0.65, "immediate"))
DOWN_S = 3.0
#: a vote request waits this long before the client gives up and sends it again (same key):
#: during an outage the first request is still in the store's retry loop when the second
#: arrives, so both race to write the same vote
VOTE_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def served_pg(serve_http, serving_world, fake_llm, pg, tmp_path_factory):
    """The application with two ingress replicas and its votes in ``pg``."""
    import os

    from ray import serve

    import serving.app
    from serving.ingress import Ingress

    os.environ.pop("ALIGNER_API_KEY", None)
    args = app_args(serving_world, tmp_path_factory.mktemp("serve-pg"), fake_llm,
                    votes={"database_url": pg.url()})
    t0 = time.monotonic()
    # build_app names the ingress deployment; the replica count rides along on the class
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving.app, "Ingress", Ingress.options(num_replicas=2))
        serve.run(serving.app.build_app(args), name=APP, route_prefix=PREFIX)
    deployed_s = time.monotonic() - t0
    yield SimpleNamespace(url=serve_http + PREFIX, args=args, deployed_s=deployed_s)
    serve.delete(APP)


def call(url: str, method: str, path: str, body: object = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, object]:
    """(status, JSON) of one request; a time-out or a refused connection is status 0."""
    hdrs = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}",
            **(headers or {})}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (TimeoutError, urllib.error.URLError, ConnectionError):
        return 0, None


def test_votes_from_two_replicas_survive_database_restarts_exactly_once(served_pg, pg):
    from ray import serve

    url = served_pg.url
    ingress = serve.status().applications[APP].deployments["ingress"]
    assert ingress.replica_states.get("RUNNING") == 2, ingress.replica_states
    total = CLIENTS * VOTES_EACH
    done, lock, log = [0], threading.Lock(), []

    def client(c: int) -> list[dict]:
        sent = []
        for i in range(VOTES_EACH):
            deadline = time.monotonic() + 60
            while True:  # a comparison (a new one if the first answer is lost)
                status, cmp = call(url, "POST", "/v1/compare",
                                   {"text": QUERIES[(c + i) % 3], "k": 3}, timeout=20)
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert status == 200, (status, cmp)
            key = str(uuid.uuid4())
            body = {"comparison_id": cmp["comparison_id"], "preferred": ("left", "right")[i % 2],
                    "confidence": 1 + i % 5, "comment": f"client {c} vote {i}"}
            answers = []
            while True:  # the same vote, the same key, until it is answered
                status, out = call(url, "POST", "/v1/votes", body,
                                   {"Idempotency-Key": key}, timeout=VOTE_TIMEOUT_S)
                answers.append(status)
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert status == 200, (status, out, answers)
            sent.append({"key": key, "vote_id": out["vote_id"], "replayed": out["replayed"],
                         "answers": answers, **body})
            with lock:
                done[0] += 1
        return sent

    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client, c) for c in range(CLIENTS)]
        for share, mode in RESTARTS:
            while done[0] < share * total and time.monotonic() - t0 < 120:
                time.sleep(0.01)
            at = done[0]
            pg.restart(mode, down_s=DOWN_S)
            log.append((mode, at))
        sent = [s for f in futures for s in f.result()]
    elapsed = time.monotonic() - t0
    assert all(0 < at < total for _, at in log), log  # the outages hit the voting

    # every vote once, through the API ...
    status, listed = call(url, "GET", f"/v1/votes?limit={total + 100}")
    assert status == 200
    assert listed["counts"]["votes"] == total == len(sent)
    by_key = {v["idempotency_key"]: v for v in listed["votes"]}
    assert len(by_key) == len(listed["votes"]) == total
    assert set(by_key) == {s["key"] for s in sent}
    for s in sent:  # ... as the client sent it, with the id its answer gave
        v = by_key[s["key"]]
        assert (v["id"], v["comment"], v["preferred"], v["confidence"]) == (
            s["vote_id"], s["comment"], s["preferred"], s["confidence"])
    # ... and in the database itself
    db = pg.url().rsplit("/", 1)[1]
    rows = pg.query("SELECT idempotency_key, count(*) FROM votes GROUP BY idempotency_key",
                    database=db)
    assert len(rows) == total and {n for _, n in rows} == {1}
    assert {k for k, _ in rows} == {s["key"] for s in sent}
    # two ingress replicas held connections (application_name names the process)
    apps = {a for (a,) in pg.query("SELECT DISTINCT application_name FROM pg_stat_activity "
                                   "WHERE datname = %s AND application_name LIKE 'votes-%%'",
                                   (db,), database="postgres")}
    resent = sum(len(s["answers"]) - 1 for s in sent)
    print(f"\n{total} votes from {CLIENTS} clients through 2 ingress replicas in {elapsed:.1f} s "
          f"(deployed in {served_pg.deployed_s:.1f} s), restarts {log} down {DOWN_S} s each: "
          f"{len(rows)} rows, 0 duplicated, 0 lost; requests sent again {resent} "
          f"(answers {sorted({a for s in sent for a in s['answers']})}), "
          f"answered as replays {sum(s['replayed'] for s in sent)}; "
          f"votes connections from {len(apps)} processes")
    assert len(apps) >= 2, apps
