"""The one error type of a refused call, shared by every way in (REST and batch scripts).

`status` is the HTTP status REST answers with (400 bad input, 404 not found or not the
caller's, 503 not ready yet); the message names the bad value and the limit. A batch script
sees the same message as a ValueError.
"""

from __future__ import annotations


class RequestError(Exception):
    """A call refused before anything is stored, with a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}  # e.g. WWW-Authenticate on a 401, Retry-After on a 429


def bad(message: str) -> RequestError:
    """Bad input: 400."""
    return RequestError(400, message)
