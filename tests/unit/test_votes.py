"""The votes database (serving/votes): migrations, the store, concurrent writers, the export."""

from __future__ import annotations

import ast
import json
import multiprocessing
import threading
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, inspect, text
from sqlalchemy.exc import IntegrityError

from aligner.data.preferences import read_preferences
from serving.votes import VoteStore, query_id_for, sqlite_url
from serving.votes.export import export_preferences, main, vote_pairs
from serving.votes.models import Base
from serving.votes.store import head_revision
from tests.helpers.threads import run_together

VOTES_PKG = Path(__file__).resolve().parents[2] / "serving" / "votes"


def _store(tmp_path: Path) -> VoteStore:
    return VoteStore(sqlite_url(tmp_path / "db" / "votes.db"))


def _comparison(store: VoteStore, query: str = "a red fox", left=("a", "b", "c"),
                right=("d", "b", "e"), **kw) -> dict:
    return store.add_comparison(query, "coco", len(left), "base", "aligned", list(left),
                                list(right), **kw)


def _schema_diff(store: VoteStore, metadata: MetaData) -> list:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "compare_server_default": True})
        return compare_metadata(ctx, metadata)


def test_fresh_database_is_migrated_to_head_and_matches_the_models(tmp_path):
    store = _store(tmp_path)  # the parent directory db/ does not exist yet
    try:
        assert (tmp_path / "db" / "votes.db").is_file()
        assert store.revision() == head_revision() == "0002"
        assert {"comparisons", "votes", "alembic_version"} <= set(
            inspect(store.engine).get_table_names())
        assert _schema_diff(store, Base.metadata) == []
        # the comparison does see differences: a column the migrations do not make
        changed = MetaData(naming_convention=Base.metadata.naming_convention)
        for t in Base.metadata.tables.values():
            t.to_metadata(changed)
        changed.tables["votes"].append_column(Column("extra", Integer))
        assert [d[0] for d in _schema_diff(store, changed)] == ["add_column"]
        with store.engine.connect() as conn:
            pragma = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                      for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")}
        assert pragma == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 10_000,
                          "foreign_keys": 1}
    finally:
        store.close()
    again = VoteStore(str(tmp_path / "db" / "votes.db"))  # a plain path; already at head
    assert again.revision() == "0002" and again.counts()["comparisons"] == 0
    again.close()


def test_database_constraints_hold_without_the_store(tmp_path):
    store = _store(tmp_path)
    cid = _comparison(store)["id"]
    insert = text("INSERT INTO votes (comparison_id, created_at, preferred, confidence) "
                  "VALUES (:c, :t, :p, :n)")
    now = "2025-01-01 00:00:00.000000"
    for c, p, n in [(cid, "both", 3), (cid, "left", 6), (cid, "left", 0), ("nope", "left", 3)]:
        with pytest.raises(IntegrityError), store.engine.begin() as conn:
            conn.execute(insert, {"c": c, "t": now, "p": p, "n": n})
    with store.engine.begin() as conn:  # confidence defaults to 3 in the schema too
        conn.execute(text("INSERT INTO votes (comparison_id, created_at, preferred) "
                          "VALUES (:c, :t, 'tie')"), {"c": cid, "t": now})
    assert store.votes()[0]["confidence"] == 3
    store.close()


