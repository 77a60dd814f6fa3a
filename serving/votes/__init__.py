"""The votes database: people compare two result rows (base vs aligned) for one query; their
votes become a preferences table that the training jobs read.

- :mod:`serving.votes.models`: the ``comparisons`` and ``votes`` tables (SQLAlchemy 2).
- :mod:`serving.votes.store`: :class:`VoteStore`, which migrates (Alembic, ``migrations/``)
  and writes safely from many threads and processes, on SQLite or PostgreSQL; retried writes
  are idempotent (a vote's ``idempotency_key``). See ``docs/votes.md``.
- :mod:`serving.votes.export`: :func:`export_preferences`, votes -> ``preferences.parquet``
  (``python -m serving.votes.export database=URL output=DIR``).

No Ray or FastAPI here: the Serve app calls the store from its thread pool.
"""

from __future__ import annotations

from typing import Any

from serving.votes.models import (
    MAX_COMMENT_CHARS,
    PREFERRED,
    Comparison,
    Vote,
    normalise_query,
    query_id_for,
)
from serving.votes.store import IdempotencyKeyReused, VoteStore, sqlite_url, votes_url

__all__ = ["MAX_COMMENT_CHARS", "PREFERRED", "Comparison", "IdempotencyKeyReused", "Vote",
           "VoteStore", "export_preferences", "normalise_query", "query_id_for", "sqlite_url",
           "votes_url"]


def __getattr__(name: str) -> Any:
    """``export_preferences`` is imported on first use (it pulls in pyarrow and numpy)."""
    if name == "export_preferences":
        from serving.votes.export import export_preferences

        return export_preferences
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
