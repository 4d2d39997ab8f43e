"""The one API error type and the one handler: every error answers JSON `{"detail": ...}`.

The SDK treats an empty 4xx body as a proxy rejection and retries it as a connection error,
so no error path may answer HTML or an empty body (protocol note §1.4).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error with a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _answer(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"detail": message}), status


def init_app(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError) -> tuple[Response, int]:
        return _answer(e.status, e.message)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> tuple[Response, int]:
        return _answer(e.code or 500, e.description or e.name)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return _answer(500, f"internal server error: {type(e).__name__}")
