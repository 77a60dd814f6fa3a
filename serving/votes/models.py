"""The votes database's tables: ``comparisons`` (two result rows shown for one query) and
``votes`` (which row a person preferred; several per comparison). Each vote carries an
``idempotency_key`` (unique): a write retried after an unknown outcome finds the vote it
already made instead of making a second one.

The schema is created and changed only by the Alembic migrations beside this module
(``migrations/versions``); these models must match them, which a unit test checks with
``alembic.autogenerate.compare_metadata``. A change here needs a new revision there.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, DateTime, Dialect, ForeignKey, MetaData, String, Text
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

#: what ``votes.preferred`` may hold
PREFERRED = ("left", "right", "tie")
#: the longest comment a vote may carry (enforced by the store, not the schema)
MAX_COMMENT_CHARS = 1000
MIN_CONFIDENCE, MAX_CONFIDENCE, DEFAULT_CONFIDENCE = 1, 5, 3
#: the longest idempotency key (a uuid4 is 32 hex digits, 36 with dashes)
MAX_IDEMPOTENCY_KEY_CHARS = 64

#: constraint and index names, so migrations and models name them the same on every backend
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A new comparison id (or idempotency key): a uuid4 as 32 hex digits."""
    return uuid.uuid4().hex


def normalise_query(query: str) -> str:
    """The form of a query that its id is derived from: NFKC, case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", query)).strip().casefold()


def query_id_for(query: str) -> str:
    """A stable id for a query text, ``"q-" + sha1(normalised query)[:16]``.

    Votes on the same query (up to case and whitespace) share it, in every process and run.
    """
    return "q-" + hashlib.sha1(normalise_query(query).encode("utf-8")).hexdigest()[:16]


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime stored in UTC, read back as UTC on every backend.

    PostgreSQL keeps the zone (``timestamptz``); SQLite keeps none, so values are converted to
    UTC before they are written and tagged as UTC when read. Naive values are taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC (naive values are assumed to be UTC already)."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Tag naive values (SQLite) as UTC; convert aware ones to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of the votes tables (its own metadata and naming convention)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Comparison(Base):
    """Two result rows shown side by side for one query (e.g. base model left, aligned right)."""

    __tablename__ = "comparisons"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    query: Mapped[str] = mapped_column(Text)
    query_id: Mapped[str] = mapped_column(String(64), index=True)
    index: Mapped[str] = mapped_column(String(200))
    k: Mapped[int] = mapped_column()
    left_model: Mapped[str] = mapped_column(String(100))
    right_model: Mapped[str] = mapped_column(String(100))
    left_ids: Mapped[list[str]] = mapped_column(JSON)
    right_ids: Mapped[list[str]] = mapped_column(JSON)
    client: Mapped[str | None] = mapped_column(String(200))

    votes: Mapped[list[Vote]] = relationship(back_populates="comparison",
                                             order_by="Vote.id", passive_deletes=True)


class Vote(Base):
    """One person's preference between a comparison's two rows."""

    __tablename__ = "votes"
    __table_args__ = (
        CheckConstraint("preferred IN ('left', 'right', 'tie')", name="preferred"),
        CheckConstraint(f"confidence >= {MIN_CONFIDENCE} AND confidence <= {MAX_CONFIDENCE}",
                        name="confidence"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    comparison_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("comparisons.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    preferred: Mapped[str] = mapped_column(String(8))
    confidence: Mapped[int] = mapped_column(default=DEFAULT_CONFIDENCE,
                                            server_default=sql_text(str(DEFAULT_CONFIDENCE)))
    comment: Mapped[str | None] = mapped_column(Text)
    rater: Mapped[str | None] = mapped_column(String(200))
    #: who wrote it once (client or store), unique; NULL only for votes made before 0002
    idempotency_key: Mapped[str | None] = mapped_column(String(MAX_IDEMPOTENCY_KEY_CHARS),
                                                         unique=True, index=True)

    comparison: Mapped[Comparison] = relationship(back_populates="votes")
