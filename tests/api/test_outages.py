"""What the API and the worker's sweep do when a part of the service is away: a database
that does not answer is a 503 (which the SDK retries), a call whose worker is gone fails
after worker_lost_s instead of waiting for ever, and a call whose message was lost is sent
again. The stack-level faults (kill -9, restarts) are in tests/e2e/test_chaos.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

import pytest
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker
from tinker.types.request_failed_response import RequestFailedResponse
from tinker.types.try_again_response import TryAgainResponse

from app.factory import create_app
from store import workers
from store.engine import make_engine
from store.schema import RequestRow, WorkerRow, utcnow
from tasks.housekeeping import _Watch
from tests.api.conftest import Api, create_model_body


def backdate(services, request_id: str, seconds: float) -> None:
    with services.store.transaction() as s:
        s.execute(update(RequestRow).where(RequestRow.id == request_id).values(
            created_at=utcnow() - dt.timedelta(seconds=seconds)))


@pytest.fixture
def lost_api(settings, enqueued):
    app = create_app(dataclasses.replace(settings, worker_lost_s=60.0), enqueue=enqueued.append)
    yield Api(app.test_client()), app.extensions["tinkerq"]
    app.extensions["tinkerq"].doorbell.close()


def test_a_call_whose_worker_is_gone_fails_instead_of_waiting_for_ever(lost_api, session_id):
    api, services = lost_api
    young = api.ok("create_model", create_model_body(session_id, seq=0))["request_id"]
    old = api.ok("create_model", create_model_body(session_id, seq=1))["request_id"]
    backdate(services, old, 120)
    poll = {"allow_metadata_only": True}
    assert TryAgainResponse.model_validate(
        api.ok("retrieve_future", poll | {"request_id": young}))
    failed = RequestFailedResponse.model_validate(
        api.ok("retrieve_future", poll | {"request_id": old}))
    assert failed.category == "server"
    assert "no worker of queue 'gpu-0' has ever been seen" in failed.error
    assert "worker_lost_s=60" in failed.error


def test_a_live_worker_keeps_its_old_calls_waiting(lost_api, session_id):
    api, services = lost_api
    request_id = api.ok("create_model", create_model_body(session_id))["request_id"]
    backdate(services, request_id, 3600)
    with services.store.transaction() as s:
        workers.beat(s, "gpu-0@host:1", "gpu-0", "host", 1, "tiny")
    answer = api.ok("retrieve_future", {"request_id": request_id, "allow_metadata_only": True})
    assert TryAgainResponse.model_validate(answer)
    with services.store.transaction() as s:  # the worker's last beat is now too old
        s.execute(update(WorkerRow).values(
            heartbeat_at=utcnow() - dt.timedelta(seconds=90)))
    answer = api.ok("retrieve_future", {"request_id": request_id, "allow_metadata_only": True})
    error = RequestFailedResponse.model_validate(answer).error
    assert re.search(r"was last seen 9\d s ago", error), error


def test_a_database_that_does_not_answer_is_a_503_the_sdk_retries(api, services, session_id):
    request_id = api.ok("create_model", create_model_body(session_id))["request_id"]
    services.store.engine = make_engine("postgresql://postgres@127.0.0.1:9/nowhere")
    services.store.sessions = sessionmaker(services.store.engine, expire_on_commit=False)
    for resp in (api.post("retrieve_future", {"request_id": request_id}),
                 api.post("create_model", create_model_body(session_id, seq=1))):
        assert resp.status_code == 503, resp.get_json()
        assert resp.headers["Retry-After"] == "1"
        assert "database is unavailable" in resp.get_json()["detail"]


def test_the_sweep_sends_again_only_calls_whose_message_is_lost(api, services, session_id,
                                                                settings):
    ids = [api.ok("create_model", create_model_body(session_id, seq=n))["request_id"]
           for n in range(3)]
    for request_id in ids[:2]:
        backdate(services, request_id, settings.resend_after_s + 5)
    sent, depth = [], [1]
    watch = _Watch(services.store, settings, held=lambda: {ids[1]},
                   resend=lambda *row: sent.append(row), queue_depth=lambda: depth[0])
    assert watch.sweep() == 0  # messages still wait in the broker: nothing is lost yet
    depth[0] = 0
    assert watch.sweep() == 1  # ids[1] is running in this worker; ids[2] is young
    assert sent == [(ids[0], "create_model", sent[0][2], settings.queue)]
    assert watch.sweep() == 0  # sent once per resend_after_s, not at every sweep
    watch.beat()
    with services.store.transaction() as s:
        assert workers.last_seen(s, settings.queue) is not None
