"""The API's access log: one line per HTTP request (logger `tinkerq.access`), with its
method, route, status and time, and the call it is about: the `request_id` of the future
it created (a submitted call) or asked about (retrieve_future, cancel_future), which the
worker's lines of that call carry too (config/logs.py). A client's `X-Request-ID` is kept
(else one is made) and sent back, so a proxy's log lines join these."""

from __future__ import annotations

import logging
import time
import uuid

from flask import Flask, Response, g, request

from config import logs

log = logging.getLogger("tinkerq.access")
SMALL = 64 << 10  # JSON answers up to this size are read for the request_id they carry


def _start() -> None:
    g.access_started = time.perf_counter()
    g.http_id = request.headers.get("X-Request-ID", "")[:128] or uuid.uuid4().hex


def _call_of(response: Response) -> str | None:
    """The future this HTTP request created or asked about."""
    if response.is_json and (response.content_length or SMALL + 1) <= SMALL:
        answer = response.get_json(silent=True)
        if isinstance(answer, dict) and isinstance(answer.get("request_id"), str):
            return answer["request_id"]
    body = g.get("json_body")  # as the route read it (app/blueprints/common.json_body)
    if isinstance(body, dict) and isinstance(body.get("request_id"), str):
        return body["request_id"][:128]
    return logs.REQUEST_ID.get()


def _finish(response: Response) -> Response:
    http_id = g.get("http_id")
    if http_id is None:
        return response
    response.headers["X-Request-ID"] = http_id
    seconds = time.perf_counter() - g.pop("access_started")
    route = request.url_rule.rule if request.url_rule is not None else request.path[:200]
    call = _call_of(response)
    log.info("%s %s %d %.1f ms", request.method, route, response.status_code, 1000 * seconds,
             extra={"request_id": call, "http_request_id": http_id, "method": request.method,
                    "route": route, "status": response.status_code,
                    "duration_ms": round(1000 * seconds, 3)})
    return response


def init_app(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_finish)
