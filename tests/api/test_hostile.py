"""Hostile and careless input, on SQLite and on PostgreSQL: each case is refused with a 4xx
whose JSON body names the bad field or value and the limit, and nothing is stored for it.
Most of these answered 500 before (a RecursionError, a DataError past PostgreSQL's integer
or a column's length, a NUL byte, a sparse tensor densified into 2**40 elements)."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest
from tinker.proto import tinker_public_pb2 as pb

from protocol.checks import check_sample
from protocol.errors import RequestError
from store.schema import RequestRow, SessionRow, utcnow
from tests.api.conftest import create_model_body, new_session
from tests.api.test_training import PROTO, datum, fwdbwd_body

ADAM = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    return request.getfixturevalue("pg_url") if request.param == "postgres" else ""


def refused(resp, *needles: str, status: int = 400) -> str:
    assert resp.status_code == status, (resp.status_code, resp.get_data()[:300])
    detail = resp.get_json()["detail"]
    for needle in needles:
        assert needle in detail, detail
    return detail


def request_rows(services) -> int:
    with services.store.transaction() as s:
        return s.query(RequestRow).count()


def test_json_nesting_nan_and_nul_are_refused(api, model_id):
    refused(api.post("create_session", b'{"tags": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     headers={"Content-Type": "application/json"}), "deeper than 32")
    refused(api.post("create_session", {"tags": [], "user_metadata": {"a": [[[[[[[[[[[[[[[[[[[[
        [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}), "deeper than 32")
    nan = b'{"model_id": "%s", "seq_id": 1, "adam_params": {"learning_rate": NaN}}'
    refused(api.post("optim_step", nan % model_id.encode(),
                     headers={"Content-Type": "application/json"}), "NaN")
    huge = b'{"model_id": "%s", "seq_id": 1, "adam_params": {"learning_rate": 1e400}}'
    refused(api.post("optim_step", huge % model_id.encode(),  # parses as inf
                     headers={"Content-Type": "application/json"}), "learning_rate", "finite")
    refused(api.post("optim_step", {"model_id": model_id + "\x00", "seq_id": 1,
                                    "adam_params": ADAM}), "NUL", "model_id")
    refused(api.get(f"training_runs/{model_id}%00"), "NUL")
    refused(api.get("checkpoints", query_string={"limit": "5\x00"}), "NUL")


def test_integers_fit_64_bits_and_64_bits_are_stored(api, session_id, model_id, services):
    for seq in (2**63, -1, 0):
        refused(api.post("optim_step", {"model_id": model_id, "seq_id": seq,
                                        "adam_params": ADAM}), f"seq_id={seq}")
    api.ok("optim_step", {"model_id": model_id, "seq_id": 2**40, "adam_params": ADAM})
    refused(api.post("create_model", create_model_body(session_id, 1, seed=2**64)),
            "seed", "64-bit")
    api.ok("create_model", create_model_body(session_id, 2, seed=2**62))
    refused(api.get("checkpoints", query_string={"offset": str(2**64)}), "offset")
    assert api.get("checkpoints", query_string={"offset": str(2**40)}).status_code == 200


@pytest.mark.parametrize(("name", "limit"), [("display_name", 256), ("project_id", 256),
                                             ("sdk_version", 32)])
def test_strings_fit_their_columns(api, name, limit):
    body = {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"}
    refused(api.post("create_session", body | {name: "x" * (limit + 1)}), name, str(limit))
    assert api.post("create_session", body | {name: "x" * limit}).status_code == 200


def sparse_weights(shape: list[int], cols: list[int], crow: list[int]) -> pb.Tensor:
    values = np.ones(len(cols), dtype="<f4")
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, sparse_csr=pb.SparseCsr(
        values=values.tobytes(), crow_indices=np.asarray(crow, "<i8").tobytes(),
        col_indices=np.asarray(cols, "<i8").tobytes()))


@pytest.mark.parametrize(("tensor", "needle"), [
    (sparse_weights([1, 4], [9], [0, 1]), "column indices outside [0, 4)"),
    (sparse_weights([1, 2**40], [0], [0, 1]), "once dense"),
    (sparse_weights([2, 4], [0, 1], [0, 2, 1]), "row offsets"),
])
def test_sparse_tensors_are_checked_before_they_are_made_dense(api, model_id, services,
                                                               tensor, needle):
    msg = pb.ForwardBackwardRequest.FromString(fwdbwd_body(model_id, 1, [datum([1, 2, 3, 4])]))
    msg.data[0].loss_fn_inputs["weights"].CopyFrom(tensor)
    before = request_rows(services)
    refused(api.post("forward_backward", msg.SerializeToString(), headers=PROTO), needle)
    assert request_rows(services) == before  # a body that does not decode claims nothing


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_loss_inputs_are_refused(api, model_id, bad):
    weights = [1.0, bad, 1.0, 1.0]
    body = fwdbwd_body(model_id, 1, [datum([1, 2, 3, 4], weights=weights)])
    refused(api.post("forward_backward", body, headers=PROTO), "'weights'", "flat index 1",
            "finite")


def test_sample_defaults_fit_the_models_context(settings):
    """`"sampling_params": {}` took max_tokens from max_seq_len, past a model context shorter
    than it, and failed in the worker: the default and the limit are the smaller of both."""
    def body(n_prompt: int, **params) -> dict:
        chunk = {"type": "encoded_text", "tokens": [1] * n_prompt}
        return {"prompt": {"chunks": [chunk]}, "sampling_params": params}

    assert settings.max_seq_len == 256 and settings.max_sample_tokens == 64
    assert check_sample(body(3), settings, 512, context=40)["max_tokens"] == 37
    assert check_sample(body(3), settings, 512, context=None)["max_tokens"] == 64
    with pytest.raises(RequestError, match=r"max_position_embeddings\)=40"):
        check_sample(body(30, max_tokens=20), settings, 512, context=40)
    with pytest.raises(RequestError, match="no room"):
        check_sample(body(40), settings, 512, context=40)


def test_a_tenant_keeps_a_bounded_number_of_live_runs(api, other, session_id, services):
    """max_models_per_tenant live runs per API key; a finished session's runs, or those of a
    session silent past session_idle_s, free their places; other keys are not affected."""
    limit = services.settings.max_models_per_tenant
    for n in range(limit):
        api.ok("create_model", create_model_body(session_id, n))
    full = api.post("create_model", create_model_body(session_id, limit))
    refused(full, f"max_models_per_tenant={limit}", status=429)  # the SDK waits, sends again
    assert full.headers["Retry-After"] == "10"
    other.ok("create_model", create_model_body(new_session(other), 0))
    second = new_session(api)
    refused(api.post("create_model", create_model_body(second, 0)), "live", status=429)
    assert api.post(f"sessions/{session_id}/finish", {"reason": {"type": "success"}}
                    ).status_code == 200
    api.ok("create_model", create_model_body(second, 0))
    for n in range(1, limit):
        api.ok("create_model", create_model_body(second, n))
    refused(api.post("create_model", create_model_body(second, limit)), "live", status=429)
    silent = utcnow() - dt.timedelta(seconds=services.settings.session_idle_s + 1)
    with services.store.transaction() as s:  # the client died: no heartbeat since
        s.get(SessionRow, second).last_heartbeat = silent
    api.ok("create_model", create_model_body(new_session(api), 0))


# --- every route, every class --------------------------------------------------------------
_BODIES = [
    b"[" * 5000 + b"]" * 5000,  # deep
    b'{"seq_id": NaN}', b'{"limit": Infinity}',  # not JSON numbers
    b"\xff\xfe not utf-8", b"{", b"[]", b'"text"', b"null", b"12",  # not an object
]
_FIELDS = ("model_id", "seq_id", "session_id", "sampling_session_id", "base_model", "path",
           "model_path", "tinker_path", "rank", "seed", "num_samples", "prompt", "request_id",
           "type", "lora_config", "sampling_params", "adam_params", "forward_backward_input",
           "ttl_seconds", "user_metadata", "tags", "reason", "loss_fn", "checkpoint_id")
_VALUES = [2**70, -(2**70), -1, 1e308, "\x00", "A" * 5000, "..", ".", [], {}, None, True,
           [[[[[[[[1]]]]]]]], {"a": {"b": {"c": "\x00"}}}]
_SEGMENTS = ["%00", "A" * 3000, "..", "%2e%2e", "-1", "9" * 40, "%FF", "tinker:%2F%2Fx"]
_QUERIES = [{"limit": "-1"}, {"limit": str(2**70)}, {"offset": str(2**64)}, {"limit": "x"},
            {"offset": "\x00"}, {"limit": "1e9"}]


def _filled(rule, value: str) -> str:
    """The rule's path with every argument, whatever its converter, set to `value`."""
    return re.sub(r"<[^>]+>", lambda _: value, rule.rule)


