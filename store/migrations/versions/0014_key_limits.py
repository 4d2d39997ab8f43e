"""Quotas of a key's own: api_keys.max_models and max_pending (NULL: the deployment's
max_models_per_tenant and max_pending_per_tenant), set by `python -m app.keys limit`.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.add_column(sa.Column("max_models", sa.Integer(), nullable=True))
        table.add_column(sa.Column("max_pending", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.drop_column("max_pending")
        table.drop_column("max_models")
