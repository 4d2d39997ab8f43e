"""The durable store: tables, engine setup and the one transaction helper.

Shared by the web process (writes requests, reads results) and the worker's tasks (write
results). SQLite by default, Postgres through DATABASE_URL; the schema itself is created and
migrated by alembic (`migrations/`), `create_schema()` runs those migrations.

Every row that a client can name carries `tenant` (the API key that made it); lookups for a
caller always filter on it, so a foreign id is indistinguishable from a missing one (404).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path
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
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


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
    lora_seed: Mapped[int | None] = mapped_column(Integer)
    train_attn: Mapped[bool] = mapped_column(Boolean, default=True)
    train_mlp: Mapped[bool] = mapped_column(Boolean, default=True)
    train_unembed: Mapped[bool] = mapped_column(Boolean, default=True)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    queue: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_request_time: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


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
    seq_id: Mapped[int | None] = mapped_column(Integer)
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
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED)


class CheckpointRow(Base):
    """A saved checkpoint: `kind` training (adapter + optimizer) or sampler (peft adapter)."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("model_id", "kind", "name", name="uq_checkpoint_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "training" | "sampler"
    name: Mapped[str] = mapped_column(String(256))
    tinker_path: Mapped[str] = mapped_column(String(512), unique=True)
    local_dir: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    @property
    def segment(self) -> str:
        return "weights" if self.kind == "training" else "sampler_weights"


# --- engine and sessions ------------------------------------------------------------------


def normalise_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean the psycopg2 driver that tinkerq installs
    (SQLAlchemy 2.1 would otherwise pick psycopg 3)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url.removeprefix(prefix)
    return url


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine; SQLite gets WAL + a busy timeout so web and worker share it."""
    url = normalise_url(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)


class Store:
    """The engine and session factory of one process."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commit on success, roll back on error, always close."""
        session = self.sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def request_holding(
        self, model_id: str | None, sampler_id: str | None, seq_id: int
    ) -> str | None:
        """The id of the request already holding (model_id | sampler_id, seq_id), if any."""
        key = RequestRow.model_id == model_id if model_id else RequestRow.sampler_id == sampler_id
        with self.transaction() as s:
            return s.scalars(select(RequestRow.id).where(key, RequestRow.seq_id == seq_id)).first()

    def add_request(self, row: RequestRow, *creates: Any) -> str:
        """Insert `row` and the rows it brings into being (a model, a sampler) in one
        transaction, and return the id of the request that holds its (model | sampler,
        seq_id): `row.id`, or the first submission's when the key is taken (the SDK's
        resubmissions; a batch script run again). Nothing is written in that case.

        Shared by the REST API and batch scripts (tasks/batch.py), so both follow one dedupe
        rule; the caller enqueues only when the answer is `row.id`.
        """
        if row.seq_id is not None and (
            found := self.request_holding(row.model_id, row.sampler_id, row.seq_id)
        ):
            return found
        try:
            with self.transaction() as s:
                s.add_all([*creates, row])
                if row.model_id and not any(isinstance(r, ModelRow) for r in creates):
                    s.execute(
                        update(ModelRow)
                        .where(ModelRow.id == row.model_id)
                        .values(last_request_time=utcnow())
                    )
        except IntegrityError:  # lost a race with an identical submission
            if row.seq_id is not None and (
                found := self.request_holding(row.model_id, row.sampler_id, row.seq_id)
            ):
                return found
            raise
        return row.id

    def create_schema(self) -> None:
        """Bring the schema to the newest migration (alembic upgrade head)."""
        from app.migrate import upgrade

        upgrade(self.url)
