"""retrieve_future: the long-poll every future goes through (protocol note §4.2); and
cancel_future, which the SDK sends for a sample it stopped waiting for.

Answers at once when the request is finished; otherwise waits on the doorbell (not a
database loop) up to `long_poll_seconds`, then answers `try_again` (the SDK re-polls at
once). No database connection is held while waiting.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy import select

from app.blueprints.common import json_body, services, tenant
from protocol.checks import field
from protocol.errors import RequestError
from store.schema import DONE, FAILED, PENDING, RequestRow, utcnow

bp = Blueprint("futures", __name__)
_COLUMNS = (
    RequestRow.tenant,
    RequestRow.state,
    RequestRow.result,
    RequestRow.result_type,
    RequestRow.error,
    RequestRow.error_category,
)


def fetch(request_id: str) -> Any:
    """The request's state and result (not its payload), or 404."""
    with services().store.transaction() as s:
        row = s.execute(select(*_COLUMNS).where(RequestRow.id == request_id)).first()
    if row is None or row.tenant != tenant():
        raise RequestError(404, f"future {request_id!r} not found")
    return row


def finished(row: Any) -> bool:
    return row.state in (DONE, FAILED)


def wait_for(request_id: str) -> Any:
    deadline = time.monotonic() + services().settings.long_poll_seconds
    with services().doorbell.listen(request_id) as rang:
        row = fetch(request_id)  # re-check after registering: a ring cannot slip past
        while not finished(row) and (left := deadline - time.monotonic()) > 0:
            rang.wait(left)
            rang.clear()
            row = fetch(request_id)
    return row


def answer(request_id: str, row: Any) -> Response:
    if row.state == FAILED:
        return jsonify(
            {"error": row.error or "request failed", "category": row.error_category or "unknown"}
        )
    if row.state == DONE:
        mimetype = "application/x-protobuf" if row.result_type == "proto" else "application/json"
        return Response(row.result or b"{}", mimetype=mimetype)
    return jsonify({"type": "try_again", "request_id": request_id, "queue_state": "active"})


@bp.post("/retrieve_future")
def retrieve_future() -> Response:
    request_id = field(json_body(), "request_id", str)
    row = fetch(request_id)
    if not finished(row):
        row = wait_for(request_id)
    return answer(request_id, row)


CANCELLED = "cancelled by the client (cancel_future) before it ran"


@bp.post("/cancel_future")
def cancel_future() -> dict[str, Any]:
    """A sample the client abandoned (the SDK sends this once `sample_cancel_enabled` is on in
    dynamic_config): if it has not been answered, its row ends failed, so a worker that has
    not started it skips it; one already in the running batch finishes, and its answer is
    dropped. Training calls keep their order and are not cancellable."""
    request_id = field(json_body(), "request_id", str)
    with services().store.transaction() as s:
        row = s.get(RequestRow, request_id)
        if row is None or row.tenant != tenant():
            raise RequestError(404, f"future {request_id!r} not found")
        if row.kind != "sample":
            raise RequestError(400, f"future {request_id!r} is a {row.kind} call; only sample "
                                    "calls can be cancelled")
        cancelled = row.state == PENDING
        if cancelled:
            row.state, row.error, row.error_category = FAILED, CANCELLED, "user"
            row.finished_at = utcnow()
    if cancelled:
        services().doorbell.ring(request_id)
    return {"cancelled": cancelled}
