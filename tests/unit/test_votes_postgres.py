"""The votes store on PostgreSQL (no Ray): the migrations on a fresh and on an old database,
the same answers as SQLite, idempotent writes, and two processes writing through server
restarts without losing or duplicating a vote.

Each test gets a throwaway server (``tests/helpers/postgres.py``: initdb in a temporary
directory, a free port on 127.0.0.1); without PostgreSQL's binaries or psycopg they skip,
saying why.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import uuid
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect

from serving.votes import IdempotencyKeyReused, VoteStore, sqlite_url
from serving.votes.export import export_preferences
from serving.votes.models import Base
from serving.votes.store import alembic_config, head_revision
from tests.helpers.postgres import PostgresServer, unavailable
from tests.helpers.threads import run_together

REASON = unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no PostgreSQL: {REASON}"),
              pytest.mark.timeout(120)]

#: the restart test: votes per writer process, when the server goes down (share written, stop
#: mode), for how long, and each writer's store retry window (writer 1's 0 s: six tries, about
#: 1.5 s, so it usually gives up during an outage and sends the vote again with its key)
PER_WRITER = 150
RESTARTS = ((0.25, "fast"), (0.6, "immediate"))
DOWN_S = 2.0
RETRY_WINDOWS_S = (10.0, 0.0)


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        yield server


@pytest.fixture()
def pg_url(pg) -> str:
    """A fresh database on the module's server, for one test."""
    return pg.create_database("t_" + uuid.uuid4().hex[:12])


def _schema_diff(store: VoteStore) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "compare_server_default": True})
        return compare_metadata(ctx, Base.metadata)


def test_migrations_make_a_fresh_database_and_are_idempotent(pg, pg_url):
    t0 = time.monotonic()
    store = VoteStore(pg_url)
    assert store.engine.dialect.name == "postgresql"
    assert store.revision() == head_revision() == "0002"
    assert {"comparisons", "votes", "alembic_version"} <= set(
        inspect(store.engine).get_table_names())
    assert _schema_diff(store) == []
    index = {i["name"]: i for i in inspect(store.engine).get_indexes("votes")}
    assert index["ix_votes_idempotency_key"]["unique"]
    cid = store.add_comparison("q", "i", 1, "base", "aligned", ["a"], ["b"])["id"]
    store.add_vote(cid, "left", idempotency_key="k")
    # reopening (another replica, a restart) migrates nothing and keeps the data
    again = VoteStore(pg_url.replace("postgresql+psycopg://", "postgresql://"))
    assert again.revision() == "0002" and again.counts()["votes"] == 1
    assert pg.query("SELECT version_num FROM alembic_version",
                    database=pg_url.rsplit("/", 1)[1]) == [("0002",)]
    # down to 0001 and up again on PostgreSQL too: the votes stay, the keys come back NULL
    cfg = alembic_config()
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert store.revision() == "0001"
    store.upgrade()
    assert store.revision() == "0002"
    assert [v["idempotency_key"] for v in store.votes()] == [None]
    again.close()
    store.close()
    assert time.monotonic() - t0 < 30


