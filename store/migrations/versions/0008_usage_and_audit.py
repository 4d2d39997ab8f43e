"""Usage and audit records: each answered request keeps the tokens it trained, prefilled and
sampled (billing/usage/events), and checkpoint and project events are logged (audit).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        for name in ("tokens_in", "tokens_cached", "tokens_out"):
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=True))
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_index("ix_audit_events_tenant", "audit_events", ["tenant"])
    op.create_index("ix_audit_events_at", "audit_events", ["at"])


def downgrade() -> None:
    op.drop_table("audit_events")
    with op.batch_alter_table("requests") as batch:
        for name in ("tokens_in", "tokens_cached", "tokens_out"):
            batch.drop_column(name)