def test_comparisons_and_votes_round_trip(tmp_path):
    store = _store(tmp_path)
    c = _comparison(store, "A red  Fox", client="h-123")
    assert len(c["id"]) == 32 and int(c["id"], 16) >= 0
    assert c["query_id"] == query_id_for(" a red fox ") == query_id_for("A RED\tFOX")
    assert c["query_id"].startswith("q-") and len(c["query_id"]) == 18
    assert c["query_id"] != query_id_for("a red dog")
    created = datetime.fromisoformat(c["created_at"])
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - created).total_seconds()) < 60
    assert store.get_comparison(c["id"]) == c
    assert store.get_comparison("f" * 32) is None
    assert (c["left_ids"], c["right_ids"], c["k"], c["client"]) == (
        ["a", "b", "c"], ["d", "b", "e"], 3, "h-123")

    other = _comparison(store, "a red fox")  # the same query: the same query_id
    assert other["query_id"] == c["query_id"] and other["id"] != c["id"]
    v1 = store.add_vote(c["id"], "right", confidence=5, comment="sharper", rater="r1")
    v2 = store.add_vote(c["id"], "left")
    v3 = store.add_vote(other["id"], "tie", comment="")
    assert (v1["preferred_model"], v2["preferred_model"], v3["preferred_model"]) == (
        "aligned", "base", "tie")
    assert (v2["confidence"], v2["comment"], v3["comment"]) == (3, None, None)
    listed = store.votes()
    assert [v["id"] for v in listed] == [v3["id"], v2["id"], v1["id"]]  # newest first
    assert listed[2] == v1 and listed[2]["query"] == "A red  Fox"
    assert listed[2]["left_model"] == "base" and listed[2]["rater"] == "r1"
    assert [v["id"] for v in store.votes(limit=1, offset=1)] == [v2["id"]]
    assert store.counts() == {"comparisons": 2, "votes": 3,
                              "by_preferred": {"left": 1, "right": 1, "tie": 1},
                              "by_model": {"base": 1, "aligned": 1, "tie": 1}}
    json.dumps(listed)  # JSON-ready
    store.close()


def test_bad_input_raises_the_documented_errors(tmp_path):
    store = _store(tmp_path)
    cid = _comparison(store)["id"]
    with pytest.raises(KeyError, match="no comparison"):
        store.add_vote("0" * 32, "left")
    for bad in ("LEFT", "both", "", None):
        with pytest.raises(ValueError, match="preferred must be one of"):
            store.add_vote(cid, bad)
    for bad in (0, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match="confidence must be an integer from 1 to 5"):
            store.add_vote(cid, "left", confidence=bad)
    with pytest.raises(ValueError, match="1001 characters long; at most 1000"):
        store.add_vote(cid, "left", comment="x" * 1001)
    for kw in ({"query": " "}, {"k": 0}, {"left_ids": "abc"}, {"right_ids": ["a", ""]},
               {"left_model": ""}):
        args = {"query": "q", "index": "i", "k": 2, "left_model": "base",
                "right_model": "aligned", "left_ids": ["a"], "right_ids": ["b"], **kw}
        with pytest.raises(ValueError):
            store.add_comparison(**args)
    with pytest.raises(ValueError, match="limit"):
        store.votes(limit=-1)
    assert store.counts()["votes"] == 0 and store.counts()["comparisons"] == 1
    assert store.add_vote(cid, "left", comment="x" * 1000)["comment"] == "x" * 1000
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.counts()


def test_votes_survive_a_restart(tmp_path):
    store = _store(tmp_path)
    cid = _comparison(store)["id"]
    ids = [store.add_vote(cid, p)["id"] for p in ("left", "right", "tie")]
    store.close()
    reopened = _store(tmp_path)
    assert sorted(v["id"] for v in reopened.votes()) == ids
    assert reopened.get_comparison(cid)["left_ids"] == ["a", "b", "c"]
    assert reopened.add_vote(cid, "left")["id"] == ids[-1] + 1
    reopened.close()


def test_threads_lose_no_vote(tmp_path):
    store = _store(tmp_path)
    cid = _comparison(store)["id"]

    def worker(i: int) -> None:
        for j in range(25):
            store.add_vote(cid, ("left", "right", "tie")[j % 3], rater=f"t{i}")

    assert not run_together(8, worker)
    assert store.counts()["votes"] == 200
    assert len({v["id"] for v in store.votes(limit=1000)}) == 200
    store.close()


def _process_worker(url: str, n: int, start) -> None:
    """One Serve replica: opens (and migrates) its own store, then writes n votes."""
    start.wait(60)
    store = VoteStore(url)
    cid = store.add_comparison(f"query {n}", "coco", 2, "base", "aligned", ["a", "b"],
                               ["c", "d"])["id"]
    for j in range(n):
        store.add_vote(cid, "left" if j % 2 else "right", confidence=1 + j % 5)
    store.close()


