"""Who is calling: every /api/v1 and /v1 call carries `X-API-Key` (or, for the
OpenAI-compatible /v1, `Authorization: Bearer`), either an API key (`tml-...`) or
a JWT this API issued for one (`auth/token`); healthz and the downloads of exported weights
(whose signed URL is their permission) need neither.

The key is never stored; `g.tenant` is its hash (store.schema.tenant_of) and every lookup of
a client-named row filters on it, so another tenant's id answers 404 like a missing one.
Which keys are accepted is the `api_keys` setting: open = any `tml-` key is a tenant of its
own (gunicorn then listens on loopback only, app.keys.check_bind); keys = only the keys made
by `python -m app.keys create`. A revoked key (`tinker auth logout`, DELETE auth/apikey/me,
`python -m app.keys revoke`) is refused, and so are the JWTs issued for it: a JWT passes the
same check as its key, on every call.

JWTs (HS256 over the deployment's secret key, `JWT_LIFETIME_S`) carry the identity claims
the SDK reads for `whoami`: `sub` (tml:user:<tenant>), `org_id`, `email`. The SDK asks for
one when client/config sets `pjwt_auth_enabled`, sends it instead of the key, and swaps it
for a new one before it expires or when a 401 says `invalid_token`.
"""

from __future__ import annotations

import time

import jwt
from flask import Flask, g, request

from app.blueprints.common import services
from protocol.errors import RequestError
from store import keys
from store.schema import tenant_of
from store.sessions import owner_urn

OPEN_PATHS = frozenset({"/api/v1/healthz"})
OPEN_PREFIXES = ("/api/v1/downloads/",)
JWT_LIFETIME_S = 3600
ISSUER = "tinkerq"
ORG = "tinkerq"
_INVALID = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
UNKNOWN_KEY = ("unknown API key: this server accepts only the keys its operator made "
               "(`python -m app.keys create --name NAME`)")


def issue_token(tenant: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": owner_urn(tenant), "tenant": tenant, "org_id": ORG,
              "email": "", "iat": now, "exp": now + JWT_LIFETIME_S}
    return jwt.encode(claims, services().jwt_key, algorithm="HS256")


def _tenant_of_token(token: str) -> str:
    try:
        claims = jwt.decode(token, services().jwt_key, algorithms=["HS256"], issuer=ISSUER,
                            options={"require": ["exp", "iat", "tenant"]})
    except jwt.ExpiredSignatureError:
        raise RequestError(401, "the token has expired; exchange the API key for a new one "
                                "(auth/token)", _INVALID) from None
    except jwt.InvalidTokenError as e:
        raise RequestError(401, f"invalid token: {e}", _INVALID) from None
    return str(claims["tenant"])


def needs_key(path: str) -> bool:
    """Whether a call to `path` must carry a key (the spec's security says the same)."""
    return path.startswith(("/api/v1/", "/v1/")) and path not in OPEN_PATHS \
        and not path.startswith(OPEN_PREFIXES)


def _check_key() -> None:
    if not needs_key(request.path):
        return
    key = request.headers.get("X-API-Key", "")
    bearer = request.headers.get("Authorization", "")
    if not key and bearer.lower().startswith("bearer "):  # the OpenAI clients' way (/v1)
        key = bearer[7:].strip()
    if not key:
        raise RequestError(401, "missing X-API-Key header (or Authorization: Bearer <key>)")
    if key.startswith("tml-"):
        tenant = tenant_of(key)
    elif key.startswith("eyJ"):
        tenant = _tenant_of_token(key)
    else:
        raise RequestError(401, "invalid API key: it must start with 'tml-'")
    _check_standing(tenant)
    g.tenant = tenant


def _check_standing(tenant: str) -> None:
    row = keys.find(services().store, tenant)
    if row is not None and row.revoked_at is not None:
        raise RequestError(401, "this API key was revoked", _INVALID)
    if services().settings.api_keys == "keys" and (row is None or not row.registered):
        raise RequestError(401, UNKNOWN_KEY)


def init_app(app: Flask) -> None:
    app.before_request(_check_key)
