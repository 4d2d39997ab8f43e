"""GPU workers' heartbeats: which queues have a live worker (the request sweeper, and
retrieve_future's answer for calls whose worker is gone).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(256), primary_key=True),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("host", sa.String(256), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(256), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_workers_queue", "workers", ["queue"])


def downgrade() -> None:
    op.drop_table("workers")
