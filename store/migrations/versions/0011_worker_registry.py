"""The worker registry: what each GPU worker serves (its base model's names and folder),
its GPUs and its runs, so that the API can list every served base model, place a new run
on a worker of its base model, and a live worker can take over a dead one's runs.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("names", sa.String(1024), nullable=False, server_default=""))
        batch.add_column(sa.Column("model_path", sa.String(1024), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("runs", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("max_runs", sa.Integer(), nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        for name in ("max_runs", "runs", "gpus", "model_path", "names"):
            batch.drop_column(name)
