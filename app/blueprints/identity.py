"""Identity: auth/token (a JWT for the caller's key, which the SDK then sends instead of the
key, app/auth.py) and auth/apikey/me, which `tinker auth login` reads to check a pasted key
and `tinker auth logout` deletes to revoke it."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from app.auth import ORG, issue_token
from app.blueprints.common import services, tenant
from store import keys

bp = Blueprint("identity", __name__)


@bp.post("/auth/token")
def auth_token() -> dict[str, Any]:
    return {"jwt": issue_token(tenant())}


@bp.get("/auth/apikey/me")
def my_key() -> dict[str, Any]:
    row = keys.known(services().store, tenant())
    return {
        "key_id": row.id,
        "name": row.name,
        "note": row.note,
        "details": {"org_details": {"name": ORG}, "user_details": {"email": ""}},
    }


@bp.delete("/auth/apikey/me")
def revoke_my_key() -> dict[str, Any]:
    """Revoke the key this call carries (never another): every later call with it, or with
    a JWT issued for it, gets 401."""
    keys.revoke(services().store, tenant())
    return {}
