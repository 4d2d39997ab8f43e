"""Backpressure per API key and per worker queue: past max_pending_per_tenant unanswered
calls, or max_pending_per_queue in one queue, a new call gets 429 with Retry-After (the
SDK waits and sends it again); a call already accepted, sent again, is answered as before;
other keys are not held back by one key's backlog; answered calls free their places."""

from __future__ import annotations

import dataclasses

import pytest

from app.factory import create_app
from store import keys
from store.schema import tenant_of
from tests.api.conftest import Api, create_model_body, new_session


@pytest.fixture
def tight(settings, enqueued):
    app = create_app(dataclasses.replace(settings, max_pending_per_tenant=3,
                                         max_pending_per_queue=5), enqueue=enqueued.append)
    yield app, app.extensions["tinkerq"]
    app.extensions["tinkerq"].doorbell.close()


def test_a_keys_backlog_gets_429_until_its_calls_are_answered(tight, finish):
    app, _ = tight
    api = Api(app.test_client())
    session = new_session(api)
    ids = [api.ok("create_model", create_model_body(session, n))["request_id"] for n in range(3)]
    resp = api.post("create_model", create_model_body(session, 3))
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "1"
    assert "max_pending_per_tenant=3" in resp.get_json()["detail"]
    # the same call sent again (the SDK's retry of an accepted call) is answered as before
    assert api.ok("create_model", create_model_body(session, 0))["request_id"] == ids[0]
    finish(ids[0], {"model_id": "x"})
    api.ok("create_model", create_model_body(session, 3))


def test_a_full_queue_gets_429_for_everyone(tight):
    app, _ = tight
    keys = [Api(app.test_client(), key=f"tml-quota-{i}") for i in range(3)]
    sessions = [new_session(k) for k in keys]
    for k, s in zip(keys[:2], sessions[:2], strict=True):  # 3 + 2 calls: the queue holds 5
        for n in range(3 if k is keys[0] else 2):
            k.ok("create_model", create_model_body(s, n))
    resp = keys[2].post("create_model", create_model_body(sessions[2], 0))
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
    assert "max_pending_per_queue=5" in resp.get_json()["detail"]


def test_a_keys_own_limits_replace_the_deployments(settings, enqueued, services):
    """`python -m app.keys limit` (store.keys.set_limits): one key may have more pending
    calls, or fewer live runs, than the settings give the others; "default" goes back."""
    # max_pending_per_tenant=3; the tests' max_models_per_tenant is 4
    app = create_app(dataclasses.replace(settings, max_pending_per_tenant=3),
                     enqueue=enqueued.append)
    big, small = Api(app.test_client(), key="tml-quota-big"), Api(app.test_client())
    tenant = keys.known(services.store, tenant_of("tml-quota-big")).tenant
    keys.set_limits(services.store, tenant, {"max_pending": 4, "max_models": 8})
    session = new_session(big)
    for n in range(4):  # past the deployment's 3 pending, within its own 4
        big.ok("create_model", create_model_body(session, n))
    resp = big.post("create_model", create_model_body(session, 4))
    assert resp.status_code == 429 and "its own max_pending=4" in resp.get_json()["detail"]
    keys.set_limits(services.store, tenant, {"max_pending": 8, "max_models": 4})
    resp = big.post("create_model", create_model_body(session, 4))  # a fifth live run
    assert resp.status_code == 429 and "its own max_models=4" in resp.get_json()["detail"]
    keys.set_limits(services.store, tenant, {"max_models": 5})
    big.ok("create_model", create_model_body(session, 4))
    keys.set_limits(services.store, tenant, {"max_models": None, "max_pending": None})
    resp = big.post("create_model", create_model_body(session, 5))
    assert "max_models_per_tenant=4" in resp.get_json()["detail"]  # the deployment's again
    other = new_session(small)  # the other key kept the deployment's limits throughout
    for n in range(3):
        small.ok("create_model", create_model_body(other, n))
    resp = small.post("create_model", create_model_body(other, 3))
    assert resp.status_code == 429 and "max_pending_per_tenant=3" in resp.get_json()["detail"]
    app.extensions["tinkerq"].doorbell.close()
