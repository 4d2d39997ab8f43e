"""The one error handler: every error answers JSON `{"detail": ...}`; a refused call is a
`protocol.errors.RequestError`, answered with its status.

The SDK treats an empty 4xx body as a proxy rejection and retries it as a connection error,
so no error path may answer HTML or an empty body (protocol note §1.4).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from sqlalchemy.exc import DataError
from werkzeug.exceptions import HTTPException

from protocol.errors import RequestError
from store.db import UNAVAILABLE

log = logging.getLogger(__name__)


def _answer(status: int, message: str) -> tuple[Response, int]:
    if request.path.startswith("/v1/"):  # the OpenAI-compatible API: OpenAI's error shape
        kind = "invalid_request_error" if status < 500 else "server_error"
        return jsonify({"error": {"message": message, "type": kind, "code": status}}), status
    return jsonify({"detail": message}), status


def _check_url() -> None:
    """No column, path or id takes a NUL character: refuse one in the URL at once."""
    if "\x00" in request.path or any("\x00" in k + v for k, v in request.args.items()):
        raise RequestError(400, "the URL holds a NUL character")


def init_app(app: Flask) -> None:
    app.before_request(_check_url)

    @app.errorhandler(DataError)
    def _data_error(e: DataError) -> tuple[Response, int]:
        # the checks should have refused it first; this keeps a missed one a 4xx
        log.warning("value refused by the database: %s", e.orig)
        first = str(e.orig).strip().splitlines()[0] if e.orig else "value out of range"
        return _answer(400, f"a value does not fit its column: {first}")

    def _database_away(e: Exception) -> tuple[Response, int]:
        # a restart or an outage: answered 503, which the SDK retries, never 500
        log.warning("the database is away: %s", str(e).strip().splitlines()[0][:300])
        response, status = _answer(503, "the database is unavailable for the moment; retry")
        response.headers["Retry-After"] = "1"
        return response, status

    for kind in UNAVAILABLE:
        app.register_error_handler(kind, _database_away)

    @app.errorhandler(RequestError)
    def _api_error(e: RequestError) -> tuple[Response, int]:
        response, status = _answer(e.status, e.message)
        response.headers.update(e.headers)
        return response, status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> tuple[Response, int]:
        return _answer(e.code or 500, e.description or e.name)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return _answer(500, f"internal server error: {type(e).__name__}")
