"""create_session remembers the SDK's X-Idempotency-Key, so a retried creation (the first
answer lost on the way back) answers the session it already made instead of a second one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(128), nullable=True))
        batch.create_unique_constraint("uq_sessions_tenant_idempotency",
                                       ["tenant", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_constraint("uq_sessions_tenant_idempotency", type_="unique")
        batch.drop_column("idempotency_key")