def _scenario(store: VoteStore, out: Path) -> dict:
    """Everything a replica and the export do, with the answers made comparable across back
    ends (random comparison ids replaced by their order of creation)."""
    cs = [store.add_comparison(q, "coco", len(left), "base", "aligned", left, right, client=cl)
          for q, left, right, cl in (
              ("red fox", ["a", "b", "c", "d"], ["e", "b", "f", "a"], "h1"),
              ("Blue  Sea", ["g", "h"], ["i", "j", "k"], None),
              ("no votes", ["x"], ["y"], "h2"))]
    names = {c["id"]: f"c{i}" for i, c in enumerate(cs)}
    votes = [store.add_vote(cs[0]["id"], "right", 5, "sharper", "r1", idempotency_key="v1"),
             store.add_vote(cs[0]["id"], "left", 2, "", idempotency_key="v2"),
             store.add_vote(cs[1]["id"], "left", 3, idempotency_key="v3"),
             store.add_vote(cs[1]["id"], "tie", 5, idempotency_key="v4"),
             store.add_vote(cs[1]["id"], "right", 1, "x" * 1000, idempotency_key="v5")]
    replay = store.record_vote(cs[0]["id"], "left", 2, None, idempotency_key="v2")
    errors = []
    for call in (lambda: store.add_vote("0" * 32, "left"),
                 lambda: store.add_vote(cs[0]["id"], "both"),
                 lambda: store.add_vote(cs[0]["id"], "left", 6),
                 lambda: store.add_vote(cs[0]["id"], "left", comment="x" * 1001),
                 lambda: store.add_vote(cs[0]["id"], "tie", idempotency_key="v1"),
                 lambda: store.add_vote(cs[0]["id"], "tie", idempotency_key="a key"),
                 lambda: store.add_comparison(" ", "i", 1, "base", "aligned", ["a"], ["b"]),
                 lambda: store.votes(limit=-1)):
        try:
            call()
            errors.append(None)
        except (KeyError, ValueError) as e:
            errors.append((type(e).__name__, str(e).split(":")[0][:40]))

    def plain(d: dict) -> dict:
        d = {k: None if v != v else v for k, v in d.items() if k != "created_at"}  # NaN
        for k in ("id", "comparison_id"):
            if isinstance(d.get(k), str) and d[k] in names:
                d[k] = names[d[k]]
        if "comparison" in d:
            d["comparison"] = plain(d["comparison"])
        return d

    counts = export_preferences(store, out)
    from aligner.data.preferences import read_preferences

    return {"comparisons": [plain(store.get_comparison(c["id"])) for c in cs],
            "votes": [plain(v) for v in votes], "replay": (plain(replay[0]), replay[1]),
            "listed": [plain(v) for v in store.votes()],
            "page": [plain(v) for v in store.votes(limit=2, offset=1)],
            "counts": store.counts(), "records": [plain(r) for r in store.vote_records(2)],
            "export": counts, "table": [plain(r) for r in read_preferences(out).to_pylist()],
            "errors": errors}


def test_the_store_answers_as_on_sqlite(pg_url, tmp_path):
    lite = VoteStore(sqlite_url(tmp_path / "votes.db"))
    post = VoteStore(pg_url)
    try:
        want, got = _scenario(lite, tmp_path / "lite"), _scenario(post, tmp_path / "pg")
    finally:
        lite.close()
        post.close()
    assert got == want
    assert want["counts"]["votes"] == 5 and want["replay"][1] is True
    assert want["errors"][0][0] == "KeyError" and None not in want["errors"]
    assert want["export"]["pairs"] == 6 and len(want["table"]) == 6


def test_the_same_key_from_many_threads_is_one_vote(pg_url):
    store = VoteStore(pg_url)
    cid = store.add_comparison("q", "i", 1, "base", "aligned", ["a"], ["b"])["id"]
    results = []

    def worker(i: int) -> None:
        for j in range(10):  # 10 keys, each sent by all 8 threads at once
            results.append(store.record_vote(cid, "tie", 2, idempotency_key=f"k{j}"))

    assert not run_together(8, worker)
    assert sum(not replayed for _, replayed in results) == 10 and len(results) == 80
    assert {v["idempotency_key"]: v["id"] for v, _ in results} == {
        v["idempotency_key"]: v["id"] for v in store.votes()}
    assert store.counts()["votes"] == 10
    with pytest.raises(IdempotencyKeyReused):
        store.add_vote(cid, "left", 2, idempotency_key="k0")
    store.close()


def test_a_commit_whose_answer_is_lost_is_not_written_twice(pg_url):
    """PostgreSQL commits, then the connection "dies" before the client hears it (the pool
    invalidates it): the retry finds the vote instead of writing a second one."""
    import psycopg
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    store = VoteStore(pg_url)
    cid = store.add_comparison("q", "i", 1, "base", "aligned", ["a"], ["b"])["id"]
    lost = []

    def lose_the_answer(session) -> None:
        if len(lost) < 2:
            lost.append(1)
            raise OperationalError("COMMIT", {}, psycopg.OperationalError(
                "server closed the connection unexpectedly"), connection_invalidated=True)

    event.listen(Session, "after_commit", lose_the_answer)
    try:
        vote, replayed = store.record_vote(cid, "right", idempotency_key="once")
        comparison = store.add_comparison("lost", "i", 1, "base", "aligned", ["a"], ["b"])
    finally:
        event.remove(Session, "after_commit", lose_the_answer)
    assert len(lost) == 2 and replayed and vote["idempotency_key"] == "once"
    assert store.counts() == {**store.counts(), "votes": 1, "comparisons": 2}
    assert store.get_comparison(comparison["id"]) == comparison
    store.close()


