"""Votes get an idempotency key (unique), so a retried write cannot make a second vote.

A unique index, not a table constraint: SQLite adds it without rebuilding the table, and
PostgreSQL's ``INSERT`` conflict handling and the store's "find the vote this key made" both
use it. Votes made before this revision keep a NULL key (NULLs never collide).

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``votes.idempotency_key`` (nullable) and its unique index."""
    op.add_column("votes", sa.Column("idempotency_key", sa.String(length=64), nullable=True))
    op.create_index(op.f("ix_votes_idempotency_key"), "votes", ["idempotency_key"], unique=True)


def downgrade() -> None:
    """Drop the index and the column (the keys are lost; the votes stay)."""
    op.drop_index(op.f("ix_votes_idempotency_key"), table_name="votes")
    with op.batch_alter_table("votes") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("idempotency_key")
