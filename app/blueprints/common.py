"""Helpers every blueprint shares: body parsing, tenant lookups, and `submit` (the dedupe).

A request row is written in one transaction and enqueued only after the commit. A repeated
(model_id, seq_id) or (sampler_id, seq_id) returns the original request id and enqueues
nothing: the SDK resends the same seq_id after timeouts and 5xx (protocol note §8).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from flask import current_app, g, request
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from protocol.errors import RequestError
from store.schema import FAILED, CheckpointRow, ModelRow, RequestRow, utcnow

if TYPE_CHECKING:
    from app.factory import Services

log = logging.getLogger(__name__)
T = TypeVar("T")
MISSING: Any = object()
_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "a boolean",
    dict: "an object",
    list: "a list",
}


def services() -> Services:
    return current_app.extensions["tinkerq"]


def tenant() -> str:
    return g.tenant


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


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


def field(
    body: dict[str, Any], name: str, kind: type[T], default: Any = MISSING, where: str = ""
) -> T:
    """body[name] checked to be `kind` (ints pass as floats, bools never pass as numbers)."""
    value = body.get(name)
    if value is None:
        if default is MISSING:
            raise RequestError(400, f"{where}{name} is required")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise RequestError(400, f"{where}{name}={value!r} must be {_KIND_NAMES[kind]}")
    return value


# --- lookups (always within the caller's tenant: a foreign id is a missing id) --------------


def owned(session: Any, row_type: type[T], row_id: Any, what: str) -> T:
    row = session.get(row_type, row_id) if isinstance(row_id, str) else None
    if row is None or row.tenant != tenant():
        raise RequestError(404, f"{what} {row_id!r} not found")
    return row


def checkpoint_by_path(session: Any, tinker_path: str) -> CheckpointRow:
    row = session.scalars(
        select(CheckpointRow).where(
            CheckpointRow.tinker_path == tinker_path, CheckpointRow.tenant == tenant()
        )
    ).first()
    if row is None:
        raise RequestError(404, f"checkpoint {tinker_path!r} not found")
    return row


def load_model(model_id: Any) -> ModelRow:
    with services().store.transaction() as s:
        return owned(s, ModelRow, model_id, "model")


# --- submission -----------------------------------------------------------------------------


def existing_request(model_id: str | None, sampler_id: str | None, seq_id: int) -> str | None:
    """The id of the request already holding this (model|sampler, seq_id), if any."""
    return services().store.request_holding(model_id, sampler_id, seq_id)


def _insert(rows: list[Any]) -> None:
    with services().store.transaction() as s:
        s.add_all(rows)


def _enqueue(row: RequestRow, rows: list[Any]) -> None:
    try:
        services().enqueue(row)
    except Exception as e:  # the broker is down: undo, so that the SDK's retry starts afresh
        log.exception("enqueue of %s failed", row.id)
        with services().store.transaction() as s:
            for r in reversed(rows):
                s.delete(s.merge(r))
        raise RequestError(503, f"could not enqueue the request ({type(e).__name__}); retry") from e


def submit(row: RequestRow, *creates: Any) -> str:
    """Insert `row` (with rows it creates) in one transaction, commit, enqueue; dedupe
    (`Store.add_request`: a taken key answers the first request and enqueues nothing)."""
    try:
        request_id = services().store.add_request(row, *creates)
    except IntegrityError as e:
        raise RequestError(400, f"request conflicts with an existing record: {e.orig}") from e
    if request_id == row.id:
        _enqueue(row, [*creates, row])
    return request_id


def reject(row: RequestRow, message: str) -> NoReturn:
    """Answer 400 for a training call that claimed a seq_id: its row is stored FAILED and
    enqueued anyway, so the worker's per-model order skips over it instead of waiting."""
    row.state, row.error, row.error_category = FAILED, message, "user"
    row.summary = f"{row.kind} {row.summary} rejected"[:256]
    row.finished_at = utcnow()
    row.payload = b"{}"
    try:
        _insert([row])
    except IntegrityError:
        raise RequestError(400, message) from None  # the seq_id is already taken
    _enqueue(row, [row])
    raise RequestError(400, message)


def seq_call(
    model: ModelRow, seq_id: int, kind: str, build: Callable[[], tuple[bytes, str]]
) -> dict[str, Any]:
    """Submit a model's numbered call. `build()` validates and returns (payload, summary);
    a 400 from it still claims the seq_id (see `reject`). A resent seq_id is answered
    with the original request before anything is checked again."""
    if found := existing_request(model.id, None, seq_id):
        return future(found, model.id)
    row = RequestRow(
        id=new_request_id(),
        tenant=model.tenant,
        kind=kind,
        model_id=model.id,
        seq_id=seq_id,
        queue=model.queue,
        summary=f"model={model.id} seq={seq_id}",
    )
    try:
        row.payload, summary = build()
    except RequestError as e:
        if e.status != 400:
            raise
        reject(row, e.message)
    row.summary = f"{kind} {row.summary} {summary}"[:256]
    return future(submit(row), model.id)


def future(request_id: str, model_id: str | None = None, **extra: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"request_id": request_id}
    if model_id is not None:
        answer["model_id"] = model_id
    return answer | extra


def payload(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


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
