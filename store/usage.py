"""Usage and audit, from the records: what billing/usage/*, audit and the admin CLI show.

- Every answered request keeps its tokens (`requests.tokens_*`, set with its answer): a
  training call the tokens it trained; a sample the prompt tokens it prefilled once, the
  prompt tokens of its other samples (which share that prefill: Tinker bills them as cache
  hits), and the tokens it sampled. Usage events are those sums per UTC hour, session, base
  model and kind, plus the checkpoints saved in the hour.
- Audit events are written where they happen (`audit`): a checkpoint created, read (loaded,
  sampled, downloaded; by its owner or, once published, by another key), deleted, published,
  unpublished, given a TTL or copied, and a session moved to a project. Each is logged to the
  resource owner's key.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from store.db import Store
from store.schema import (
    AuditRow,
    CheckpointRow,
    ModelRow,
    RequestRow,
    SamplerRow,
    SessionRow,
    utcnow,
)

HOUR = dt.timedelta(hours=1)
EVENT_TYPES = {"all": None, "checkpoints": "checkpoint_", "projects": "project_",
               "teams": "team_", "organizations": "organization_"}


def audit(db: Session, tenant: str, event: str, **details: Any) -> None:
    db.add(AuditRow(tenant=tenant, event=event, details=details))


def audit_log(store: Store, tenant: str, day: dt.date | None, event_type: str
              ) -> list[dict[str, Any]]:
    prefix = EVENT_TYPES[event_type]
    query = select(AuditRow).where(AuditRow.tenant == tenant).order_by(AuditRow.at, AuditRow.id)
    if day is not None:
        start = dt.datetime.combine(day, dt.time())
        query = query.where(AuditRow.at >= start, AuditRow.at < start + 24 * HOUR)
    if prefix is not None:
        query = query.where(AuditRow.event.startswith(prefix))
    with store.transaction() as s:
        rows = list(s.scalars(query.limit(10_000)))
    return [{"timestamp": r.at.isoformat() + "Z", "event": r.event, "event_details": r.details,
             "model_id": r.details.get("model_id"), "tinker_path": r.details.get("tinker_path"),
             "purpose": r.details.get("purpose")} for r in rows]


def usage_events(store: Store, tenant: str, start: dt.datetime, end: dt.datetime,
                 owner: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Hourly usage events in [start, end) and the metadata of the sessions they name."""
    model_session = select(ModelRow.session_id).where(ModelRow.id == RequestRow.model_id)
    sampler_session = select(SamplerRow.session_id).where(SamplerRow.id == RequestRow.sampler_id)
    with store.transaction() as s:
        rows = s.execute(
            select(RequestRow.kind, RequestRow.finished_at, RequestRow.tokens_in,
                   RequestRow.tokens_cached, RequestRow.tokens_out,
                   func.coalesce(model_session.scalar_subquery(),
                                 sampler_session.scalar_subquery()).label("session_id"))
            .where(RequestRow.tenant == tenant, RequestRow.finished_at >= start,
                   RequestRow.finished_at < end, RequestRow.state == "done")
        ).all()
        saved = s.execute(
            select(CheckpointRow.created_at, ModelRow.session_id, ModelRow.base_model)
            .join(ModelRow, ModelRow.id == CheckpointRow.model_id)
            .where(CheckpointRow.tenant == tenant, CheckpointRow.created_at >= start,
                   CheckpointRow.created_at < end)
        ).all()
        sessions = {r.id: r for r in s.scalars(select(SessionRow).where(
            SessionRow.id.in_({r.session_id for r in rows} | {c.session_id for c in saved})))}
        bases = dict(s.execute(select(ModelRow.session_id, ModelRow.base_model).where(
            ModelRow.session_id.in_(list(sessions)))).all())
    buckets: dict[tuple[Any, ...], int] = {}

    def add(at: dt.datetime, session: str | None, kind: str, amount: int | None) -> None:
        if amount:
            key = (at.replace(minute=0, second=0, microsecond=0), session, kind)
            buckets[key] = buckets.get(key, 0) + amount

    for r in rows:
        if r.kind in ("forward", "forward_backward"):
            add(r.finished_at, r.session_id, "training", r.tokens_in)
        elif r.kind == "sample":
            add(r.finished_at, r.session_id, "sampling_prefill", r.tokens_in)
            add(r.finished_at, r.session_id, "sampling_prefill_cached", r.tokens_cached)
            add(r.finished_at, r.session_id, "sampling_sample", r.tokens_out)
    for c in saved:
        add(c.created_at, c.session_id, "checkpoint", 1)
    events = []
    for (at, session, kind), amount in sorted(buckets.items(), key=lambda kv: (kv[0][0], -kv[1])):
        row = sessions.get(session)
        info: dict[str, Any] = {"type": kind, "token_count": amount}
        if kind == "checkpoint":
            info = {"type": "checkpoint", "count": amount}
        elif kind.startswith("sampling_prefill"):
            info = {"type": "sampling_prefill", "cached": kind.endswith("cached"),
                    "token_count": amount}
        events.append({
            "bucket_start": at.isoformat() + "Z", "bucket_end": (at + HOUR).isoformat() + "Z",
            "base_model": bases.get(session), "user_id": owner, "session_id": session,
            "project_id": row.project_id if row else None, "event_info": info,
        })
    metadata = {sid: {"user_metadata": {str(k): str(v) for k, v in (r.user_metadata or {})
                                        .items()} or None} for sid, r in sessions.items()}
    return events, metadata


def storage_now(store: Store, tenant: str, project: str | None) -> list[dict[str, Any]]:
    """The key's unexpired checkpoints now, per project: count and bytes."""
    query = (select(SessionRow.project_id, func.count(CheckpointRow.id),
                    func.coalesce(func.sum(CheckpointRow.size_bytes), 0))
             .join(ModelRow, ModelRow.id == CheckpointRow.model_id)
             .join(SessionRow, SessionRow.id == ModelRow.session_id)
             .where(CheckpointRow.tenant == tenant,
                    or_(CheckpointRow.expires_at.is_(None), CheckpointRow.expires_at > utcnow()))
             .group_by(SessionRow.project_id))
    if project is not None:
        query = query.where(SessionRow.project_id == project)
    with store.transaction() as s:
        groups = s.execute(query).all()
    return [{"project_id": p, "checkpoint_count": int(n), "size_bytes": int(b)}
            for p, n, b in groups]
