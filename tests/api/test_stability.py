"""stable_reinforce at the edge: recorded samples, provenance checked against the record, the
sampler's own log-probs written into the stored call, and every bad id or span a 400."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from sqlalchemy import update
from tinker import types

from protocol.wire import WireSequence, decode_forward_backward, encode_sample_response
from store.schema import RequestRow, utcnow
from tests.api.conftest import ALIAS, new_session
from tests.api.test_sampling import sample_body
from tests.api.test_training import PROTO, fwdbwd_body

PROMPT, SAMPLED = [1, 2, 3], [5, 6, 7]
RECORDED = [-0.5, -1.25, -2.0]  # the sampler's log-probs of SAMPLED


@pytest.fixture
def recorded(api, session_id, finish):
    """Two sequences sampled with record_stability_info=True in the run's session."""
    sampler = api.ok("create_sampling_session", {"session_id": session_id,
                                                 "sampling_session_seq_id": 0,
                                                 "base_model": ALIAS})["sampling_session_id"]
    answer = api.ok("asample", sample_body(sampler) | {"record_stability_info": True})
    finish(answer["request_id"], proto=encode_sample_response(
        [WireSequence(SAMPLED, RECORDED, "length"), WireSequence([8, 9, 10], RECORDED, "length")]))
    return answer["sample_sequence_ids"]


def rl_datum(sequence_id: str, tokens=None, advantage: float = 1.0,
             prompt_advantage: float = 0.0) -> types.Datum:
    """rl_loop's single-turn datum: input prompt + sampled[:-1], targets shifted by one."""
    full = PROMPT + (tokens or SAMPLED)
    n = len(full) - 1
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            # over the prompt the cookbook sends 0s: they carry no loss and are not checked
            "target_tokens": np.asarray([0, 0] + full[3:], dtype=np.int64),
            "logprobs": np.full(n, -9.0, dtype=np.float32),  # the client's copy: replaced
            "advantages": np.asarray([prompt_advantage] * 2 + [advantage] * 3,
                                     dtype=np.float32),
        })
    return datum.with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id=sequence_id, length=3),
                     types.SampledProvenanceSpan(sequence_id=sequence_id, length=2)],
        loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=sequence_id, offset=1, length=2),
                        types.SampledProvenanceSpan(sequence_id=sequence_id, length=3)])


def post(api, model_id, data, seq_id=1):
    return api.post("forward_backward", fwdbwd_body(model_id, seq_id, data, "stable_reinforce"),
                    headers=PROTO)


def test_recorded_logprobs_and_the_sampled_mask_are_stored(api, model_id, recorded, enqueued,
                                                           services):
    resp = post(api, model_id, [rl_datum(recorded[0])])
    assert resp.status_code == 200, resp.get_json()
    stored = decode_forward_backward(enqueued[-1].payload)
    inputs = stored.data[0].inputs
    np.testing.assert_array_equal(inputs["sampled_mask"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(inputs["logprobs"], [-9.0, -9.0] + RECORDED)
    with services.store.transaction() as s:  # the use pushed the record's day on
        row = s.get(RequestRow, recorded[0].rsplit(":", 1)[0])
        assert row.stability_expires_at > utcnow() + dt.timedelta(hours=23)


def expire(services, sequence_id):
    with services.store.transaction() as s:
        s.execute(update(RequestRow).where(RequestRow.id == sequence_id.rsplit(":", 1)[0])
                  .values(stability_expires_at=utcnow() - dt.timedelta(seconds=1)))


@pytest.mark.parametrize("case, needle", [
    ("no provenance", "carries no provenance"),
    ("unknown id", "is unknown in session"),
    ("foreign format", "is not one this server gave out"),
    ("index past the call", "names sample 5"),
    ("tokens differ", "names token 5"),
    ("advantage on the prompt", "prompt token"),
    ("expired", "expired at"),
])
def test_bad_provenance_is_a_400_naming_it(api, model_id, recorded, services, case, needle):
    data = {
        "no provenance": lambda: [types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                                              loss_fn_inputs=rl_datum(recorded[0])
                                              .loss_fn_inputs)],
        "unknown id": lambda: [rl_datum("req-" + "0" * 32 + ":0")],
        "foreign format": lambda: [rl_datum("abc")],
        "index past the call": lambda: [rl_datum(recorded[0][:-1] + "5")],
        "tokens differ": lambda: [rl_datum(recorded[0], tokens=[6, 6, 7])],
        "advantage on the prompt": lambda: [rl_datum(recorded[0], prompt_advantage=0.5)],
        "expired": lambda: (expire(services, recorded[0]), [rl_datum(recorded[0])])[1],
    }[case]()
    resp = post(api, model_id, data)
    assert resp.status_code == 400 and needle in resp.get_json()["detail"], resp.get_json()


def test_unrecorded_and_other_sessions_samples_are_refused(api, other, model_id, session_id,
                                                           finish):
    sampler = api.ok("create_sampling_session", {"session_id": session_id,
                                                 "sampling_session_seq_id": 0,
                                                 "base_model": ALIAS})["sampling_session_id"]
    plain = api.ok("asample", sample_body(sampler))  # record_stability_info left off
    finish(plain["request_id"], proto=encode_sample_response(
        [WireSequence(SAMPLED, RECORDED, "length")] * 2))
    resp = post(api, model_id, [rl_datum(plain["sample_sequence_ids"][0])])
    assert resp.status_code == 400 and "record_stability_info" in resp.get_json()["detail"]
    # another session of the same key: its samples are not this run's
    other_session = new_session(api)
    sampler2 = api.ok("create_sampling_session", {"session_id": other_session,
                                                  "sampling_session_seq_id": 0,
                                                  "base_model": ALIAS})["sampling_session_id"]
    theirs = api.ok("asample", sample_body(sampler2) | {"record_stability_info": True})
    finish(theirs["request_id"], proto=encode_sample_response(
        [WireSequence(SAMPLED, RECORDED, "length")] * 2))
    resp = post(api, model_id, [rl_datum(theirs["sample_sequence_ids"][0])], seq_id=2)
    assert resp.status_code == 400 and "unknown in session" in resp.get_json()["detail"]
