"""An index on requests.finished_at: the retention sweep (store/retention.py) walks the
finished calls oldest first, a chunk at a time, without reading the whole table.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-09
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_requests_finished_at", "requests", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_requests_finished_at", table_name="requests")
