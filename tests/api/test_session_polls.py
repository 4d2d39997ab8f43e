"""retrieve_futures (one long-poll per sampling client), join_sampling_session (clone ids)
and the sampling backpressure header, on the API with the real store and doorbell."""

from __future__ import annotations

import threading
import time

import pytest
from tinker import types

from tests.api.test_sampling import sample_body, sampler_id  # noqa: F401 - a fixture

BLOCK = 1_000_000_000


def poll(api, sampler: str, prev: int = 0, clone: int = 0, timeout: float | None = 0):
    body = {"target": {"type": "sampling_session", "sampling_session_id": sampler,
                       "cloned_sampler_id": clone},
            "prev_cursor": prev, "retrieved_request_ids": []}
    if timeout is not None:
        body["timeout"] = timeout
    return types.FuturesRetrieveResponse.model_validate(api.ok("retrieve_futures", body))


def ids(answer) -> list[str]:
    return sorted(c.request_id for c in answer.completions)


def test_completions_are_reported_until_a_poll_confirms_them(api, sampler_id, finish):  # noqa: F811
    a, b, c = (api.ok("asample", sample_body(sampler_id, n))["request_id"] for n in range(3))
    empty = poll(api, sampler_id)
    assert empty.completions == [] and empty.cursor == 0
    finish(a, proto=b"\x01\x02\x03")
    finish(b, error="bad prompt")
    first = poll(api, sampler_id)
    assert ids(first) == sorted([a, b]) and first.cursor == 1
    by_id = {x.request_id: x for x in first.completions}
    assert isinstance(by_id[a], types.FutureFinished)
    assert by_id[a].response_payload_uncompressed_size == 3
    assert isinstance(by_id[b], types.FutureFailed)
    lost = poll(api, sampler_id, prev=0)  # the first answer never arrived: sent again
    assert ids(lost) == sorted([a, b]) and lost.cursor == 1
    assert poll(api, sampler_id, prev=1).completions == []  # seen: never again
    finish(c, proto=b"\x01")
    again = poll(api, sampler_id, prev=1)
    assert ids(again) == [c] and again.cursor == 2
    resend = poll(api, sampler_id, prev=0)  # every unconfirmed answer, and nothing new
    assert ids(resend) == sorted([a, b, c]) and resend.cursor == 2


def test_a_poll_waits_for_the_next_completion(api, sampler_id, finish, services):  # noqa: F811
    """The worker's ring on the session's bell ends the wait, not the long-poll's end."""
    object.__setattr__(services.settings, "long_poll_seconds", 10.0)
    rid = api.ok("asample", sample_body(sampler_id, 0))["request_id"]
    timer = threading.Timer(0.2, finish, args=(rid,), kwargs={"proto": b"\x01"})
    start = time.monotonic()
    timer.start()
    answer = poll(api, sampler_id, timeout=None)
    timer.join()
    assert ids(answer) == [rid] and time.monotonic() - start < 5


def test_clones_poll_their_own_block(api, sampler_id, finish, other):  # noqa: F811
    joined = [api.ok("join_sampling_session", {"sampling_session_id": sampler_id})
              for _ in range(2)]
    assert [types.JoinSamplingSessionResponse.model_validate(j).client_counter
            for j in joined] == [1, 2]
    mine = api.ok("asample", sample_body(sampler_id, 0))["request_id"]
    clone = api.ok("asample", sample_body(sampler_id, 2 * BLOCK + 5))["request_id"]
    finish(mine, proto=b"\x01")
    finish(clone, proto=b"\x01")
    assert ids(poll(api, sampler_id, clone=0)) == [mine]
    assert ids(poll(api, sampler_id, clone=2)) == [clone]
    assert poll(api, sampler_id, clone=1).completions == []
    body = {"target": {"sampling_session_id": sampler_id}, "prev_cursor": 0, "timeout": 0}
    assert other.post("retrieve_futures", body).status_code == 404
    resp = other.post("join_sampling_session", {"sampling_session_id": sampler_id})
    assert resp.status_code == 404
    bad = api.post("retrieve_futures", body | {"prev_cursor": -1})
    assert bad.status_code == 400 and "prev_cursor=-1" in bad.get_json()["detail"]


@pytest.mark.parametrize("header", [True, False])
def test_backpressure_answers_429_past_the_pending_limit(api, sampler_id, services,  # noqa: F811
                                                         header):
    object.__setattr__(services.settings, "sample_max_pending", 2)
    headers = {"X-Tinker-Sampling-Backpressure": "1"} if header else {}
    for n in range(2):
        assert api.post("asample", sample_body(sampler_id, n), headers=headers).status_code == 200
    resp = api.post("asample", sample_body(sampler_id, 2), headers=headers)
    if not header:  # a client that does not back off is never refused
        assert resp.status_code == 200
        return
    assert resp.status_code == 429 and "sample_max_pending=2" in resp.get_json()["detail"]
    resent = api.post("asample", sample_body(sampler_id, 1), headers=headers)
    assert resent.status_code == 200  # a resubmission is answered with its first future
