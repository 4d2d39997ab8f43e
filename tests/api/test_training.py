"""forward_backward (protobuf, zstd), optim_step, save_weights, save_weights_for_sampler;
validation, seq-gap rows, dedupe."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from store.schema import FAILED, RequestRow, SamplerRow
from tests.api.conftest import ALIAS

PROTO = {"Content-Type": "application/x-protobuf"}


def datum(tokens: list[int], targets: list[int] | None = None, **inputs: Any) -> types.Datum:
    targets = targets if targets is not None else [t + 1 for t in tokens]
    weights = inputs.pop("weights", [1.0] * len(tokens))
    loss_inputs = {
        "target_tokens": np.asarray(targets, dtype=np.int64),
        "weights": np.asarray(weights, dtype=np.float32),
    } | inputs
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=loss_inputs)


def fwdbwd_body(
    model_id: str,
    seq_id: int,
    data: list[types.Datum] | None = None,
    loss_fn: str = "cross_entropy",
    config: dict | None = None,
) -> bytes:
    data = data if data is not None else [datum([1, 2, 3, 4]), datum([5, 6])]
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data, loss_fn=loss_fn, loss_fn_config=config
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(req).SerializeToString()


def rows(services) -> list[RequestRow]:
    with services.store.transaction() as s:
        return list(s.query(RequestRow).order_by(RequestRow.created_at))


def test_forward_backward_plain(api, model_id, enqueued):
    body = fwdbwd_body(model_id, 1)
    resp = api.post("forward_backward", body, headers=PROTO)
    fut = types.UntypedAPIFuture.model_validate(resp.get_json())
    assert fut.model_id == model_id
    [row] = enqueued
    assert (row.id, row.kind, row.seq_id, row.payload) == (
        fut.request_id,
        "forward_backward",
        1,
        body,
    )
    assert "datums=2" in row.summary and "tokens=6" in row.summary


def test_forward_backward_zstd_and_forward_only(api, model_id, enqueued):
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum([1, 2])], loss_fn="cross_entropy"
        ),
        model_id=model_id,
        seq_id=1,
    )
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = True
    raw = msg.SerializeToString()
    packed = zstandard.ZstdCompressor().compress(raw)
    resp = api.post("forward_backward", packed, headers=PROTO | {"Content-Encoding": "zstd"})
    assert resp.status_code == 200, resp.get_json()
    [row] = enqueued
    assert row.kind == "forward" and row.payload == raw


def test_ppo_config_accepted(api, model_id, enqueued):
    data = [datum([1, 2, 3], logprobs=np.zeros(3, np.float32), advantages=np.ones(3, np.float32))]
    for d in data:
        d.loss_fn_inputs.pop("weights")
    body = fwdbwd_body(
        model_id, 1, data, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    )
    assert api.post("forward_backward", body, headers=PROTO).status_code == 200


def test_same_seq_id_twice_dedupes(api, model_id, enqueued):
    body = fwdbwd_body(model_id, 1)
    first = api.post("forward_backward", body, headers=PROTO).get_json()
    again = api.post("forward_backward", body, headers=PROTO).get_json()
    assert first == again and len(enqueued) == 1


@pytest.mark.parametrize(
    ("data", "loss_fn", "config", "needle"),
    [
        ([datum([1, 600])], "cross_entropy", None, "600"),
        ([datum([1, 2], targets=[3, 999])], "cross_entropy", None, "999"),
        ([], "cross_entropy", None, "empty"),
        ([datum([])], "cross_entropy", None, "empty"),
        ([datum([1, 2])], "nope_loss", None, "nope_loss"),
        ([datum([1, 2])], "cross_entropy", {"beta": 1.0}, "beta"),
        ([datum([1, 2, 3], weights=[1.0, 1.0])], "cross_entropy", None, "[3]"),
        ([datum(list(range(300)))], "cross_entropy", None, "max_seq_len=256"),
    ],
)
def test_forward_backward_rejects_and_claims_seq(
    api, model_id, enqueued, services, data, loss_fn, config, needle
):
    body = fwdbwd_body(model_id, 1, data, loss_fn, config)
    resp = api.post("forward_backward", body, headers=PROTO)
    assert resp.status_code == 400
    assert needle in resp.get_json()["detail"]
    [row] = enqueued  # the failed row is enqueued so the worker's order moves past seq 1
    assert (row.state, row.seq_id, row.error_category) == (FAILED, 1, "user")
    assert needle in row.error
    # a resend of the seq_id (the SDK's retry after a lost answer) gets the failed future
    again = api.post("forward_backward", body, headers=PROTO).get_json()
    assert again["request_id"] == row.id
    assert len(enqueued) == 1 and len(rows(services)) == 2  # create_model + the failed one
    answer = api.ok("retrieve_future", {"request_id": row.id, "allow_metadata_only": True})
    assert answer["category"] == "user" and needle in answer["error"]


def test_malformed_protobuf_is_400(api, model_id, enqueued):
    resp = api.post("forward_backward", b"\xff\xff\xff\xff", headers=PROTO)
    assert resp.status_code == 400 and resp.get_json()["detail"]
    resp = api.post(
        "forward_backward", b"\x00garbage", headers=PROTO | {"Content-Encoding": "zstd"}
    )
    assert resp.status_code == 400 and "zstd" in resp.get_json()["detail"]
    assert enqueued == []


def test_forward_backward_seq_zero_and_unknown_model(api, other, model_id, enqueued):
    resp = api.post("forward_backward", fwdbwd_body(model_id, 0), headers=PROTO)
    assert resp.status_code == 400 and "seq_id=0" in resp.get_json()["detail"]
    resp = other.post("forward_backward", fwdbwd_body(model_id, 1), headers=PROTO)
    assert resp.status_code == 404
    assert enqueued == []


ADAM = {
    "learning_rate": 1e-4,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-12,
    "weight_decay": 0.0,
    "grad_clip_norm": 0.0,
}


def test_optim_step(api, model_id, enqueued):
    body = {"model_id": model_id, "seq_id": 2, "type": "optim_step", "adam_params": ADAM}
    types.UntypedAPIFuture.model_validate(api.ok("optim_step", body))
    [row] = enqueued
    assert row.kind == "optim_step" and json.loads(row.payload) == {"adam_params": ADAM}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"learning_rate": -1.0}, "learning_rate=-1.0"),
        ({"beta1": 1.0}, "beta1=1.0"),
        ({"beta2": -0.1}, "beta2=-0.1"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0"),
        ({"grad_clip_norm": -2.0}, "-2.0"),
    ],
)
def test_optim_step_rejects(api, model_id, enqueued, change, needle):
    body = {"model_id": model_id, "seq_id": 2, "adam_params": ADAM | change}
    resp = api.post("optim_step", body)
    assert resp.status_code == 400 and needle in resp.get_json()["detail"]
    assert [r.state for r in enqueued] == [FAILED]


def test_save_weights(api, model_id, enqueued, settings):
    body = {
        "model_id": model_id,
        "path": "ckpt1",
        "seq_id": 7,
        "ttl_seconds": 3600,
        "overwrite": False,
        "type": "save_weights",
    }
    api.ok("save_weights", body)
    [row] = enqueued
    tenant = row.tenant
    assert json.loads(row.payload) == {
        "checkpoint_dir": str(settings.checkpoint_root / tenant / model_id / "weights" / "ckpt1"),
        "tinker_path": f"tinker://{model_id}/weights/ckpt1",
        "ttl_seconds": 3600,
        "user_metadata": None,
    }


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "..", ".", ".hidden", "-rf", "a b", "é",
                                  "x" * 129, 7])
def test_save_weights_bad_names(api, model_id, enqueued, name):
    resp = api.post("save_weights", {"model_id": model_id, "path": name, "seq_id": 1})
    detail = resp.get_json()["detail"]
    assert resp.status_code == 400 and ("name" in detail or detail.startswith("path:"))
    assert [r.state for r in enqueued] == [FAILED]


@pytest.mark.parametrize("name", ["step-000010", "final", "sampler_1.5", "_x", "A" * 128])
def test_save_weights_good_names(api, model_id, enqueued, name):
    resp = api.post("save_weights", {"model_id": model_id, "path": name, "seq_id": 1})
    assert resp.status_code == 200, resp.get_json()


def test_save_weights_ttl_and_metadata(api, model_id, enqueued):
    body = {"model_id": model_id, "path": "t", "seq_id": 1, "ttl_seconds": 0}
    resp = api.post("save_weights", body)
    assert resp.status_code == 400 and "ttl_seconds=0" in resp.get_json()["detail"]
    for seq, huge in ((10, 10**12), (11, 2**63)):  # accepted, then an overflow left it pending
        resp = api.post("save_weights", {**body, "seq_id": seq, "ttl_seconds": huge})
        assert resp.status_code == 400 and f"ttl_seconds={huge}" in resp.get_json()["detail"]
    body = {**body, "seq_id": 2, "ttl_seconds": 7200, "user_metadata": {"step": "20"}}
    assert api.post("save_weights", body).status_code == 200
    stored = json.loads(enqueued[-1].payload)
    assert stored["ttl_seconds"] == 7200 and stored["user_metadata"] == {"step": "20"}


def test_save_weights_existing_name(api, model_id, enqueued, add_checkpoint):
    add_checkpoint(model_id, "training", "ckpt1")
    resp = api.post("save_weights", {"model_id": model_id, "path": "ckpt1", "seq_id": 1})
    assert resp.status_code == 400 and "ckpt1" in resp.get_json()["detail"]
    body = {"model_id": model_id, "path": "ckpt1", "seq_id": 2, "overwrite": True}
    assert api.post("save_weights", body).status_code == 200
    # the same name is free for the other kind
    body = {"model_id": model_id, "path": "ckpt1", "seq_id": 3, "kind": "snapshot"}
    assert api.post("save_weights_for_sampler", body).status_code == 200


def test_save_weights_for_sampler_named(api, model_id, enqueued, add_checkpoint, settings):
    body = {
        "model_id": model_id,
        "path": "s1",
        "kind": "snapshot",
        "seq_id": 8,
        "type": "save_weights_for_sampler",
    }
    api.ok("save_weights_for_sampler", body)
    [row] = enqueued
    folder = settings.checkpoint_root / row.tenant / model_id / "sampler_weights" / "s1"
    assert json.loads(row.payload) == {
        "checkpoint_dir": str(folder),
        "tinker_path": f"tinker://{model_id}/sampler_weights/s1",
        "sampling_session_id": None,
        "ttl_seconds": None,
        "user_metadata": None,
    }
    add_checkpoint(model_id, "sampler", "taken")
    resp = api.post("save_weights_for_sampler", body | {"path": "taken", "seq_id": 9})
    assert resp.status_code == 400 and "taken" in resp.get_json()["detail"]


def test_save_weights_for_sampler_pathless(api, model_id, session_id, enqueued, services):
    body = {
        "model_id": model_id,
        "sampling_session_seq_id": 0,
        "kind": "snapshot",
        "seq_id": 9,
        "type": "save_weights_for_sampler",
    }
    fut = api.ok("save_weights_for_sampler", body)
    sampler_id = f"{session_id}:sample:0"
    [row] = enqueued
    data = json.loads(row.payload)
    assert data["tinker_path"] is None and data["sampling_session_id"] == sampler_id
    assert data["checkpoint_dir"].endswith(f"/sampler_weights/_session/{sampler_id}")
    with services.store.transaction() as s:
        sampler = s.get(SamplerRow, sampler_id)
        assert sampler.checkpoint_dir == data["checkpoint_dir"] and sampler.model_path is None
    assert api.ok("save_weights_for_sampler", body) == fut and len(enqueued) == 1
    sampler_json = api.get(f"samplers/{sampler_id}").get_json()
    types.GetSamplerResponse.model_validate(sampler_json)


def test_inflight_sessions_of_a_run_share_one_folder(api, model_id, session_id, enqueued,
                                                     services):
    """Every inflight save of a run writes the same folder, which every inflight session of
    the run samples from; a snapshot session keeps a folder of its own. A named save takes
    no kind but snapshot."""
    folders = []
    for n, kind in enumerate(["inflight", "inflight", "snapshot"]):
        body = {"model_id": model_id, "sampling_session_seq_id": n, "kind": kind,
                "seq_id": n + 1}
        api.ok("save_weights_for_sampler", body)
        with services.store.transaction() as s:
            folders.append(s.get(SamplerRow, f"{session_id}:sample:{n}").checkpoint_dir)
    assert folders[0] == folders[1] and folders[0].endswith("/sampler_weights/_session/inflight")
    assert folders[2] != folders[0]
    assert [json.loads(r.payload)["checkpoint_dir"] for r in enqueued] == folders
    named = {"model_id": model_id, "path": "x", "kind": "inflight", "seq_id": 9}
    resp = api.post("save_weights_for_sampler", named)
    assert resp.status_code == 400 and "kind='inflight'" in resp.get_json()["detail"]
    bad = {"model_id": model_id, "sampling_session_seq_id": 5, "kind": "live", "seq_id": 10}
    resp = api.post("save_weights_for_sampler", bad)
    assert resp.status_code == 400 and "kind: Input should be" in resp.get_json()["detail"]


def test_broker_down_is_503_and_leaves_nothing(api, model_id, enqueued, services):
    def broken(row: RequestRow) -> None:
        raise ConnectionError("broker down")

    body = {"model_id": model_id, "seq_id": 2, "adam_params": ADAM}
    services.submit.send = broken
    resp = api.post("optim_step", body)
    assert resp.status_code == 503 and "retry" in resp.get_json()["detail"]
    assert len(rows(services)) == 1  # only create_model: the SDK's retry starts afresh
    services.submit.send = enqueued.append
    assert api.post("optim_step", body).status_code == 200 and len(enqueued) == 1


def test_json_body_on_forward_backward_is_400(api, model_id, enqueued):
    resp = api.post("forward_backward", {"model_id": model_id, "seq_id": 1})
    assert resp.status_code == 400 and "protobuf" in resp.get_json()["detail"]
    assert enqueued == []


def test_top_k_cross_entropy_shapes(api, model_id, enqueued):
    """[N, K] targets with [N, K] weights are accepted; mismatched or too wide ones are 400s
    naming the field and the limit."""
    targets = np.array([[2, 7, 9], [3, 1, 0], [4, 4, 4]], dtype=np.int64)
    ok = datum([1, 2, 3], targets, weights=np.full((3, 3), 0.5, dtype=np.float32))
    resp = api.post("forward_backward", fwdbwd_body(model_id, 1, [ok]), headers=PROTO)
    assert resp.status_code == 200, resp.get_json()
    cases = [(datum([1, 2, 3], targets), "must be [3, 3]"),  # 1-D weights beside [N, K]
             (datum([1, 2, 3], np.zeros((3, 200), dtype=np.int64),
                    weights=np.zeros((3, 200), dtype=np.float32)), "at most 128")]
    for seq, (bad_datum, needle) in enumerate(cases, start=2):
        resp = api.post("forward_backward", fwdbwd_body(model_id, seq, [bad_datum]),
                        headers=PROTO)
        assert resp.status_code == 400 and needle in resp.get_json()["detail"], resp.get_json()


def test_image_chunks_are_a_400_naming_the_text_only_models(api, model_id, session_id):
    """An image chunk in forward_backward (protobuf) or in a sample prompt (JSON) is refused,
    and the answer names the served base models as text-only."""
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=1, loss_fn="cross_entropy")
    msg.data.add().model_input.add().image.data = b"\x89PNG"
    resp = api.post("forward_backward", msg.SerializeToString(), headers=PROTO)
    assert resp.status_code == 400, resp.get_json()
    assert "'image' chunk" in resp.get_json()["detail"] and ALIAS in resp.get_json()["detail"]
    sampler = api.ok("create_sampling_session", {"session_id": session_id,
                                                 "sampling_session_seq_id": 0,
                                                 "base_model": ALIAS})["sampling_session_id"]
    body = {"num_samples": 1, "sampling_session_id": sampler, "seq_id": 0,
            "prompt": {"chunks": [{"type": "image", "data": "iVBORw==", "format": "png"}]},
            "sampling_params": {"max_tokens": 2}}
    resp = api.post("asample", body)
    assert resp.status_code == 400 and "text-only" in resp.get_json()["detail"]
    assert ALIAS in resp.get_json()["detail"]
