"""The schema: one table per thing a client can name, and the request states.

Every row that a client can name carries `tenant` (the API key that made it, hashed);
lookups for a caller always filter on it, so a foreign id is indistinguishable from a
missing one (404). The tables are created and migrated by alembic (`store/migrations/`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from protocol.paths import SEGMENT_OF


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def tenant_of(api_key: str) -> str:
    """The stored tenant id: a hash, so that raw API keys never sit in the database."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class SessionRow(Base):
    """A client session (`create_session`); models and samplers hang off it."""

    __tablename__ = "sessions"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_sessions_tenant_idempotency"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    display_name: Mapped[str | None] = mapped_column(String(256))
    project_id: Mapped[str | None] = mapped_column(String(256))
    sdk_version: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_heartbeat: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(128))  # the SDK's, on creation


class ApiKeyRow(Base):
    """An API key made by `python -m app.keys create` (`registered`: the only keys that
    api_keys=keys accepts), or one the open mode has seen asked about (auth/apikey/me) or
    revoked. Only its hash (`tenant`) is kept. A revoked key is refused everywhere."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("tenant", name="uq_api_keys_tenant"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    note: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    registered: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # the key's own quotas (`python -m app.keys limit`); None: the deployment's settings
    max_models: Mapped[int | None] = mapped_column(Integer)
    max_pending: Mapped[int | None] = mapped_column(Integer)


class ModelRow(Base):
    """A training run: one LoRA adapter (+ optimizer state) on one base model.

    `queue` is the worker queue the model was assigned to at creation; every later call of
    the model is routed there, because that worker holds its state.
    """

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # "{session}:train:{n}"
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    lora_rank: Mapped[int] = mapped_column(Integer)
    lora_seed: Mapped[int | None] = mapped_column(BigInteger)
    train_attn: Mapped[bool] = mapped_column(Boolean, default=True)
    train_mlp: Mapped[bool] = mapped_column(Boolean, default=True)
    train_unembed: Mapped[bool] = mapped_column(Boolean, default=True)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    queue: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_request_time: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # copy_weights: the run holds one copied checkpoint and takes no calls
    copied_from: Mapped[str | None] = mapped_column(String(512))


class SamplerRow(Base):
    """A sampling session: the base model, or saved sampler weights (`checkpoint_dir`)."""

    __tablename__ = "samplers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # "{session}:sample:{n}"
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    model_path: Mapped[str | None] = mapped_column(String(512))
    checkpoint_dir: Mapped[str | None] = mapped_column(String(1024))
    queue: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # join_sampling_session: clone ids handed out so far (the original client is 0)
    clients: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


# Request states. A row is written `pending` by the API, moved to `done` or `failed` by its
# task (or by the API itself for input it rejects after claiming a seq_id).
PENDING, DONE, FAILED = "pending", "done", "failed"


class RequestRow(Base):
    """One Tinker call and, once answered, its result: the future the client polls.

    `payload` is what the engine needs (JSON bytes, or the raw protobuf body for
    forward_backward); `result` is the answer as it goes on the wire (`result_type` json or
    proto); failures keep `error` + `error_category` instead.
    """

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("model_id", "seq_id", name="uq_requests_model_seq"),
        UniqueConstraint("sampler_id", "seq_id", name="uq_requests_sampler_seq"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str | None] = mapped_column(String(128), index=True)
    sampler_id: Mapped[str | None] = mapped_column(String(128))
    seq_id: Mapped[int | None] = mapped_column(BigInteger)
    queue: Mapped[str] = mapped_column(String(64))
    summary: Mapped[str] = mapped_column(String(256), default="")
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    result: Mapped[bytes | None] = mapped_column(LargeBinary)
    result_type: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    error_category: Mapped[str | None] = mapped_column(String(16))
    compute_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # indexed: the retention sweep (store/retention.py) walks the finished calls in this order
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, index=True)
    # a sample recorded for stable_reinforce (record_stability_info): usable until then
    stability_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # retrieve_futures: the cursor of the poll that first reported this finished sample
    report_cursor: Mapped[int | None] = mapped_column(BigInteger)
    # usage, set when the answer is stored: tokens trained or prefilled, prefilled again
    # from a shared prompt (samples 2..n), and sampled
    tokens_in: Mapped[int | None] = mapped_column(BigInteger)
    tokens_cached: Mapped[int | None] = mapped_column(BigInteger)
    tokens_out: Mapped[int | None] = mapped_column(BigInteger)

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED)


class CheckpointRow(Base):
    """A saved checkpoint: `kind` training (adapter + optimizer), sampler (peft adapter) or
    external (the peft adapter for download). `public`: other keys may read it."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("model_id", "kind", "name", name="uq_checkpoint_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "training" | "sampler" | "external"
    name: Mapped[str] = mapped_column(String(256))
    tinker_path: Mapped[str] = mapped_column(String(512), unique=True)
    local_dir: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    public: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    @property
    def segment(self) -> str:
        return SEGMENT_OF[self.kind]


class CustomLossRow(Base):
    """A loss made by create_custom_loss: its graph (checked: protocol.custom_graph), usable
    by the training runs of the session that made it."""

    __tablename__ = "custom_losses"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)  # "{session}:loss:{n}"
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"name", "inputs", "nodes"}
    request_id: Mapped[str] = mapped_column(String(64))  # the creation's (finished) future
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class WorkerRow(Base):
    """A GPU worker process serving a queue; it beats every few seconds while it lives."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(256), primary_key=True)  # "{queue}@{host}:{pid}"
    queue: Mapped[str] = mapped_column(String(64), index=True)
    host: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(256))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    names: Mapped[str] = mapped_column(String(1024), default="")  # base_model, aliases: ","
    model_path: Mapped[str] = mapped_column(String(1024), default="")  # its config.json's folder
    gpus: Mapped[int] = mapped_column(Integer, default=0)  # 0: the CPU
    runs: Mapped[int] = mapped_column(Integer, default=0)  # training runs it holds
    max_runs: Mapped[int] = mapped_column(Integer, default=0)  # its max_models


class AuditRow(Base):
    """Something done to a checkpoint or a session's project, by whom (`tenant`), when:
    `event` is <resource>_<action> (checkpoint_create, checkpoint_read, ...)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)  # the owner of the resource
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