def test_processes_lose_no_vote_and_migrate_a_fresh_file_once(tmp_path):
    url = sqlite_url(tmp_path / "db" / "votes.db")  # nobody has opened it yet
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_process_worker, args=(url, 30, start)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store = VoteStore(url)
    assert store.revision() == "0002"
    assert store.counts()["comparisons"] == 3 and store.counts()["votes"] == 90
    per = {}
    for v in store.votes(limit=1000):
        per[v["comparison_id"]] = per.get(v["comparison_id"], 0) + 1
    assert sorted(per.values()) == [30, 30, 30]
    store.close()


def test_in_memory_store_works_across_threads():
    store = VoteStore("sqlite://")
    cid = _comparison(store)["id"]
    threads = [threading.Thread(target=lambda: [store.add_vote(cid, "tie") for _ in range(10)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert store.counts()["votes"] == 40
    store.close()


def test_vote_pairs_rules():
    pairs, skipped = vote_pairs(["a", "b", "c", "d"], ["e", "b", "f", "a"], "right")
    assert pairs == [("f", "c")]
    assert skipped == {"same_id": 1, "shared_id": 2, "unpaired": 0}
    assert vote_pairs(["g", "h"], ["i", "j", "k"], "left") == (
        [("g", "i"), ("h", "j")], {"same_id": 0, "shared_id": 0, "unpaired": 1})
    assert vote_pairs(["g"], ["i"], "tie")[0] == []


def test_export_by_hand(tmp_path):
    store = _store(tmp_path)
    c1 = _comparison(store, "red fox", ["a", "b", "c", "d"], ["e", "b", "f", "a"])
    c2 = _comparison(store, "Blue Sea", ["g", "h"], ["i", "j", "k"])
    _comparison(store, "no votes", ["x"], ["y"])
    store.add_vote(c1["id"], "right", confidence=5)   # (f, c) 1.0; a shared, b the same
    store.add_vote(c1["id"], "left", confidence=2)    # (c, f) 0.4: every vote counts
    store.add_vote(c2["id"], "left", confidence=3)    # (g, i), (h, j) 0.6; k unpaired
    store.add_vote(c2["id"], "tie", confidence=5)     # nothing (and no skips)
    store.add_vote(c2["id"], "right", confidence=1)   # (i, g), (j, h) 0.2

    out = tmp_path / "prefs"
    counts = export_preferences(store, out)
    assert counts == {"comparisons": 3, "comparisons_voted": 2, "votes": 5,
                      "votes_below_min_confidence": 0, "tie_votes": 1, "pairs": 6, "queries": 2,
                      "skipped": {"same_id": 2, "shared_id": 4, "unpaired": 2}}
    table = read_preferences(out)
    rows = [(r["query_id"], r["query"], r["chosen_id"], r["rejected_id"], r["source"],
             round(r["weight"], 6)) for r in table.to_pylist()]
    q1, q2 = query_id_for("red fox"), query_id_for("blue sea")
    assert rows == [(q1, "red fox", "f", "c", "human", 1.0), (q1, "red fox", "c", "f", "human", 0.4),
                    (q2, "Blue Sea", "g", "i", "human", 0.6), (q2, "Blue Sea", "h", "j", "human", 0.6),
                    (q2, "Blue Sea", "i", "g", "human", 0.2), (q2, "Blue Sea", "j", "h", "human", 0.2)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"] == "export_votes" and manifest["counts"] == counts
    assert manifest["config"] == {"min_confidence": 1}

    # min_confidence leaves out low-confidence votes; a URL opens (and closes) its own store
    high = export_preferences(sqlite_url(tmp_path / "db" / "votes.db"), tmp_path / "high", 3)
    assert (high["votes"], high["votes_below_min_confidence"], high["pairs"]) == (3, 2, 3)
    assert read_preferences(tmp_path / "high").num_rows == 3

    # the preference builder takes it as an extra table (a test query's votes are dropped)
    from aligner.preferences.build import load_extra

    queries = pa.table({"query_id": [q1, q2], "split": ["train", "test"]})
    extra, extra_counts = load_extra([str(out)], queries, ["train"])
    assert extra.num_rows == 2 and extra_counts[str(out)]["dropped_other_split"] == 4
    with pytest.raises(ValueError, match="min_confidence"):
        export_preferences(store, out, 0)
    store.close()


def test_export_of_an_empty_database_and_the_command_line(tmp_path, monkeypatch):
    url = sqlite_url(tmp_path / "votes.db")
    monkeypatch.delenv("VOTES_DB_URL", raising=False)
    assert main([f"output={tmp_path / 'x'}"]) == 2  # no database given
    assert main([f"database={tmp_path / 'missing.db'}", f"output={tmp_path / 'x'}"]) == 2
    monkeypatch.setenv("VOTES_DB_URL", url)
    assert main([f"output={tmp_path / 'out'}"]) == 0
    assert read_preferences(tmp_path / "out").num_rows == 0


def test_votes_package_imports_no_ray_or_fastapi():
    banned = {"ray", "fastapi", "starlette"}
    for path in VOTES_PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & banned, path


# ----------------------------------------------------------------------------- idempotency


def test_a_retried_vote_with_its_key_is_recorded_once(tmp_path):
    from serving.votes import IdempotencyKeyReused

    store = _store(tmp_path)
    cid = _comparison(store)["id"]
    first, replayed = store.record_vote(cid, "right", 4, "crisp", rater="r1",
                                        idempotency_key="k-1")
    assert not replayed and first["idempotency_key"] == "k-1"
    again, replayed = store.record_vote(cid, "right", 4, "crisp", rater="another-connection",
                                        idempotency_key="k-1")
    assert replayed and again == first  # the stored vote, its rater included
    assert store.add_vote(cid, "right", 4, "crisp", idempotency_key="k-1") == first
    for other in ({"preferred": "left"}, {"confidence": 5}, {"comment": None},
                  {"comparison_id": _comparison(store)["id"]}):
        args = {"comparison_id": cid, "preferred": "right", "confidence": 4,
                "comment": "crisp", **other}
        with pytest.raises(IdempotencyKeyReused, match="k-1"):
            store.add_vote(**args, idempotency_key="k-1")
    for bad in ("", "a b", "x" * 65, "é", 7):
        with pytest.raises(ValueError, match="idempotency key"):
            store.add_vote(cid, "left", idempotency_key=bad)
    drawn = store.add_vote(cid, "left")  # no key given: the store draws one
    assert len(drawn["idempotency_key"]) == 32 and drawn["idempotency_key"] != "k-1"
    assert store.counts()["votes"] == 2
    assert [v["idempotency_key"] for v in store.votes()] == [drawn["idempotency_key"], "k-1"]
    store.close()


def test_threads_sending_the_same_key_make_one_vote(tmp_path):
    store = _store(tmp_path)
    cid = _comparison(store)["id"]
    start, results = threading.Barrier(8), []

    def worker() -> None:
        start.wait()
        results.append(store.record_vote(cid, "tie", idempotency_key="same"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r[1] for r in results) == [False] + [True] * 7
    assert {r[0]["id"] for r in results} == {1} and store.counts()["votes"] == 1
    store.close()


def test_a_commit_whose_answer_is_lost_is_not_written_twice(tmp_path):
    """The database commits, then the call fails as if the connection died: the store's retry
    finds the row its key made instead of writing a second one."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    store = _store(tmp_path)
    cid = _comparison(store)["id"]
    lost = []

    def lose_the_answer(session) -> None:
        if not lost:
            lost.append(1)
            raise OperationalError("COMMIT", {}, Exception("database is locked"))

    event.listen(Session, "after_commit", lose_the_answer)
    try:
        vote, replayed = store.record_vote(cid, "left", idempotency_key="once")
        comparison = _comparison(store, "lost answer")  # its id is drawn before the first try
    finally:
        event.remove(Session, "after_commit", lose_the_answer)
    assert lost and replayed and vote["idempotency_key"] == "once"
    assert store.counts()["votes"] == 1 and store.counts()["comparisons"] == 2
    assert store.get_comparison(comparison["id"]) == comparison
    store.close()


def test_a_0001_database_is_upgraded_and_keeps_its_votes(tmp_path):
    store = VoteStore(sqlite_url(tmp_path / "old.db"), upgrade=False)
    store.upgrade("0001")
    assert store.revision() == "0001"
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO comparisons (id, created_at, query, query_id, \"index\", "
                          "k, left_model, right_model, left_ids, right_ids) VALUES ('c1', "
                          "'2025-01-01 00:00:00', 'q', 'q-1', 'i', 1, 'base', 'aligned', "
                          "'[\"a\"]', '[\"b\"]')"))
        conn.execute(text("INSERT INTO votes (comparison_id, created_at, preferred) "
                          "VALUES ('c1', '2025-01-01 00:00:00', 'left')"))
    store.close()
    store = VoteStore(sqlite_url(tmp_path / "old.db"))
    assert store.revision() == head_revision() == "0002"
    assert [(v["id"], v["idempotency_key"]) for v in store.votes()] == [(1, None)]
    assert store.add_vote("c1", "right", idempotency_key="new")["id"] == 2
    assert _schema_diff(store, Base.metadata) == []
    from alembic import command

    from serving.votes.store import alembic_config

    cfg = alembic_config()
    with store.engine.begin() as conn:  # and back: the keys go, the votes stay
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert store.revision() == "0001"
    assert "idempotency_key" not in {c["name"] for c in inspect(store.engine).get_columns("votes")}
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM votes")).scalar() == 2
    store.close()


def test_postgres_urls_mean_psycopg_and_transient_errors_are_told_apart():
    from sqlalchemy.exc import IntegrityError as SAIntegrityError
    from sqlalchemy.exc import OperationalError

    from serving.votes.store import is_transient, votes_url

    assert votes_url("postgresql://u:p@db:5432/votes").drivername == "postgresql+psycopg"
    assert votes_url("postgres://u@db/votes").drivername == "postgresql+psycopg"
    assert votes_url("postgresql+psycopg://u@db/votes").drivername == "postgresql+psycopg"
    assert votes_url("votes.db").drivername == "sqlite"
    assert votes_url("votes.db").database == str(Path("votes.db").resolve())

    def op(orig) -> OperationalError:
        return OperationalError("SELECT 1", {}, orig)

    assert is_transient(op(Exception("database is locked")), "sqlite")
    assert not is_transient(op(Exception("no such table: votes")), "sqlite")
    errors = pytest.importorskip("psycopg").errors
    import psycopg

    assert is_transient(op(psycopg.OperationalError("connection refused")), "postgresql")
    assert is_transient(op(psycopg.InterfaceError("the connection is closed")), "postgresql")
    for cls in (errors.SerializationFailure, errors.DeadlockDetected, errors.AdminShutdown,
                errors.CannotConnectNow, errors.ConnectionFailure):
        assert is_transient(op(cls("x")), "postgresql"), cls
    assert not is_transient(SAIntegrityError("INSERT", {}, errors.UniqueViolation("x")),
                            "postgresql")
    assert not is_transient(op(errors.UndefinedTable("x")), "postgresql")
    assert not is_transient(ValueError("x"), "postgresql")
    dropped = OperationalError("SELECT 1", {}, errors.UndefinedTable("x"),
                               connection_invalidated=True)
    assert is_transient(dropped, "postgresql")  # the pool saw the connection die


def test_the_database_url_can_come_from_an_environment_variable(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from serving.config import AppArgs

    base = {"corpus": "c", "models": {m: {"indexes": {"i": "x"}} for m in ("base", "aligned")},
            "data_dir": str(tmp_path)}
    assert AppArgs(**base).database_url() == f"sqlite:///{tmp_path / 'votes.db'}"
    literal = {"database_url": "postgresql+psycopg://u@db/votes"}
    assert AppArgs(**base, votes=literal).database_url() == literal["database_url"]
    env = {**literal, "database_url_env": "VOTES_DATABASE_URL"}
    monkeypatch.delenv("VOTES_DATABASE_URL", raising=False)
    with pytest.raises(ValueError, match=r"\$VOTES_DATABASE_URL, which is unset"):
        AppArgs(**base, votes=env).database_url()  # never a silent fall-back
    monkeypatch.setenv("VOTES_DATABASE_URL", " postgresql+psycopg://votes:pw@pg:5432/votes\n")
    assert AppArgs(**base, votes=env).database_url() == \
        "postgresql+psycopg://votes:pw@pg:5432/votes"
    for bad in ("VOTES-URL", "1ABC", "$VOTES"):
        with pytest.raises(ValidationError, match="database_url_env"):
            AppArgs(**base, votes={"database_url_env": bad})
