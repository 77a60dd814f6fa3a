"""Alembic environment of the votes database, configured from code (no ``alembic.ini``).

:func:`serving.votes.store.migrate` (which :class:`~serving.votes.store.VoteStore` runs) hands
over an open connection in ``config.attributes["connection"]``; without one, the URL comes
from the ``sqlalchemy.url`` option (see :func:`serving.votes.store.alembic_config`). Offline
(``--sql``) mode renders the SQL for that URL.

Every upgrade runs in one transaction that first takes the database's write lock (SQLite:
``BEGIN IMMEDIATE``, set up by the store; PostgreSQL: a transaction-scoped advisory lock), so
several replicas starting together on a fresh database migrate it once, one after the other.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, text

from serving.votes.models import Base, UTCDateTime

#: key of the PostgreSQL advisory lock held while migrating (any constant bigint)
PG_LOCK_KEY = 0x766F746573  # "votes"

config = context.config
target_metadata = Base.metadata


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render the models' UTC datetime as a plain ``sa.DateTime(timezone=True)`` in revisions."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kw: Any) -> None:
    context.configure(target_metadata=target_metadata, render_item=render_item,
                      compare_type=True, **kw)


def run_migrations_offline() -> None:
    """Emit the SQL for ``sqlalchemy.url`` instead of running it."""
    url = config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"},
               render_as_batch=bool(url and url.startswith("sqlite")))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    """Migrate inside the connection's transaction (begun by the caller, so Alembic adds none)."""
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate over the connection the store handed over (inside its transaction), else over
    one made from ``sqlalchemy.url`` with the store's engine set-up (SQLite: WAL, busy timeout,
    ``BEGIN IMMEDIATE``)."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from serving.votes.store import create_vote_engine, write_engine

    engine = create_vote_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with write_engine(engine).connect() as conn, conn.begin():
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
