"""The votes database: :class:`VoteStore` records comparisons and votes through SQLAlchemy.

    store = VoteStore("sqlite:////abs/path/votes.db")    # migrated to head on open
    c = store.add_comparison("a red fox", "coco", 8, "base", "aligned", left_ids, right_ids)
    store.add_vote(c["id"], "right", confidence=4)
    store.counts()    # {"comparisons": 1, "votes": 1, "by_preferred": {...}, "by_model": {...}}

Two back ends are supported and tested: SQLite (``sqlite:////abs/votes.db``, one machine) and
PostgreSQL through psycopg 3 (``postgresql+psycopg://user:password@host:5432/votes``; a bare
``postgresql://`` or ``postgres://`` URL is read as psycopg too). The schema is made and kept
current only by the Alembic migrations in ``migrations/`` (:func:`migrate`, which the store
runs when it opens), so a fresh and an existing database both end at head.

SQLite is set up for several writers (Serve replicas are separate processes, each with a
thread pool): WAL journal, ``synchronous=NORMAL``, a busy timeout, foreign keys on, and write
transactions that take the write lock at ``BEGIN IMMEDIATE`` (a deferred transaction that
reads first and then writes can fail with "database is locked" at once, whatever the
timeout). On top of that, every operation is retried a few times with backoff when the
database still reports itself locked or busy, so no vote is lost under contention.

PostgreSQL needs none of that (row locks, READ COMMITTED); there the store retries what a
server restart or fail-over and concurrency throw (:func:`is_transient`): a connection lost or
refused, the server shutting down or starting up, a serialization failure or deadlock. It
retries with backoff until :data:`RETRY_WINDOW_S` has passed (a restart takes seconds), and
its pool pings a connection before lending it (``pool_pre_ping``), so dead pooled connections
are replaced instead of failing a request.

A retried write must not write twice when its first try's outcome is unknown (the connection
died during ``COMMIT``: committed or not?). So every write is keyed: a comparison's id is drawn
before the first try, and a vote carries an ``idempotency_key`` (the client's, e.g. an HTTP
``Idempotency-Key`` header, or one drawn per call) in a unique column. A try first looks for
the row its key made; a concurrent try with the same key loses on the unique index and then
finds the winner's row. Either way one row per key, and the caller gets that row back
(``replayed`` says it existed already). A key reused for a different vote is a ``ValueError``
(:class:`IdempotencyKeyReused`).

A :class:`VoteStore` is thread-safe (one engine and connection pool; every call opens its own
session) but belongs to one process: open one per process (per Serve replica), not before a
fork. Its methods are synchronous and return plain JSON-ready dicts (timestamps as ISO 8601
UTC strings).
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Engine, create_engine, event, func, make_url, select
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from serving.votes.models import (
    MAX_COMMENT_CHARS,
    MAX_CONFIDENCE,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MIN_CONFIDENCE,
    PREFERRED,
    Comparison,
    Vote,
    new_id,
    query_id_for,
    utcnow,
)

log = logging.getLogger("serving.votes")
T = TypeVar("T")

#: the Alembic environment (env.py, versions/) of the votes database
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: SQLite's busy timeout: how long a connection waits for another's write lock
BUSY_TIMEOUT_S = 10.0
#: tries of one operation while the database reports itself locked, and the first backoff
RETRY_ATTEMPTS = 6
RETRY_BACKOFF_S = 0.05
#: a server database (PostgreSQL): transient errors are retried for at least this long
RETRY_WINDOW_S = 20.0
#: the longest pause between two tries (SQLite; a server database: 1 s)
RETRY_MAX_SLEEP_S = 2.0
#: a server database: seconds to wait for a connection to open (libpq waits forever by default)
CONNECT_TIMEOUT_S = 10
#: PostgreSQL SQLSTATEs worth another try, besides class 08 (connection exception):
#: serialization failure, deadlock, admin / crash shutdown, cannot connect now (starting up),
#: too many connections
PG_RETRY_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03", "53300"})
#: what an idempotency key may hold: 1 to 64 visible ASCII characters (a uuid4 fits)
IDEMPOTENCY_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_CHARS}}}")
#: the most rows :meth:`VoteStore.votes` returns at once
MAX_LIST_LIMIT = 10_000
#: execution option read by the SQLite ``begin`` hook: ``"IMMEDIATE"`` takes the write lock
_BEGIN_OPTION = "votes_sqlite_begin"
_MIGRATE_LOCK = threading.Lock()  # alembic's ``context`` proxy is process-global


class IdempotencyKeyReused(ValueError):
    """An idempotency key that already made a different vote (another comparison, choice,
    confidence or comment)."""


def sqlite_url(path: str | Path) -> str:
    """The SQLAlchemy URL of an SQLite file (made absolute, so any working directory works)."""
    return "sqlite:///" + str(Path(path).expanduser().resolve())


def votes_url(url: str | URL | Path) -> URL:
    """The URL the store opens: a path (no ``://``) is an SQLite file; ``postgresql://`` and
    ``postgres://`` mean psycopg 3, the PostgreSQL driver this project installs (SQLAlchemy's
    default for them is psycopg2)."""
    if isinstance(url, Path) or (isinstance(url, str) and "://" not in url):
        url = sqlite_url(url)
    out = make_url(url)
    if out.drivername in ("postgresql", "postgres"):
        out = out.set(drivername="postgresql+psycopg")
    return out


def is_transient(exc: BaseException, backend: str) -> bool:
    """Whether a failed database call is worth another try.

    SQLite: "database is locked" / busy. A server database (PostgreSQL): the pool found the
    connection dead (``connection_invalidated``), a connection-level error without a SQLSTATE
    (refused, reset, closed), class 08, or one of :data:`PG_RETRY_SQLSTATES`. Constraint
    violations, bad SQL and the like are not.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if backend == "sqlite":
        return isinstance(exc, OperationalError) and _locked_message(str(exc.orig))
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if code:
        return code.startswith("08") or code in PG_RETRY_SQLSTATES
    return isinstance(exc, OperationalError | InterfaceError)


