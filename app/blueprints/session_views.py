"""Sessions seen from outside: sessions/search, PUT sessions/<id>/project, and
sessions/<id>/trace_export with the trace's signed download.

The trace is the session's calls on a timeline in the Trace Event Format (JSON), which
Perfetto (ui.perfetto.dev) and chrome://tracing open: one track per training run and
sampling session, each call a slice from its arrival to its answer with the engine's compute
time as a slice inside it. It is built when it is downloaded, so a URL always gives the
session as it is then; the URL itself lapses after `download_url_ttl_s`.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from flask import Blueprint, Response

from app.blueprints.common import json_body, owned, public_link, services, tenant
from protocol.checks import field
from protocol.errors import RequestError, bad
from store import sessions, usage
from store.schema import SessionRow

bp = Blueprint("session_views", __name__)
MAX_PAGE = 200


@bp.post("/sessions/search")
def search_sessions() -> dict[str, Any]:
    body = json_body()
    limit = field(body, "limit", int, 50)
    if not 1 <= limit <= MAX_PAGE:
        raise bad(f"limit={limit} must be between 1 and {MAX_PAGE}")
    statuses = field(body, "statuses", list, None)
    if statuses is not None and (not statuses or not all(
            isinstance(x, dict) and x.get("type") in ("active", "cancelled", "failed",
                                                      "client_finished") for x in statuses)):
        raise bad(f"statuses={str(statuses)[:80]} must list active, cancelled, failed or "
                  "client_finished queries")
    q = sessions.Search(
        tenant=tenant(), idle_s=services().settings.session_idle_s, limit=limit,
        session_id=field(body, "session_id", str, None),
        display_name=field(body, "display_name", str, None),
        project_ids=field(body, "project_ids", list, None),
        user_metadata=field(body, "user_metadata", dict, {}),
        statuses=statuses, after=_cursor(field(body, "cursor", dict, None)),
    )
    if not _owner_is_caller(field(body, "owner", dict, {"type": "own"})):
        return {"sessions": [], "next_cursor": None}
    page, after = sessions.search(services().store, q)
    for summary in page:
        summary["created_at"] = _iso(summary["created_at"])
    cursor = None if after is None else {"last_created_at": _iso(after[0]),
                                         "last_session_id": after[1]}
    return {"sessions": page, "next_cursor": cursor}


def _owner_is_caller(owner: dict[str, Any]) -> bool:
    """Every key sees only its own sessions: `own` and `accessible` are the same here, and
    a list of owners matches only when it names the caller."""
    kind = owner.get("type")
    if kind == "user":
        return sessions.owner_urn(tenant()) in (owner.get("owner_urns") or [])
    if kind not in ("own", "accessible"):
        raise bad(f"owner type {kind!r} must be own, accessible or user")
    return True


def _cursor(cursor: dict[str, Any] | None) -> tuple[dt.datetime, str] | None:
    if cursor is None:
        return None
    try:
        at = dt.datetime.fromisoformat(str(cursor["last_created_at"]).replace("Z", "+00:00"))
        return at.astimezone(dt.UTC).replace(tzinfo=None), str(cursor["last_session_id"])
    except (KeyError, ValueError) as e:
        raise bad(f"cursor {str(cursor)[:80]} is not a next_cursor this server gave: {e}") \
            from None


def _iso(t: dt.datetime) -> str:
    return t.isoformat() + "Z"  # stored naive UTC


@bp.put("/sessions/<session_id>/project")
def assign_project(session_id: str) -> dict[str, Any]:
    project = field(json_body(), "project_id", str, max_len=256)
    if not project:
        raise bad("project_id must be a non-empty string")
    with services().store.transaction() as s:
        owned(s, SessionRow, session_id, "session").project_id = project
        usage.audit(s, tenant(), "project_session_set", session_id=session_id,
                    project_id=project)
    return {}


# --- traces ---------------------------------------------------------------------------------


@bp.get("/sessions/<session_id>/trace_export")
def trace_export(session_id: str) -> dict[str, Any]:
    with services().store.transaction() as s:
        owned(s, SessionRow, session_id, "session")
    token = services().trace_signer.sign(tenant(), session_id)
    url = public_link("session_views.trace_download", token=token)
    return {"status": "ready", "url": url}


@bp.get("/downloads/traces/<token>/session.pftrace")
def trace_download(token: str) -> Response:
    owner, session_id = services().trace_signer.open(token, 2)
    with services().store.transaction() as s:
        row = s.get(SessionRow, session_id)
        if row is None or row.tenant != owner:
            raise RequestError(404, f"session {session_id!r} no longer exists")
    trace = trace_events(sessions.requests_of(services().store, session_id))
    return Response(json.dumps(trace), mimetype="application/json", headers={
        "Content-Disposition": f'attachment; filename="{session_id}.pftrace"'})


def trace_events(calls: list[Any]) -> dict[str, Any]:
    tracks: dict[str, int] = {}
    events: list[dict[str, Any]] = []
    for call in calls:
        track = call.model_id or call.sampler_id or "session"
        if track not in tracks:
            tracks[track] = len(tracks) + 1
            events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tracks[track],
                           "args": {"name": track}})
        start = _micros(call.created_at)
        end = _micros(call.finished_at) if call.finished_at else start
        where = {"pid": 1, "tid": tracks[track]}
        events.append({"ph": "X", "name": call.kind, "ts": start, "dur": max(end - start, 1),
                       **where, "args": {"request_id": call.id, "seq_id": call.seq_id,
                                         "state": call.state, "summary": call.summary}})
        if call.compute_seconds:
            compute = int(call.compute_seconds * 1e6)
            events.append({"ph": "X", "name": f"{call.kind} (compute)", **where,
                           "ts": max(end - compute, start), "dur": max(compute, 1)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _micros(t: dt.datetime) -> int:
    return int(t.replace(tzinfo=dt.UTC).timestamp() * 1e6)
