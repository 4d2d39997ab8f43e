"""Helpers every blueprint shares: the app's services, the caller's tenant, body parsing,
lookups within the tenant, and listings. Calls that write requests go through
`services().submit` (tasks/submit.py, shared with batch scripts)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import current_app, g, request
from sqlalchemy import func, select

from app.services import Services
from protocol.errors import RequestError
from store.schema import CheckpointRow

T = TypeVar("T")


def services() -> Services:
    return current_app.extensions["tinkerq"]


def tenant() -> str:
    return g.tenant


# --- request bodies -------------------------------------------------------------------------


def json_body() -> dict[str, Any]:
    raw = request.get_data()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


# --- lookups (always within the caller's tenant: a foreign id is a missing id) --------------


def owned(session: Any, row_type: type[T], row_id: Any, what: str) -> T:
    return services().submit.owned(session, tenant(), row_type, row_id, what)


def checkpoint_by_path(session: Any, tinker_path: str) -> CheckpointRow:
    return services().submit.checkpoint(session, tenant(), tinker_path)


# --- listings -------------------------------------------------------------------------------


def str_values(data: dict[str, Any] | None) -> dict[str, str] | None:
    """User metadata as the SDK's response types want it: dict[str, str]."""
    if data is None:
        return None
    return {str(k): v if isinstance(v, str) else str(v) for k, v in data.items()}


def page_args() -> tuple[int, int]:
    try:
        limit = int(request.args.get("limit", 20))
        offset = int(request.args.get("offset", 0))
    except ValueError as e:
        raise RequestError(400, f"limit and offset must be integers: {e}") from e
    if not 1 <= limit <= 1000 or offset < 0:
        raise RequestError(400, f"limit={limit} must be in [1, 1000] and offset={offset} >= 0")
    return limit, offset


def count(s: Any, query: Any) -> int:
    return s.scalar(select(func.count()).select_from(query.subquery()))
