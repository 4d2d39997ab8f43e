"""create_custom_loss and forward_backward(loss_fn='custom') at the edge: the graph stored
and answered at once, retried creations, the graph written into the stored body, and the
refusals (another session's loss, missing inputs, an operation the interpreter lacks)."""

from __future__ import annotations

import json

import numpy as np
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from protocol.wire import decode_forward_backward
from tests.api.conftest import new_session
from tests.unit.test_custom_loss import CASES, upload


def loss_body(session_id: str, n: int = 0) -> dict:
    body = upload(*CASES["neg_ll"])
    body.pop("handle")
    return body | {"session_id": session_id, "custom_loss_seq_id": n}


def fwdbwd(model_id: str, seq: int, loss_id: str, with_weights: bool = True) -> bytes:
    inputs = {"target_tokens": np.array([3, 4, 5], dtype=np.int64)}
    if with_weights:
        inputs["weights"] = np.ones(3, dtype=np.float32)
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs=inputs)
    request = types.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq, forward_backward_input=types.ForwardBackwardInput(
            data=[datum], loss_fn="custom", loss_fn_config={"loss_id": loss_id}))
    return forward_backward_request_to_proto(request).SerializeToString()


def test_a_custom_loss_is_stored_and_runs_by_its_id(api, other, session_id, model_id,
                                                   enqueued):
    fut = api.ok("create_custom_loss", loss_body(session_id))
    answer = api.ok("retrieve_future", {"request_id": fut["request_id"]})
    made = types.CreateCustomLossResponse.model_validate(answer)
    assert made.loss_id == f"{session_id}:loss:0"
    assert api.ok("create_custom_loss", loss_body(session_id)) == fut  # a retry: the same
    api.ok("forward_backward", fwdbwd(model_id, 1, made.loss_id))
    [row] = enqueued
    stored = decode_forward_backward(row.payload)
    spec = json.loads(stored.loss_fn_config["custom_loss"])
    assert [i["name"] for i in spec["inputs"]] == ["logprobs", "weights"]
    assert any(n["target"] == "operator.mul" for n in spec["nodes"])
    other_sid = new_session(other)
    assert other.post("create_custom_loss", loss_body(other_sid)).status_code == 200
    resp = api.post("forward_backward", fwdbwd(model_id, 2, f"{other_sid}:loss:0"))
    assert resp.status_code == 404  # another key's loss is no loss


def test_custom_loss_refusals(api, session_id, model_id, enqueued):
    api.ok("create_custom_loss", loss_body(session_id))
    resp = api.post("forward_backward", fwdbwd(model_id, 1, f"{session_id}:loss:0", False))
    assert resp.status_code == 400 and "['weights']" in resp.get_json()["detail"]
    resp = api.post("forward_backward", fwdbwd(model_id, 2, f"{session_id}:loss:9"))
    assert resp.status_code == 404 and "loss:9" in resp.get_json()["detail"]
    evil = loss_body(session_id, 1)
    evil["graph"]["nodes"][2]["target"] = "builtins.exec"
    resp = api.post("create_custom_loss", evil)
    assert resp.status_code == 400 and "'builtins.exec'" in resp.get_json()["detail"]
    second = new_session(api)
    resp = api.post("create_model", {"session_id": second, "model_seq_id": 0,
                                     "base_model": "Qwen/Qwen3-8B", "lora_config": {"rank": 8}})
    other_run = resp.get_json()["model_id"]
    resp = api.post("forward_backward", fwdbwd(other_run, 1, f"{session_id}:loss:0"))
    assert resp.status_code == 400 and "only that session" in resp.get_json()["detail"]
