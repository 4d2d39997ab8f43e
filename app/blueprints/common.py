"""Helpers every blueprint shares: the app's services, the caller's tenant, body parsing,
lookups within the tenant, and listings. Calls that write requests go through
`services().submit` (tasks/submit.py, shared with batch scripts)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import current_app, g, request, url_for
from sqlalchemy import func, select

from app import schemas
from app.services import Services
from protocol.errors import RequestError
from store import usage
from store.schema import CheckpointRow
from store.sessions import owner_urn
from tasks.submit import Check

T = TypeVar("T")


def services() -> Services:
    return current_app.extensions["tinkerq"]


def tenant() -> str:
    return g.tenant


# --- request bodies -------------------------------------------------------------------------


MAX_JSON_DEPTH = 32  # the SDK's deepest body (a sample's prompt chunks) is 4 levels
MAX_JSON_BYTES = 16 << 20  # a JSON call's body (a long prompt is well under 1 MiB)


def json_body() -> dict[str, Any]:
    """The request's JSON object, refused with a 400 when it is not JSON, nests deeper than
    MAX_JSON_DEPTH, holds NaN/Infinity or a NUL character (no column or path takes one), or
    does not fit its route's schema (app/schemas.py)."""
    data = _parsed_json()
    schemas.check_body(request.endpoint, data)
    return data


def numbered_body() -> tuple[dict[str, Any], Check]:
    """A numbered call's JSON object and its schema check, left for the submitter to run:
    a 400 of a numbered call still claims its seq_id (tasks/submit.py)."""
    data, endpoint = _parsed_json(), request.endpoint
    return data, lambda: schemas.check_body(endpoint, data)


def _parsed_json() -> dict[str, Any]:
    request.max_content_length = MAX_JSON_BYTES  # past it: 413, answered as JSON
    raw = request.get_data()
    try:
        data = json.loads(raw, parse_constant=_no_constant) if raw else {}
    except RecursionError:
        raise RequestError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") \
            from None
    except ValueError as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}")
    _check_tree(data)
    g.json_body = data  # the access log names the future a poll asks about (app/access.py)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows; send a finite number")


def _check_tree(data: Any) -> None:
    """Walk the parsed body without recursion: its depth, and NUL characters in strings."""
    stack = [(data, 1, "body")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels "
                                    f"(at {where[:80]})")
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = enumerate(value)  # type: ignore[assignment]
        else:
            if isinstance(value, str) and "\x00" in value:
                raise RequestError(400, f"{where[:80]} holds a NUL character")
            continue
        for key, item in items:
            if isinstance(key, str) and "\x00" in key:
                raise RequestError(400, f"a key of {where[:80]} holds a NUL character")
            stack.append((item, depth + 1, f"{where}.{key}" if isinstance(key, str)
                          else f"{where}[{key}]"))


# --- lookups (always within the caller's tenant: a foreign id is a missing id) --------------


def owned(session: Any, row_type: type[T], row_id: Any, what: str) -> T:
    return services().submit.owned(session, tenant(), row_type, row_id, what)


def audit_checkpoint(session: Any, ckpt: CheckpointRow, event: str, **details: Any) -> None:
    """Log `event` on the checkpoint to its owner's audit log, naming who did it."""
    usage.audit(session, ckpt.tenant, event, model_id=ckpt.model_id,
                tinker_path=ckpt.tinker_path, actor=owner_urn(tenant()), **details)


def checkpoint_by_path(session: Any, tinker_path: str, read: bool = False) -> CheckpointRow:
    """The caller's checkpoint; with `read`, also one its owner published."""
    return services().submit.checkpoint(session, tenant(), tinker_path, read=read)


def public_link(endpoint: str, **values: Any) -> str:
    """An absolute URL of `endpoint` as clients reach it: under `public_url` when set, else
    at the host the request came to."""
    base = services().settings.public_url.rstrip("/")
    return base + url_for(endpoint, **values) if base else url_for(endpoint, **values,
                                                                   _external=True)


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
    if not 1 <= limit <= 1000 or not 0 <= offset < 1 << 63:
        raise RequestError(400, f"limit={limit} must be in [1, 1000] and offset={offset} in "
                                "[0, 2**63)")
    return limit, offset


def count(s: Any, query: Any) -> int:
    return s.scalar(select(func.count()).select_from(query.subquery()))
