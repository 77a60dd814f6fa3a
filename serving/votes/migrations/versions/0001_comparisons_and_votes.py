"""Comparisons (two result rows shown for one query) and votes (which row a person preferred).

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``comparisons`` and ``votes`` with their constraints and indexes."""
    op.create_table(
        "comparisons",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("query_id", sa.String(length=64), nullable=False),
        sa.Column("index", sa.String(length=200), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("left_model", sa.String(length=100), nullable=False),
        sa.Column("right_model", sa.String(length=100), nullable=False),
        sa.Column("left_ids", sa.JSON(), nullable=False),
        sa.Column("right_ids", sa.JSON(), nullable=False),
        sa.Column("client", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_comparisons")),
    )
    op.create_index(op.f("ix_comparisons_created_at"), "comparisons", ["created_at"])
    op.create_index(op.f("ix_comparisons_query_id"), "comparisons", ["query_id"])
    op.create_table(
        "votes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("comparison_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("preferred", sa.String(length=8), nullable=False),
        sa.Column("confidence", sa.Integer(), server_default=sa.text("3"), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("rater", sa.String(length=200), nullable=True),
        sa.CheckConstraint("preferred IN ('left', 'right', 'tie')",
                           name=op.f("ck_votes_preferred")),
        sa.CheckConstraint("confidence >= 1 AND confidence <= 5",
                           name=op.f("ck_votes_confidence")),
        sa.ForeignKeyConstraint(["comparison_id"], ["comparisons.id"],
                                name=op.f("fk_votes_comparison_id_comparisons"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_votes")),
    )
    op.create_index(op.f("ix_votes_comparison_id"), "votes", ["comparison_id"])
    op.create_index(op.f("ix_votes_created_at"), "votes", ["created_at"])


def downgrade() -> None:
    """Drop both tables (their votes with them)."""
    op.drop_index(op.f("ix_votes_created_at"), table_name="votes")
    op.drop_index(op.f("ix_votes_comparison_id"), table_name="votes")
    op.drop_table("votes")
    op.drop_index(op.f("ix_comparisons_query_id"), table_name="comparisons")
    op.drop_index(op.f("ix_comparisons_created_at"), table_name="comparisons")
    op.drop_table("comparisons")
