"""auth/token and the JWTs it issues, auth/apikey/me (GET, DELETE), revoked keys."""

from __future__ import annotations

import time

import jwt
import pytest

from app import auth
from tests.api.conftest import Api


def bearer(app, token: str) -> Api:
    return Api(app.test_client(), key=token)


def test_a_token_stands_for_its_key(api, other, app, session_id):
    token = api.ok("auth/token")["jwt"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"].startswith("tml:user:") and claims["org_id"] == "tinkerq"
    assert claims["exp"] - claims["iat"] == auth.JWT_LIFETIME_S
    as_token = bearer(app, token)
    assert as_token.get(f"sessions/{session_id}").status_code == 200  # the key's own session
    assert other.get(f"sessions/{session_id}").status_code == 404
    refreshed = as_token.ok("auth/token")["jwt"]  # a token may be swapped for a new one
    assert bearer(app, refreshed).get(f"sessions/{session_id}").status_code == 200


@pytest.mark.parametrize("what", ["forged", "expired", "foreign issuer"])
def test_a_bad_token_is_a_401_the_sdk_replaces(app, services, what):
    now = int(time.time())
    claims = {"iss": "tinkerq", "tenant": "t", "iat": now, "exp": now + 60}
    key = services.jwt_key
    if what == "forged":
        key = "not-the-deployment-s-key-but-32-bytes-long"
    elif what == "expired":
        claims |= {"iat": now - 120, "exp": now - 60}
    else:
        claims["iss"] = "someone-else"
    resp = bearer(app, jwt.encode(claims, key, algorithm="HS256")).get("sessions")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert ("expired" if what == "expired" else "invalid token") in resp.get_json()["detail"]


def test_apikey_me_describes_and_revokes_the_key_it_carries(api, other, app, session_id):
    me = api.get("auth/apikey/me").get_json()
    assert me["key_id"] >= 1 and me["name"].startswith("key-")
    assert me["details"]["org_details"]["name"] == "tinkerq"
    assert api.get("auth/apikey/me").get_json() == me  # the same row each time
    token = api.ok("auth/token")["jwt"]
    assert api.delete("auth/apikey/me").status_code == 200
    for caller in (api, bearer(app, token)):
        resp = caller.get(f"sessions/{session_id}")
        assert resp.status_code == 401 and "revoked" in resp.get_json()["detail"]
    assert api.post("auth/token").status_code == 401  # no new token for a revoked key
    assert other.get("sessions").status_code == 200  # only the key itself is revoked
    assert other.get("auth/apikey/me").get_json()["key_id"] != me["key_id"]
