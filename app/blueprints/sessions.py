"""Client sessions: create_session, session_heartbeat, sessions/<id>/finish, GET sessions."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.blueprints.common import (
    json_body,
    owned,
    page_args,
    services,
    str_values,
    tenant,
)
from protocol.checks import field
from protocol.errors import RequestError
from store.schema import ModelRow, SamplerRow, SessionRow, utcnow

bp = Blueprint("sessions", __name__)


@bp.post("/create_session")
def create_session() -> dict[str, Any]:
    """A new session; a retry carrying the same X-Idempotency-Key (the SDK reuses one per
    request across its retries) answers the session the first attempt made."""
    body = json_body()
    key = request.headers.get("X-Idempotency-Key") or None
    if key is not None and len(key) > 128:
        raise RequestError(400, f"X-Idempotency-Key has {len(key)} characters; at most 128")
    if key is not None and (found := _session_for_key(key)):
        return {"type": "create_session", "session_id": found}
    row = SessionRow(
        id=f"sess-{uuid.uuid4().hex[:12]}",
        tenant=tenant(),
        tags=field(body, "tags", list, []),
        user_metadata=field(body, "user_metadata", dict, {}),
        display_name=field(body, "display_name", str, None),
        project_id=field(body, "project_id", str, None),
        sdk_version=field(body, "sdk_version", str, None, max_len=32),
        idempotency_key=key,
    )
    try:
        with services().store.transaction() as s:
            s.add(row)
    except IntegrityError:  # a concurrent retry with the same key won
        if key is None or not (found := _session_for_key(key)):
            raise
        return {"type": "create_session", "session_id": found}
    return {"type": "create_session", "session_id": row.id}


def _session_for_key(key: str) -> str | None:
    with services().store.transaction() as s:
        return s.scalar(select(SessionRow.id).where(SessionRow.tenant == tenant(),
                                                    SessionRow.idempotency_key == key))


@bp.post("/session_heartbeat")
def session_heartbeat() -> tuple[dict[str, Any], int]:
    body = json_body()
    with services().store.transaction() as s:
        row = owned(s, SessionRow, body.get("session_id"), "session")
        if row.finished_at is not None:  # 410 stops the SDK's heartbeat loop
            return {"detail": f"session {row.id!r} is finished"}, 410
        row.last_heartbeat = utcnow()
    return {"type": "session_heartbeat"}, 200


@bp.post("/sessions/<session_id>/finish")
def finish_session(session_id: str) -> dict[str, Any]:
    """The session takes no more calls; its runs leave the worker's memory once their calls
    are done. The first finish reason stays."""
    body = json_body()
    reason = body.get("reason")
    with services().store.transaction() as s:
        row = owned(s, SessionRow, session_id, "session")
        if row.finished_at is None:
            row.finished_at = utcnow()
            row.finish_reason = str(reason.get("type"))[:32] if isinstance(reason, dict) else None
        runs = s.execute(select(ModelRow.id, ModelRow.queue)
                         .where(ModelRow.session_id == row.id)).all()
    services().submit.retire_runs([(model_id, queue) for model_id, queue in runs])
    return {}


@bp.get("/sessions")
def list_sessions() -> dict[str, Any]:
    limit, offset = page_args()
    query = (
        select(SessionRow.id)
        .where(SessionRow.tenant == tenant())
        .order_by(SessionRow.created_at, SessionRow.id)
        .limit(limit)
        .offset(offset)
    )
    with services().store.transaction() as s:
        return {"sessions": list(s.scalars(query))}


@bp.get("/sessions/<session_id>")
def get_session(session_id: str) -> dict[str, Any]:
    with services().store.transaction() as s:
        row = owned(s, SessionRow, session_id, "session")
        runs = s.scalars(
            select(ModelRow.id).where(ModelRow.session_id == row.id).order_by(ModelRow.created_at)
        )
        samplers = s.scalars(
            select(SamplerRow.id)
            .where(SamplerRow.session_id == row.id)
            .order_by(SamplerRow.created_at)
        )
        return {
            "training_run_ids": list(runs),
            "sampler_ids": list(samplers),
            "user_metadata": str_values(row.user_metadata),
            "display_name": row.display_name,
        }
