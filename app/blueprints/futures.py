"""retrieve_future: the long-poll every future goes through (protocol note §4.2);
retrieve_futures, one long-poll for every sample of a sampling session (store/completions.py);
and cancel_future, which the SDK sends for a sample it stopped waiting for.

Answers at once when the request is finished; otherwise waits on the doorbell (not a
database loop) up to `long_poll_seconds`, then answers `try_again` (the SDK re-polls at
once). No database connection is held while waiting.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy import select

from app import metrics
from app.blueprints.common import json_body, services, tenant
from protocol.checks import field
from protocol.errors import RequestError
from store import workers
from store.completions import report as completions_since
from store.doorbell import sampler_bell
from store.schema import DONE, FAILED, PENDING, RequestRow, utcnow

bp = Blueprint("futures", __name__)
_COLUMNS = (
    RequestRow.tenant,
    RequestRow.state,
    RequestRow.result,
    RequestRow.result_type,
    RequestRow.error,
    RequestRow.error_category,
    RequestRow.queue,
    RequestRow.created_at,
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
    with metrics.parked(), services().doorbell.listen(request_id) as rang:
        row = fetch(request_id)  # re-check after registering: a ring cannot slip past
        while not finished(row) and (left := deadline - time.monotonic()) > 0:
            rang.wait(left)
            rang.clear()
            row = fetch(request_id)
    return row


def unless_abandoned(request_id: str, row: Any) -> Any:
    """The pending row, or failed now if its worker is gone (worker_lost_s)."""
    lost = dt.timedelta(seconds=services().settings.worker_lost_s)
    if utcnow() - row.created_at < lost:
        return row
    with services().store.transaction() as s:
        failed = workers.abandon(s, request_id, row.queue, lost)
    if not failed:
        return row
    services().doorbell.ring(request_id)
    return fetch(request_id)


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
    if not finished(row):
        row = unless_abandoned(request_id, row)
    return answer(request_id, row)


@bp.post("/retrieve_futures")
def retrieve_futures() -> dict[str, Any]:
    """The target session's samples finished since the client's cursor (the SDK turns this
    on through `sample_use_retrieve_futures`); waits up to `long_poll_seconds`, or `timeout`
    when less, for the first one."""
    body = json_body()
    target = field(body, "target", dict)
    sampler_id = field(target, "sampling_session_id", str, where="target.")
    clone = field(target, "cloned_sampler_id", int, 0, where="target.")
    prev = field(body, "prev_cursor", int, 0)
    limit = services().settings.long_poll_seconds
    wait = min(max(field(body, "timeout", float, limit), 0.0), limit)
    if clone < 0 or prev < 0:
        raise RequestError(400, f"cloned_sampler_id={clone} and prev_cursor={prev} must be "
                                ">= 0")
    services().submit.load_sampler(tenant(), sampler_id)  # the caller's, or 404
    store, deadline = services().store, time.monotonic() + wait
    with metrics.parked(), services().doorbell.listen(sampler_bell(sampler_id)) as rang:
        completions, cursor = completions_since(store, sampler_id, clone, prev)
        while not completions and (left := deadline - time.monotonic()) > 0:
            rang.wait(left)
            rang.clear()
            completions, cursor = completions_since(store, sampler_id, clone, prev)
    return {"completions": completions, "cursor": cursor}


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
        services().doorbell.ring(sampler_bell(row.sampler_id or ""))
    return {"cancelled": cancelled}
