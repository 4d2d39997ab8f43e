"""The one error handler: every error answers JSON `{"detail": ...}`; a refused call is a
`protocol.errors.RequestError`, answered with its status.

The SDK treats an empty 4xx body as a proxy rejection and retries it as a connection error,
so no error path may answer HTML or an empty body (protocol note §1.4).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from protocol.errors import RequestError

log = logging.getLogger(__name__)


def _answer(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"detail": message}), status


def init_app(app: Flask) -> None:
    @app.errorhandler(RequestError)
    def _api_error(e: RequestError) -> tuple[Response, int]:
        return _answer(e.status, e.message)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> tuple[Response, int]:
        return _answer(e.code or 500, e.description or e.name)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return _answer(500, f"internal server error: {type(e).__name__}")