def _is_memory(url: URL) -> bool:
    db = url.database or ""
    return db in ("", ":memory:") or (db.startswith("file:") and "mode=memory" in db)


def create_vote_engine(url: str | URL, busy_timeout_s: float = BUSY_TIMEOUT_S,
                       echo: bool = False) -> Engine:
    """An engine for the votes database; SQLite gets its multi-writer set-up.

    SQLite files: the parent directory is created; every connection sets WAL,
    ``synchronous=NORMAL``, ``busy_timeout`` and ``foreign_keys=ON``, and its transactions
    begin explicitly (``BEGIN``, or ``BEGIN IMMEDIATE`` on :func:`write_engine`). In-memory
    SQLite (tests) shares one connection across threads. Other back ends get a pool that pings
    a connection before lending it (dead ones, e.g. after a server restart, are replaced);
    PostgreSQL connections also get a connect timeout and an ``application_name`` naming this
    host and process (``pg_stat_activity`` shows which replica holds which), unless the URL's
    query sets them.
    """
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        args: dict[str, Any] = {}
        if url.get_backend_name() == "postgresql":  # unless the URL says otherwise
            args = {"connect_timeout": CONNECT_TIMEOUT_S,  # who holds which connection:
                    "application_name": f"votes-{socket.gethostname()}-{os.getpid()}"[:63]}
            args = {k: v for k, v in args.items() if k not in url.query}
        return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=args)
    memory = _is_memory(url)
    kw: dict[str, Any] = {"connect_args": {"timeout": busy_timeout_s,
                                           "check_same_thread": False}}
    if memory:
        kw["poolclass"] = StaticPool
    elif not (url.database or "").startswith("file:"):
        Path(url.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, **kw)
    timeout_ms = int(busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's begin hook below emits BEGIN itself
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            if not memory:
                _set_wal(cur)
                cur.execute("PRAGMA synchronous = NORMAL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _set_wal(cur: sqlite3.Cursor) -> None:
    """Switch the file to WAL (persistent; a no-op when it already is), retrying while locked."""
    for attempt in range(RETRY_ATTEMPTS):
        try:
            mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("SQLite journal_mode is %s, not wal", mode)
            return
        except sqlite3.OperationalError as e:
            if not _locked_message(str(e)) or attempt == RETRY_ATTEMPTS - 1:
                raise
            _sleep(attempt)


def write_engine(engine: Engine) -> Engine:
    """The same engine (and pool) whose transactions take SQLite's write lock at ``BEGIN``
    (``BEGIN IMMEDIATE``), so a transaction that reads, then writes never fails half-way;
    other backends ignore the option."""
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic config for the votes migrations, made in code (no ``alembic.ini``).

    Args:
        url: the database, for Alembic commands run without a connection (``command.current``,
            offline ``--sql``); :func:`migrate` passes its connection instead.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if url is not None:
        rendered = make_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision of the votes migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision a database is at (None: not migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, revision: str = "head") -> None:
    """``alembic upgrade <revision>`` on the engine's database, in one write-locked transaction
    (several processes opening a fresh database migrate it once, one after the other)."""
    cfg = alembic_config()
    with _MIGRATE_LOCK, write_engine(engine).connect() as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _locked_message(msg: str) -> bool:
    msg = msg.lower()
    return "database is locked" in msg or "database table is locked" in msg or "busy" in msg


def _sleep(attempt: int, cap_s: float = RETRY_MAX_SLEEP_S) -> None:
    time.sleep(min(cap_s, RETRY_BACKOFF_S * 2 ** attempt) * (0.5 + random.random()))


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _check_text(name: str, value: Any, max_len: int, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise ValueError(f"{name} is {len(value)} characters long; at most {max_len} allowed")
    return value


def _check_ids(name: str, ids: Any) -> list[str]:
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be a list of image ids, got {type(ids).__name__}")
    out = []
    for i in ids:
        if not isinstance(i, str | int) or isinstance(i, bool) or str(i) == "":
            raise ValueError(f"{name} holds {i!r}: image ids are non-empty strings")
        out.append(str(i))
    return out


def check_idempotency_key(key: Any) -> str:
    """The key if it is 1 to 64 visible ASCII characters, else ``ValueError``."""
    if not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key):
        raise ValueError(f"an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII "
                         f"characters (a uuid4 will do), got {str(key)[:80]!r}")
    return key


def check_vote(preferred: Any, confidence: Any, comment: Any) -> None:
    """Raise ``ValueError`` (saying what is allowed) for a vote the store would refuse."""
    if preferred not in PREFERRED:
        raise ValueError(f"preferred must be one of {list(PREFERRED)}, got {preferred!r}")
    if (not isinstance(confidence, int) or isinstance(confidence, bool)
            or not MIN_CONFIDENCE <= confidence <= MAX_CONFIDENCE):
        raise ValueError(f"confidence must be an integer from {MIN_CONFIDENCE} to "
                         f"{MAX_CONFIDENCE}, got {confidence!r}")
    if comment is not None:
        if not isinstance(comment, str):
            raise ValueError(f"comment must be a string or None, got {type(comment).__name__}")
        if len(comment) > MAX_COMMENT_CHARS:
            raise ValueError(f"comment is {len(comment)} characters long; at most "
                             f"{MAX_COMMENT_CHARS} allowed")


def comparison_dict(c: Comparison) -> dict[str, Any]:
    """A comparison as a JSON-ready dict."""
    return {"id": c.id, "created_at": _iso(c.created_at), "query": c.query,
            "query_id": c.query_id, "index": c.index, "k": c.k, "left_model": c.left_model,
            "right_model": c.right_model, "left_ids": list(c.left_ids),
            "right_ids": list(c.right_ids), "client": c.client}


def preferred_model(preferred: str, left_model: str, right_model: str) -> str:
    """The model whose row won (``"tie"`` for a tie)."""
    return {"left": left_model, "right": right_model}.get(preferred, "tie")


def vote_dict(v: Vote, c: Comparison) -> dict[str, Any]:
    """A vote with its comparison's query and models, as a JSON-ready dict."""
    return {"id": v.id, "comparison_id": v.comparison_id, "created_at": _iso(v.created_at),
            "preferred": v.preferred,
            "preferred_model": preferred_model(v.preferred, c.left_model, c.right_model),
            "confidence": v.confidence, "comment": v.comment, "rater": v.rater,
            "idempotency_key": v.idempotency_key, "query": c.query, "query_id": c.query_id,
            "index": c.index, "left_model": c.left_model, "right_model": c.right_model}


class VoteStore:
    """Comparisons and votes in a database, migrated to head when opened.

    Thread-safe; one per process. See the module docstring for SQLite's set-up.

    Args:
        url: an SQLAlchemy URL (``sqlite:////abs/votes.db``, ``postgresql+psycopg://...``);
            a string without ``://`` is taken as an SQLite file path (:func:`votes_url`).
        busy_timeout_s: SQLite's wait for another connection's write lock.
        upgrade: run the migrations to head on open (False: use the schema as it is).
        echo: log every SQL statement.
        retry_window_s: a server database: how long transient errors are retried (at least
            :data:`RETRY_ATTEMPTS` tries); SQLite's locked errors get :data:`RETRY_ATTEMPTS`.
    """

    def __init__(self, url: str | URL | Path, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 upgrade: bool = True, echo: bool = False,
                 retry_window_s: float = RETRY_WINDOW_S) -> None:
        self.url = votes_url(url)
        self._backend = self.url.get_backend_name()
        self._retry_window_s = 0.0 if self._backend == "sqlite" else retry_window_s
        self._max_sleep_s = RETRY_MAX_SLEEP_S if self._backend == "sqlite" else 1.0
        self._engine = create_vote_engine(self.url, busy_timeout_s, echo)
        self._writer = write_engine(self._engine)
        # an in-memory SQLite database is one shared connection: one call at a time
        self._serial: AbstractContextManager[Any] = (
            threading.RLock() if self.url.get_backend_name() == "sqlite"
            and _is_memory(self.url) else nullcontext())
        self._closed = False
        if upgrade:
            self.upgrade()

    def __repr__(self) -> str:
        return f"VoteStore({self.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> VoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for inspection and tests)."""
        return self._engine

    def upgrade(self, revision: str = "head") -> None:
        """Run the migrations up to ``revision`` (retried while the database is locked)."""
        self._retry(lambda: migrate(self._engine, revision), "migrate")

    def is_transient(self, exc: BaseException) -> bool:
        """Whether an error this store raised is worth another try later (:func:`is_transient`
        for its back end): what the store still raised after its own retries, e.g. a database
        down for longer than the retry window."""
        return is_transient(exc, self._backend)

    def revision(self) -> str | None:
        """The migration revision the database is at."""
        return self._retry(lambda: current_revision(self._engine), "revision")

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, again with backoff after a transient error (:func:`is_transient`): up to
        :data:`RETRY_ATTEMPTS` tries, and on a server database for at least the retry window.
        ``fn`` must be safe to run again after a failure whose outcome is unknown (the
        writes are keyed; see the module docstring)."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        deadline = time.monotonic() + self._retry_window_s
        attempt = 0
        while True:
            try:
                with self._serial:
                    return fn()
            except DBAPIError as e:
                attempt += 1
                if not is_transient(e, self._backend) or (
                        attempt >= RETRY_ATTEMPTS and time.monotonic() >= deadline):
                    raise
                why = (str(e.orig).strip() or type(e.orig).__name__).splitlines()[0]
                if self._retry_window_s:
                    log.warning("votes %s: %s; retry %d (%.1f s of the retry window left)",
                                what, why, attempt, max(0.0, deadline - time.monotonic()))
                else:
                    log.warning("votes %s: %s; retry %d/%d", what, why, attempt,
                                RETRY_ATTEMPTS - 1)
                _sleep(attempt - 1, self._max_sleep_s)

    def add_comparison(self, query: str, index: str, k: int, left_model: str, right_model: str,
                       left_ids: Sequence[str], right_ids: Sequence[str],
                       client: str | None = None) -> dict[str, Any]:
        """Record two result rows shown for one query; returns the comparison as a dict
        (``id``, ``query_id``, ``created_at`` and every field given).

        Raises:
            ValueError: an empty query or model name, a ``k`` below 1, ids that are not a
                list of non-empty strings.
        """
        _check_text("query", query, 10_000)
        _check_text("index", index, 200, required=False)
        _check_text("left_model", left_model, 100)
        _check_text("right_model", right_model, 100)
        _check_text("client", client, 200, required=False)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        row = {"id": new_id(), "query": query, "query_id": query_id_for(query),
               "index": index or "", "k": k,
               "left_model": left_model, "right_model": right_model,
               "left_ids": _check_ids("left_ids", left_ids),
               "right_ids": _check_ids("right_ids", right_ids), "client": client}

        def write() -> dict[str, Any]:
            with Session(self._writer, expire_on_commit=False) as s, s.begin():
                done = s.get(Comparison, row["id"])  # an earlier try committed after all
                if done is not None:
                    return comparison_dict(done)
                c = Comparison(**row, created_at=utcnow())
                s.add(c)
                s.flush()
                return comparison_dict(c)

        return self._retry(write, "add_comparison")

    def get_comparison(self, comparison_id: str) -> dict[str, Any] | None:
        """The comparison as a dict, or None if there is none with that id."""
        def read() -> dict[str, Any] | None:
            with Session(self._engine) as s:
                c = s.get(Comparison, comparison_id)
                return comparison_dict(c) if c is not None else None

        return self._retry(read, "get_comparison")

    def add_vote(self, comparison_id: str, preferred: str, confidence: int = 3,
                 comment: str | None = None, rater: str | None = None,
                 idempotency_key: str | None = None) -> dict[str, Any]:
        """Record one person's preference; returns the vote as a dict (with ``id``,
        ``created_at``, ``preferred_model``, ``idempotency_key`` and the comparison's query and
        models). :meth:`record_vote` also says whether the key had already made it.

        Args:
            comparison_id: the comparison's id.
            preferred: ``"left"``, ``"right"`` or ``"tie"``.
            confidence: 1 (a guess) to 5 (sure).
            comment: free text, at most 1000 characters ('' is stored as None).
            rater: who voted (e.g. a hashed session id), optional.
            idempotency_key: the request's key (1 to 64 visible ASCII characters; a uuid4):
                the same key again returns the vote it made instead of adding one. None: a
                new key, so that the store's own retries cannot duplicate the vote.

        Raises:
            KeyError: no comparison with that id.
            ValueError: a bad ``preferred``, a confidence outside 1..5, a comment too long, a
                malformed key, or (:class:`IdempotencyKeyReused`) a key that made another vote.
        """
        return self.record_vote(comparison_id, preferred, confidence, comment, rater,
                                idempotency_key)[0]

    def record_vote(self, comparison_id: str, preferred: str, confidence: int = 3,
                    comment: str | None = None, rater: str | None = None,
                    idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """:meth:`add_vote`, returning ``(vote, replayed)``: ``replayed`` is True when the key
        had already made this vote (a retry), which is then returned as it was stored (its
        ``rater`` and ``created_at`` too). Same arguments and errors as :meth:`add_vote`."""
        check_vote(preferred, confidence, comment)
        _check_text("rater", rater, 200, required=False)
        key = new_id() if idempotency_key is None else check_idempotency_key(idempotency_key)
        comment = comment or None
        want = {"comparison_id": comparison_id, "preferred": preferred,
                "confidence": confidence, "comment": comment}

        def made(s: Session) -> dict[str, Any] | None:
            """The vote this key made, if any (the same vote, or IdempotencyKeyReused)."""
            row = s.execute(select(Vote, Comparison)
                            .join(Comparison, Vote.comparison_id == Comparison.id)
                            .where(Vote.idempotency_key == key)).first()
            if row is None:
                return None
            v, c = row
            got = {"comparison_id": v.comparison_id, "preferred": v.preferred,
                   "confidence": v.confidence, "comment": v.comment}
            if got != want:
                raise IdempotencyKeyReused(
                    f"idempotency key {key!r} already recorded another vote (vote {v.id}, "
                    f"comparison {v.comparison_id}, {v.preferred}, confidence {v.confidence}); "
                    "a new vote needs a new key")
            return vote_dict(v, c)

        def write() -> tuple[dict[str, Any], bool]:
            try:
                with Session(self._writer, expire_on_commit=False) as s, s.begin():
                    done = made(s)  # an earlier try (or request) with this key committed
                    if done is not None:
                        return done, True
                    c = s.get(Comparison, comparison_id)
                    if c is None:
                        raise KeyError(f"no comparison {comparison_id!r}")
                    v = Vote(comparison_id=comparison_id, preferred=preferred,
                             confidence=confidence, comment=comment, rater=rater,
                             idempotency_key=key, created_at=utcnow())
                    s.add(v)
                    s.flush()
                    return vote_dict(v, c), False
            except IntegrityError:
                # a concurrent try with the same key inserted first (the unique index): its row
                with Session(self._engine) as s:
                    done = made(s)
                if done is None:
                    raise
                return done, True

        return self._retry(write, "add_vote")

    def votes(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Votes, newest first, each with its comparison's query and models.

        Raises:
            ValueError: ``limit`` outside 0..10000 or a negative ``offset``.
        """
        if not 0 <= limit <= MAX_LIST_LIMIT or offset < 0:
            raise ValueError(f"limit must be in 0..{MAX_LIST_LIMIT} and offset >= 0, got "
                             f"limit={limit}, offset={offset}")

        def read() -> list[dict[str, Any]]:
            with Session(self._engine) as s:
                q = (select(Vote, Comparison).join(Comparison, Vote.comparison_id == Comparison.id)
                     .order_by(Vote.created_at.desc(), Vote.id.desc())
                     .limit(limit).offset(offset))
                return [vote_dict(v, c) for v, c in s.execute(q)]

        return self._retry(read, "votes")

    def counts(self) -> dict[str, Any]:
        """How many comparisons and votes there are, and who won.

        Returns:
            ``{"comparisons": n, "votes": n, "by_preferred": {"left": n, "right": n,
            "tie": n}, "by_model": {"base": n, "aligned": n, "tie": n}}``; ``by_model``
            names the model whose row won (every model seen in a comparison, and ``tie``).
        """
        def read() -> dict[str, Any]:
            with Session(self._engine) as s:
                n_comp = s.scalar(select(func.count()).select_from(Comparison)) or 0
                models = s.execute(select(Comparison.left_model, Comparison.right_model)
                                   .distinct()).all()
                rows = s.execute(
                    select(Vote.preferred, Comparison.left_model, Comparison.right_model,
                           func.count())
                    .join(Comparison, Vote.comparison_id == Comparison.id)
                    .group_by(Vote.preferred, Comparison.left_model, Comparison.right_model)
                ).all()
            by_pref = dict.fromkeys(PREFERRED, 0)
            by_model = {m: 0 for pair in models for m in pair}
            by_model["tie"] = 0
            for pref, left, right, n in rows:
                by_pref[pref] += n
                m = preferred_model(pref, left, right)
                by_model[m] = by_model.get(m, 0) + n
            return {"comparisons": int(n_comp), "votes": int(sum(by_pref.values())),
                    "by_preferred": by_pref, "by_model": by_model}

        return self._retry(read, "counts")

    def vote_records(self, min_confidence: int = MIN_CONFIDENCE) -> list[dict[str, Any]]:
        """Every vote with a confidence >= ``min_confidence``, oldest first, with its whole
        comparison (``left_ids``, ``right_ids`` ...) under ``comparison`` (what export reads)."""
        def read() -> list[dict[str, Any]]:
            with Session(self._engine) as s:
                q = (select(Vote, Comparison).join(Comparison, Vote.comparison_id == Comparison.id)
                     .where(Vote.confidence >= min_confidence).order_by(Vote.id))
                return [{**vote_dict(v, c), "comparison": comparison_dict(c)}
                        for v, c in s.execute(q)]

        return self._retry(read, "vote_records")

    def close(self) -> None:
        """Release the connections (idempotent); later calls raise ``RuntimeError``."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()
