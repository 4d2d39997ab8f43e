"""The API-key registry: `python -m app.keys` (create / list / revoke, run as a real process
against the app's database), the api_keys modes (keys: registered keys only; open: any `tml-`
key) and the refusal to listen beyond loopback in the open mode."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jwt
import pytest
from sqlalchemy import select

from app import auth, gunicorn_conf
from app.keys import check_bind
from config import SettingsError, load_settings
from store import keys
from store.schema import ApiKeyRow, tenant_of
from tests.api.conftest import KEY, Api

ROOT = Path(__file__).resolve().parents[2]
REVOKED = "this API key was revoked"


@pytest.fixture
def database_url(request, tmp_path):
    """A SQLite file that the CLI's process opens too; `indirect` "postgres" for a server."""
    if getattr(request, "param", "sqlite") == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'keys.db'}"


@pytest.fixture
def mode() -> str:
    return "keys"


@pytest.fixture
def settings(settings, mode):
    return dataclasses.replace(settings, api_keys=mode)


@pytest.fixture
def cli(settings):
    """`python -m app.keys ARGS` in its own process, on the app's database."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TINKERQ_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"DATABASE_URL": settings.database, "TINKERQ_DATA_DIR": settings.data_dir,
            "TINKERQ_API_KEYS": settings.api_keys}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.keys", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    return run


def created(cli, name: str) -> str:
    done = cli("create", "--name", name)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("tml-") and "\n" not in key and "shown this once" in done.stderr
    return key


def as_key(app, key: str) -> Api:
    return Api(app.test_client(), key=key)


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_a_created_key_is_accepted_and_only_its_hash_is_stored(app, services, cli):
    key = created(cli, "alice")
    alice = as_key(app, key)
    assert alice.get("sessions").status_code == 200
    me = alice.get("auth/apikey/me").get_json()
    assert me["name"] == "alice"  # the CLI's row, not one made on first use
    with services.store.transaction() as s:
        rows = list(s.scalars(select(ApiKeyRow)))
    assert [(r.tenant, r.registered) for r in rows] == [(tenant_of(key), True)]
    assert all(key not in str(vars(r)) for r in rows)
    token = alice.ok("auth/token")["jwt"]
    assert as_key(app, token).get("sessions").status_code == 200


def test_a_name_is_unique_among_live_keys(cli):
    first = created(cli, "alice")
    again = cli("create", "--name", "alice")
    assert again.returncode == 2 and "a key named 'alice' exists" in again.stderr
    assert again.stdout == ""
    assert cli("revoke", "alice").returncode == 0
    assert created(cli, "alice") != first  # a revoked name may be used again


def test_list_shows_names_and_hash_prefixes_never_the_keys(cli, api):
    alice, bob = created(cli, "alice"), created(cli, "bob")
    assert cli("revoke", "bob").returncode == 0
    listing = cli("list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "KIND"] and len(lines) == 3
    assert lines[1].startswith("alice") and tenant_of(alice)[:12] in lines[1]
    assert lines[1].split()[1] == "registered" and " - " in lines[1]  # not revoked
    assert lines[2].startswith("bob") and tenant_of(bob)[:12] in lines[2] and " - " not in lines[2]
    for key in (alice, bob):
        assert key not in listing.stdout + listing.stderr
        assert key[4:16] not in listing.stdout


def test_a_keys_own_quotas_are_set_listed_and_reset(cli, settings, services):
    carol = cli("create", "--name", "carol", "--max-pending", "5").stdout.strip()
    done = cli("limit", "carol", "--max-models", "2")
    assert done.returncode == 0 and "max_models=2, max_pending=5" in done.stdout, done.stderr
    row = keys.find(services.store, tenant_of(carol))
    assert row is not None and (row.max_models, row.max_pending) == (2, 5)
    assert cli("limit", "carol", "--max-pending", "default").returncode == 0
    line = cli("list").stdout.splitlines()[1]
    assert line.startswith("carol") and line.split()[-3:] == [
        "2", str(settings.max_pending_per_tenant), "(default)"]
    for bad, says in ((["--max-models", "many"], "neither a count nor 'default'"),
                      (["--max-pending", "-1"], "must be between 0"), ([], "name a limit")):
        done = cli("limit", "carol", *bad)
        assert done.returncode == 2 and says in done.stderr, done.stderr


def test_revoke_by_name_or_hash_prefix_refuses_the_key_and_its_tokens(app, cli):
    alice, bob = created(cli, "alice"), created(cli, "bob")
    alice_token = as_key(app, alice).ok("auth/token")["jwt"]
    done = cli("revoke", "alice")
    assert done.returncode == 0 and tenant_of(alice)[:12] in done.stdout
    assert cli("revoke", tenant_of(bob)[:8]).returncode == 0
    for key in (alice, alice_token, bob):
        resp = as_key(app, key).get("sessions")
        assert resp.status_code == 401 and resp.get_json()["detail"] == REVOKED
    assert as_key(app, alice).post("auth/token").status_code == 401


def test_revoke_names_what_it_cannot_find(cli):
    created(cli, "alice")
    for which in ("carol", "abc"):  # no such name; a hash prefix too short to trust
        done = cli("revoke", which)
        assert done.returncode == 2 and f"no key is named {which!r}" in done.stderr


def test_keys_mode_refuses_an_unknown_key_and_says_how_to_get_one(app, api, services):
    resp = api.get("sessions")
    assert resp.status_code == 401
    assert resp.get_json()["detail"] == auth.UNKNOWN_KEY
    assert "python -m app.keys create --name NAME" in auth.UNKNOWN_KEY
    # A row the open mode made for the key (registered=False), or a JWT issued for it while
    # the server was open, does not make it known.
    keys.known(services.store, tenant_of(KEY))
    assert api.get("sessions").status_code == 401
    now = int(time.time())
    claims = {"iss": auth.ISSUER, "tenant": tenant_of(KEY), "iat": now, "exp": now + 60}
    token = jwt.encode(claims, services.jwt_key, algorithm="HS256")
    resp = as_key(app, token).get("sessions")
    assert resp.status_code == 401 and resp.get_json()["detail"] == auth.UNKNOWN_KEY


@pytest.mark.parametrize("mode", ["open"])
def test_open_mode_accepts_any_tml_key(app, api, other, cli):
    assert api.get("sessions").status_code == 200
    assert other.get("sessions").status_code == 200
    assert as_key(app, created(cli, "alice")).get("sessions").status_code == 200
    assert api.delete("auth/apikey/me").status_code == 200  # still revocable, by its holder
    assert api.get("sessions").get_json()["detail"] == REVOKED
    assert other.get("sessions").status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST"])
def test_loopback_is_allowed_in_open_mode(host):
    check_bind(host, load_settings(env={}))  # raises if refused


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "tinker.example.com"])
def test_other_addresses_need_the_keys_mode(host):
    with pytest.raises(SettingsError, match="api_keys=open accepts any tml- key"):
        check_bind(host, load_settings(env={}))
    check_bind(host, load_settings(env={"TINKERQ_API_KEYS": "keys"}))


def test_the_mode_setting_is_checked():
    with pytest.raises(SettingsError, match="api_keys='closed' must be one of open, keys"):
        load_settings(env={"TINKERQ_API_KEYS": "closed"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gunicorn_refuses_to_listen_on_every_address_in_open_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKERQ_")}
    env |= {"TINKERQ_HOST": "0.0.0.0", "TINKERQ_PORT": str(free_port()),
            "TINKERQ_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--config", "app/gunicorn_conf.py",
         "app.factory:create_app()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "refusing to listen on '0.0.0.0': api_keys=open" in done.stderr
    assert "Listening at" not in done.stderr  # refused before binding


@pytest.mark.parametrize(("mode", "refused"), [("open", True), ("keys", False)])
def test_the_gunicorn_hook_checks_every_bound_address(monkeypatch, mode, refused):
    monkeypatch.setenv("TINKERQ_API_KEYS", mode)
    server = SimpleNamespace(cfg=SimpleNamespace(bind=["127.0.0.1:8000", "unix:/tmp/t.sock",
                                                       "[::]:8001"]))
    if refused:
        with pytest.raises(RuntimeError, match="refusing to listen on '::'"):
            gunicorn_conf.check_binds(server.cfg.bind)
    else:
        gunicorn_conf.check_binds(server.cfg.bind)  # keys mode: every address is allowed