SELF_REVOKING = ("identity.revoke_my_key", "DELETE")  # revokes the key the sweep uses:
# tests/api/test_identity.py checks it


def _routes(app):
    for rule in app.url_map.iter_rules():
        # /readyz answers 503 while no worker beats: that is its answer, not a failure
        if rule.endpoint not in ("static", "health.readyz"):
            methods = rule.methods - {"HEAD", "OPTIONS"}
            if rule.endpoint == SELF_REVOKING[0]:
                methods -= {SELF_REVOKING[1]}
            if methods:
                yield rule, sorted(methods)


def _answer_is_json_below_500(resp, where) -> int:
    assert resp.status_code < 500, (where, resp.status_code, resp.get_data()[:300])
    if resp.status_code >= 400:  # ours, or OpenAI's error shape on the /v1 routes
        answer = resp.get_json()
        assert "detail" in answer or "message" in answer.get("error", {}), \
            (where, resp.get_data()[:300])
    return resp.status_code


def test_every_route_answers_hostile_input_with_a_json_4xx(app, api, model_id):
    """Each route, with hostile path segments, query strings and bodies (every class: deep,
    non-JSON, wrong types, NUL, over-long, out of range) answers below 500 with a JSON body."""
    client, headers = app.test_client(), {"X-API-Key": api.key}
    checked, statuses = 0, set()
    for rule, methods in _routes(app):
        paths = [_filled(rule, model_id)]
        paths += [_filled(rule, segment) for segment in _SEGMENTS if rule.arguments]
        for method in methods:
            send = getattr(client, method.lower())
            for path in paths:
                status = _answer_is_json_below_500(send(path, headers=headers), (method, path))
                if path is paths[0]:  # the route with a real id: what its handler answers
                    statuses.add(status)
                checked += 1
            path = paths[0]
            for query in _QUERIES:
                _answer_is_json_below_500(send(path, headers=headers, query_string=query),
                                          (method, path, query))
            if method in ("POST", "PUT"):
                for body in _BODIES:
                    resp = send(path, data=body, headers={**headers,
                                                          "Content-Type": "application/json"})
                    _answer_is_json_below_500(resp, (method, path, body[:20]))
                for field_name in _FIELDS:
                    for value in _VALUES:
                        body = {"model_id": model_id, "seq_id": 1, field_name: value}
                        _answer_is_json_below_500(send(path, json=body, headers=headers),
                                                  (method, path, field_name, value))
                        checked += 1
    assert checked > 27 * 10  # every route was reached, not a few
    assert {200, 400, 404} <= statuses, statuses  # reached the handlers, not only a 404
