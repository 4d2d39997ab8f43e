"""The initial schema: sessions, models, samplers, requests, checkpoints (store/schema.py).

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _created() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        sa.Column("display_name", sa.String(256), nullable=True),
        sa.Column("project_id", sa.String(256), nullable=True),
        sa.Column("sdk_version", sa.String(32), nullable=True),
        _created(),
        sa.Column("last_heartbeat", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("finish_reason", sa.String(32), nullable=True),
    )
    op.create_index("ix_sessions_tenant", "sessions", ["tenant"])

    op.create_table(
        "models",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("base_model", sa.String(256), nullable=False),
        sa.Column("lora_rank", sa.Integer(), nullable=False),
        sa.Column("lora_seed", sa.Integer(), nullable=True),
        sa.Column("train_attn", sa.Boolean(), nullable=False),
        sa.Column("train_mlp", sa.Boolean(), nullable=False),
        sa.Column("train_unembed", sa.Boolean(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        sa.Column("queue", sa.String(64), nullable=False),
        _created(),
        sa.Column("last_request_time", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_models_tenant", "models", ["tenant"])
    op.create_index("ix_models_session_id", "models", ["session_id"])

    op.create_table(
        "samplers",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("base_model", sa.String(256), nullable=False),
        sa.Column("model_path", sa.String(512), nullable=True),
        sa.Column("checkpoint_dir", sa.String(1024), nullable=True),
        sa.Column("queue", sa.String(64), nullable=False),
        _created(),
    )
    op.create_index("ix_samplers_tenant", "samplers", ["tenant"])
    op.create_index("ix_samplers_session_id", "samplers", ["session_id"])

    op.create_table(
        "requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model_id", sa.String(128), nullable=True),
        sa.Column("sampler_id", sa.String(128), nullable=True),
        sa.Column("seq_id", sa.Integer(), nullable=True),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("summary", sa.String(256), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("result_type", sa.String(16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_category", sa.String(16), nullable=True),
        sa.Column("compute_seconds", sa.Float(), nullable=True),
        _created(),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("model_id", "seq_id", name="uq_requests_model_seq"),
        sa.UniqueConstraint("sampler_id", "seq_id", name="uq_requests_sampler_seq"),
    )
    op.create_index("ix_requests_tenant", "requests", ["tenant"])
    op.create_index("ix_requests_model_id", "requests", ["model_id"])
    op.create_index("ix_requests_state", "requests", ["state"])

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("tinker_path", sa.String(512), nullable=False, unique=True),
        sa.Column("local_dir", sa.String(1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("user_metadata", sa.JSON(), nullable=True),
        _created(),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("model_id", "kind", "name", name="uq_checkpoint_name"),
    )
    op.create_index("ix_checkpoints_tenant", "checkpoints", ["tenant"])
    op.create_index("ix_checkpoints_model_id", "checkpoints", ["model_id"])


def downgrade() -> None:
    for table in ("checkpoints", "requests", "samplers", "models", "sessions"):
        op.drop_table(table)
