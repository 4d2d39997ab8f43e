"""retrieve_future: immediate results, protobuf results, failures, try_again after the
window, and a prompt wake-up through the doorbell."""

from __future__ import annotations

import threading
import time

import pytest
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.types.request_failed_response import RequestFailedResponse
from tinker.types.try_again_response import TryAgainResponse

from protocol.wire import WireSequence, encode_sample_response
from tests.api.conftest import ALIAS, create_model_body


@pytest.fixture
def request_id(api, session_id):
    return api.ok("create_model", create_model_body(session_id, seq=5))["request_id"]


def poll(api, request_id):
    return api.post("retrieve_future", {"request_id": request_id, "allow_metadata_only": True})


def test_pending_answers_try_again_after_the_window(api, request_id, settings):
    start = time.monotonic()
    resp = poll(api, request_id)
    elapsed = time.monotonic() - start
    assert resp.status_code == 200
    answer = TryAgainResponse.model_validate(resp.get_json())
    assert answer.request_id == request_id and answer.queue_state == "active"
    assert settings.long_poll_seconds <= elapsed < settings.long_poll_seconds + 1.5


def test_done_json_answers_at_once(api, request_id, finish):
    finish(request_id, {"model_id": "m", "type": "create_model"})
    start = time.monotonic()
    resp = poll(api, request_id)
    assert time.monotonic() - start < 0.3
    assert types.CreateModelResponse.model_validate(resp.get_json()).model_id == "m"


def test_done_proto_answers_bytes(api, request_id, finish):
    blob = encode_sample_response(
        [WireSequence(tokens=[1, 2], logprobs=[-0.5, -0.1], stop_reason="length")]
    )
    finish(request_id, proto=blob)
    resp = poll(api, request_id)
    assert resp.status_code == 200 and resp.mimetype == "application/x-protobuf"
    assert resp.data == blob
    msg = pb.SampleResponse()
    msg.ParseFromString(resp.data)
    assert len(msg.sequences) == 1


def test_failed_answers_error_and_category(api, request_id, finish):
    finish(request_id, error="rank too large", category="user")
    answer = poll(api, request_id).get_json()
    assert answer == {"error": "rank too large", "category": "user"}
    RequestFailedResponse.model_validate(answer)


def test_doorbell_wakes_the_poll(app, api, request_id, finish, services):
    services.settings.__dict__["long_poll_seconds"] = 5.0  # frozen dataclass; test-only
    timer = threading.Timer(0.3, finish, args=(request_id, {"model_id": "m"}))
    start = time.monotonic()
    timer.start()
    try:
        resp = poll(api, request_id)
    finally:
        timer.join()
    elapsed = time.monotonic() - start
    assert resp.get_json() == {"model_id": "m"}
    assert 0.25 < elapsed < 2.0


def test_unknown_or_foreign_future_is_404(api, other, request_id):
    assert poll(other, request_id).status_code == 404
    resp = poll(api, "req-doesnotexist")
    assert resp.status_code == 404 and "req-doesnotexist" in resp.get_json()["detail"]
    assert api.post("retrieve_future", {}).status_code == 400


def test_cancel_future_ends_a_pending_sample_only(api, other, services, session_id, model_id,
                                                  finish):
    """A pending sample ends failed (user) and its poller is answered; a finished one is left
    as it is; a training call is a 400; another key's or an unknown id a 404."""
    from tests.api.test_sampling import sample_body

    sampler = api.ok("create_sampling_session", {"session_id": session_id,
                                                 "sampling_session_seq_id": 0,
                                                 "base_model": ALIAS})["sampling_session_id"]
    pending = api.ok("asample", sample_body(sampler))["request_id"]
    assert other.post("cancel_future", {"request_id": pending}).status_code == 404
    assert api.ok("cancel_future", {"request_id": pending}) == {"cancelled": True}
    answer = api.ok("retrieve_future", {"request_id": pending})
    assert answer["category"] == "user" and "cancelled" in answer["error"]
    done = api.ok("asample", sample_body(sampler, seq_id=1))["request_id"]
    finish(done, proto=b"")
    assert api.ok("cancel_future", {"request_id": done}) == {"cancelled": False}
    train = api.ok("optim_step", {"model_id": model_id, "seq_id": 1, "adam_params": {
        "learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}})["request_id"]
    resp = api.post("cancel_future", {"request_id": train})
    assert resp.status_code == 400 and "only sample" in resp.get_json()["detail"]
    assert api.post("cancel_future", {"request_id": "req-nope"}).status_code == 404
