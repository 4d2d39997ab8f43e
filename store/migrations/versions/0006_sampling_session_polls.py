"""retrieve_futures and join_sampling_session: a finished sample remembers the cursor of the
poll that first reported it, and a sampling session counts the clone ids it handed out.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("report_cursor", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("samplers") as batch:
        batch.add_column(sa.Column("clients", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("samplers") as batch:
        batch.drop_column("clients")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("report_cursor")
