"""API-key check: every /api/v1 call carries `X-API-Key: tml-...` (healthz excepted, and
the downloads of exported weights, whose signed URL is their permission).

The key is never stored; `g.tenant` is its hash (store.schema.tenant_of) and every lookup of a
client-named row filters on it, so another tenant's id answers 404 like a missing one.
"""

from __future__ import annotations

from flask import Flask, g, request

from protocol.errors import RequestError
from store.schema import tenant_of

OPEN_PATHS = frozenset({"/api/v1/healthz"})
OPEN_PREFIXES = ("/api/v1/downloads/",)


def _check_key() -> None:
    path = request.path
    if not path.startswith("/api/v1/") or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return
    key = request.headers.get("X-API-Key", "")
    if not key:
        raise RequestError(401, "missing X-API-Key header")
    if not key.startswith("tml-"):
        raise RequestError(401, "invalid API key: it must start with 'tml-'")
    g.tenant = tenant_of(key)


def init_app(app: Flask) -> None:
    app.before_request(_check_key)
