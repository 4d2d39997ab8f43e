"""A tenant's sessions as sessions/search and trace_export see them.

Search matches newest first, a page at a time, with a keyset cursor (created_at, id):
a session matches when it is the caller's, in one of `project_ids` if given, named by
`session_id` or holding every word of `display_name` (either one, when both are given), has
every `user_metadata` pair, and its status is one of `statuses`. A status is computed, not
stored: `client_finished` (with the reason the client gave) once the session is finished,
`active` while its heartbeat is younger than `session_idle_s`, none otherwise.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select

from store.db import Store
from store.schema import CheckpointRow, ModelRow, RequestRow, SamplerRow, SessionRow, utcnow

FINISH_REASONS = ("success", "errored", "interrupted")


@dataclass
class Search:
    tenant: str
    idle_s: float
    session_id: str | None = None
    display_name: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = field(default_factory=dict)
    statuses: list[dict[str, Any]] | None = None  # the SDK's SessionStatusQuery objects
    limit: int = 50
    after: tuple[dt.datetime, str] | None = None  # the cursor: (created_at, id) of the last


def status(row: SessionRow, idle_s: float, now: dt.datetime) -> dict[str, Any] | None:
    if row.finished_at is not None:
        if row.finish_reason not in FINISH_REASONS:
            return None
        return {"type": "client_finished", "reason": {"type": row.finish_reason}}
    if row.last_heartbeat >= now - dt.timedelta(seconds=idle_s):
        return {"type": "active"}
    return None


def _wanted(found: dict[str, Any] | None, queries: list[dict[str, Any]] | None) -> bool:
    if queries is None:
        return True
    for query in queries:
        if found is None or query["type"] != found["type"]:
            continue
        reasons = query.get("reasons")
        if not reasons or found["reason"]["type"] in reasons:
            return True
    return False


def search(store: Store, q: Search) -> tuple[list[dict[str, Any]], tuple[dt.datetime, str] | None]:
    """One page of matches (summaries) and the cursor of the next page (None: no more)."""
    query = select(SessionRow).where(SessionRow.tenant == q.tenant)
    if q.project_ids is not None:
        query = query.where(SessionRow.project_id.in_(q.project_ids))
    named = []
    if q.session_id is not None:
        named.append(SessionRow.id == q.session_id)
    if q.display_name is not None:
        words = [func.lower(SessionRow.display_name).contains(w.lower())
                 for w in q.display_name.split()]
        named.append(and_(*words))
    if named:
        query = query.where(or_(*named))
    if q.after is not None:
        at, last = q.after
        query = query.where(or_(SessionRow.created_at < at,
                                and_(SessionRow.created_at == at, SessionRow.id < last)))
    query = query.order_by(SessionRow.created_at.desc(), SessionRow.id.desc())
    now, page, cursor = utcnow(), [], None
    with store.transaction() as s:
        for row in s.scalars(query.execution_options(yield_per=200)):
            found = status(row, q.idle_s, now)
            metadata = {str(k): str(v) for k, v in (row.user_metadata or {}).items()}
            if not _wanted(found, q.statuses) or any(
                    metadata.get(k) != v for k, v in q.user_metadata.items()):
                continue
            if len(page) == q.limit:
                cursor = (page[-1]["created_at"], page[-1]["session_id"])
                break
            page.append(_summary(s, row, found, metadata))
    return page, cursor


def _summary(s: Any, row: SessionRow, found: dict[str, Any] | None,
             metadata: dict[str, str]) -> dict[str, Any]:
    runs = select(ModelRow.id).where(ModelRow.session_id == row.id)
    count, size = s.execute(
        select(func.count(CheckpointRow.id), func.sum(CheckpointRow.size_bytes))
        .where(CheckpointRow.model_id.in_(runs))
    ).one()
    return {
        "session_id": row.id, "created_at": row.created_at, "owner": owner_urn(row.tenant),
        "project_id": row.project_id or "", "status": found, "checkpoints_count": count,
        "display_name": row.display_name, "user_metadata": metadata or None,
        "checkpoint_storage_bytes": int(size or 0),
    }


def owner_urn(tenant: str) -> str:
    return f"tml:user:{tenant}"


def requests_of(store: Store, session_id: str) -> list[Any]:
    """The session's calls in the order they came: its runs' and its samplers'."""
    runs = select(ModelRow.id).where(ModelRow.session_id == session_id)
    samplers = select(SamplerRow.id).where(SamplerRow.session_id == session_id)
    with store.transaction() as s:
        return list(s.execute(
            select(RequestRow.id, RequestRow.kind, RequestRow.model_id, RequestRow.sampler_id,
                   RequestRow.seq_id, RequestRow.state, RequestRow.summary,
                   RequestRow.created_at, RequestRow.finished_at, RequestRow.compute_seconds)
            .where(or_(RequestRow.model_id.in_(runs), RequestRow.sampler_id.in_(samplers)))
            .order_by(RequestRow.created_at)
        ).all())
