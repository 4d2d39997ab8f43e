"""One log setup for every process (web, worker): plain text, or with log_format=json one
JSON object per line (python-json-logger) with `time`, `level`, `logger`, `message`, the
process's role, and the fields a call adds.

Every line logged while a call is served carries its `request_id` (the future's id, the
same from the API's access line through the Celery task to the engine's tick line):
`REQUEST_ID` holds it for the code running the call (a context variable: each thread and
greenlet its own), and the lines that speak of several calls (a tick) name them in
`request_ids`.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("tinkerq_request_id", default=None)
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(role)s] %(name)s: %(message)s%(call)s"


class _Call(logging.Filter):
    """Adds the call being served (`request_id`) and the process's role to every record."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        record.request_id = request_id
        record.role = self.role
        record.call = f" [{request_id}]" if request_id else ""
        return True


def formatter(log_format: str) -> logging.Formatter:
    if log_format != "json":
        return logging.Formatter(TEXT_FORMAT)
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(["asctime", "levelname", "name", "role", "message", "request_id"],
                         rename_fields={"asctime": "time", "levelname": "level",
                                        "name": "logger"},
                         reserved_attrs=[*RESERVED_ATTRS, "taskName", "call"])


def setup(log_format: str, role: str, level: int = logging.INFO) -> None:
    """Send every logger's records (the root's handlers) to stderr in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(_Call(role))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)

