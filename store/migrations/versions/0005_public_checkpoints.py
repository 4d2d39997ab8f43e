"""A checkpoint can be published: other API keys may then load and sample it, until its
owner unpublishes it. A training run made by copy_weights names the checkpoint it copies.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("public", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("copied_from", sa.String(512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("copied_from")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("public")