def _writer(url: str, n: int, who: int, comparisons: list[str], window_s: float, start,
            progress, out) -> None:
    """One Serve replica: its own store, ``n`` votes with keys of its own; a call that still
    fails after the store's retries is sent again with the same key, as a client would."""
    retries = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            retries.append(record.getMessage())

    logging.getLogger("serving.votes").addHandler(Count(logging.WARNING))
    store = VoteStore(url, retry_window_s=window_s)
    start.wait(60)
    resent, replayed, slowest = 0, 0, 0.0
    for i in range(n):
        key = str(uuid.uuid5(uuid.NAMESPACE_URL, f"writer-{who}/vote-{i}"))
        t0 = time.monotonic()
        while True:
            try:
                _, again = store.record_vote(comparisons[i % len(comparisons)],
                                             ("left", "right", "tie")[i % 3], 1 + i % 5,
                                             f"writer-{who}/vote-{i}", f"w{who}", key)
                break
            except Exception as e:
                if not store.is_transient(e) or time.monotonic() - t0 > 60:
                    raise
                resent += 1
                time.sleep(0.2)
        replayed += again
        slowest = max(slowest, time.monotonic() - t0)
        with progress.get_lock():
            progress.value += 1
    store.close()
    out.put({"who": who, "resent": resent, "replayed": replayed, "slowest_s": slowest,
             "store_retries": len(retries), "retry_samples": sorted(set(
                 r.split(";")[0][:90] for r in retries))[:4]})


def test_two_processes_lose_and_duplicate_no_vote_through_server_restarts(pg, pg_url):
    store = VoteStore(pg_url)  # migrated here; the writers open it as replicas would
    comparisons = [store.add_comparison(f"query {i}", "coco", 2, "base", "aligned",
                                        ["a", "b"], ["c", "d"])["id"] for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    start, progress, out = ctx.Barrier(3), ctx.Value("i", 0), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(pg_url, PER_WRITER, w, comparisons,
                                                RETRY_WINDOWS_S[w], start, progress, out))
             for w in range(2)]
    t_spawn = time.monotonic()
    for p in procs:
        p.start()
    start.wait(60)
    print(f"\nwriters ready after {time.monotonic() - t_spawn:.1f} s")
    t0, total, outages = time.monotonic(), 2 * PER_WRITER, []
    for share, mode in RESTARTS:
        while progress.value < share * total and time.monotonic() - t0 < 60:
            time.sleep(0.005)
        at = progress.value
        pg.restart(mode, down_s=DOWN_S)
        outages.append((mode, at, progress.value))
    stats = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
    elapsed = time.monotonic() - t0
    assert [p.exitcode for p in procs] == [0, 0]
    # the server was really restarted while both were writing
    assert all(0 < at < total for _, at, _ in outages), outages

    rows = pg.query("SELECT idempotency_key, comment, rater FROM votes ORDER BY id",
                    database=pg_url.rsplit("/", 1)[1])
    want = {str(uuid.uuid5(uuid.NAMESPACE_URL, f"writer-{w}/vote-{i}")): f"writer-{w}/vote-{i}"
            for w in range(2) for i in range(PER_WRITER)}
    assert len(rows) == total == store.counts()["votes"]
    assert {k: c for k, c, _ in rows} == want  # every vote once, each with its own key
    assert len({k for k, _, _ in rows}) == total
    retries = sum(s["store_retries"] for s in stats)
    print(f"\n{total} votes by 2 processes in {elapsed:.1f} s through restarts {outages} "
          f"(down {DOWN_S} s each): {len(rows)} rows, {len(rows) - len(want)} extra, "
          f"{len(set(want) - {k for k, _, _ in rows})} lost; store retries {retries}, "
          f"resent {sum(s['resent'] for s in stats)}, "
          f"replayed {sum(s['replayed'] for s in stats)}, "
          f"slowest vote {max(s['slowest_s'] for s in stats):.2f} s; {stats}")
    assert retries > 0  # the writers did meet the outages
    store.close()
