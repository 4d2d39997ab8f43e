"""The admin routes of the SDK's AdminClient, answered from tinkerq's own records for the
calling key (store/usage.py): audit, billing/usage/events, billing/usage/checkpoints/current.
tinkerq sets no prices: every cost and rate is null."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, request

from app.blueprints.common import services, tenant
from protocol.errors import bad
from store import usage
from store.sessions import owner_urn

bp = Blueprint("admin", __name__)
MAX_WINDOW = dt.timedelta(days=14)


@bp.get("/audit")
def audit() -> dict[str, Any]:
    event_type = request.args.get("event_type", "all")
    if event_type not in usage.EVENT_TYPES:
        raise bad(f"event_type={event_type[:40]!r} must be one of {sorted(usage.EVENT_TYPES)}")
    day = request.args.get("day")
    try:
        date = None if day is None else dt.date.fromisoformat(day)
    except ValueError:
        raise bad(f"day={str(day)[:40]!r} must be a date, YYYY-MM-DD") from None
    return {"entries": usage.audit_log(services().store, tenant(), date, event_type)}


@bp.get("/billing/usage/events")
def usage_events() -> dict[str, Any]:
    start, end = _hour("starting_on"), _hour("ending_before")
    if not start < end <= start + MAX_WINDOW:
        raise bad(f"ending_before must be after starting_on and at most {MAX_WINDOW.days} days "
                  "later")
    events, sessions = usage.usage_events(services().store, tenant(), start, end,
                                          owner_urn(tenant()))
    return {"data": events, "sessions": sessions, "cost_data_through": None}


@bp.get("/billing/usage/checkpoints/current")
def checkpoint_storage() -> dict[str, Any]:
    groups = usage.storage_now(services().store, tenant(), request.args.get("project_id"))
    data = [{**g, "org_user_urn": owner_urn(tenant()), "size_gigabytes": g["size_bytes"] / 1e9,
             "estimated_monthly_cost_usd": None} for g in groups]
    return {"effective_rate_usd_per_gigabyte_month": None, "data": data}


def _hour(name: str) -> dt.datetime:
    """A query time on a UTC hour boundary, as naive UTC."""
    raw = request.args.get(name, "")
    try:
        at = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise bad(f"{name}={raw[:40]!r} must be an ISO 8601 time") from None
    if at.tzinfo is not None:
        at = at.astimezone(dt.UTC).replace(tzinfo=None)
    if at.minute or at.second or at.microsecond:
        raise bad(f"{name}={raw[:40]!r} must be on a UTC hour boundary")
    return at
