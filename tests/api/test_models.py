"""create_model, get_info, load_weights (create-via-load and the legacy form)."""

from __future__ import annotations

import json

import pytest
from tinker import types

from store.schema import ModelRow, RequestRow
from tests.api.conftest import ALIAS, create_model_body, new_session


def stored(services, request_id: str) -> RequestRow:
    with services.store.transaction() as s:
        return s.get(RequestRow, request_id)


def test_create_model(api, session_id, enqueued, services, settings):
    answer = api.ok("create_model", create_model_body(session_id, seq=0, seed=7))
    fut = types.UntypedAPIFuture.model_validate(answer)
    assert fut.model_id == f"{session_id}:train:0" and fut.request_id.startswith("req-")
    [row] = enqueued
    assert (row.id, row.kind, row.seq_id, row.queue) == (
        fut.request_id,
        "create_model",
        0,
        settings.queue,
    )
    assert json.loads(row.payload) == {
        "model_id": fut.model_id,
        "base_model": ALIAS,
        "lora": {
            "rank": 8,
            "seed": 7,
            "train_attn": True,
            "train_mlp": True,
            "train_unembed": True,
        },
    }
    assert fut.model_id in row.summary
    with services.store.transaction() as s:
        model = s.get(ModelRow, fut.model_id)
        assert model.queue == settings.queue and model.user_metadata == {"renderer_name": "qwen3"}


def test_create_model_retry_dedupes(api, session_id, enqueued):
    first = api.ok("create_model", create_model_body(session_id))
    again = api.ok("create_model", create_model_body(session_id))
    assert again == first and len(enqueued) == 1


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"lora_config": {"rank": 0}}, "rank=0"),
        ({"lora_config": {"rank": 33}}, "[1, 32]"),
        (
            {
                "lora_config": {
                    "rank": 8,
                    "train_attn": False,
                    "train_mlp": False,
                    "train_unembed": False,
                }
            },
            "at least one",
        ),
        ({"base_model": "nope/model"}, ALIAS),
        ({"optimizer_config": {"type": "dimuon", "version": 1}}, "dimuon"),
        ({"model_seq_id": -1}, "model_seq_id=-1"),
    ],
)
def test_create_model_rejects(api, session_id, enqueued, change, needle):
    resp = api.post("create_model", create_model_body(session_id) | change)
    assert resp.status_code == 400
    assert needle in resp.get_json()["detail"]
    assert enqueued == []


def test_create_model_in_foreign_session_is_404(other, session_id, enqueued):
    resp = other.post("create_model", create_model_body(session_id))
    assert resp.status_code == 404 and enqueued == []


def test_get_info(api, other, model_id, model_folder):
    answer = api.ok("get_info", {"model_id": model_id, "type": "get_info"})
    info = types.GetInfoResponse.model_validate(answer)
    assert info.model_id == model_id and info.lora_rank == 8 and info.is_lora
    assert info.model_data.model_name == ALIAS and info.model_name == ALIAS
    assert info.model_data.tokenizer_id == str(model_folder)
    assert info.model_data.arch == "Qwen3ForCausalLM"
    assert other.post("get_info", {"model_id": model_id}).status_code == 404


def test_create_via_load(api, session_id, model_id, add_checkpoint, enqueued, services):
    ckpt = add_checkpoint(model_id, "training", "ckpt1")
    body = {
        "session_id": session_id,
        "model_seq_id": 1,
        "path": ckpt.tinker_path,
        "optimizer": True,
        "type": "load_weights",
    }
    fut = types.UntypedAPIFuture.model_validate(api.ok("load_weights", body))
    new_id = f"{session_id}:train:1"
    assert fut.model_id == new_id
    [row] = enqueued
    assert (row.kind, row.model_id, row.seq_id) == ("load_weights", new_id, 0)
    assert json.loads(row.payload) == {
        "model_id": new_id,
        "create": True,
        "checkpoint_dir": ckpt.local_dir,
        "optimizer": True,
        "tinker_path": ckpt.tinker_path,
        "base_model": ALIAS,
        "lora": {
            "rank": 8,
            "seed": None,
            "train_attn": True,
            "train_mlp": True,
            "train_unembed": True,
        },
    }
    info = types.GetInfoResponse.model_validate(api.ok("get_info", {"model_id": new_id}))
    assert info.lora_rank == 8
    run = types.TrainingRun.model_validate(api.get(f"training_runs/{new_id}").get_json())
    assert run.user_metadata == {"renderer_name": "qwen3"}  # inherited from the source run
    assert api.ok("load_weights", body) == fut.model_dump(exclude_none=True)
    assert len(enqueued) == 1


def test_load_weights_legacy_form(api, model_id, add_checkpoint, enqueued):
    ckpt = add_checkpoint(model_id, "training", "ckpt1")
    body = {"model_id": model_id, "seq_id": 3, "path": ckpt.tinker_path, "optimizer": False}
    api.ok("load_weights", body)
    [row] = enqueued
    assert (row.model_id, row.seq_id) == (model_id, 3)
    assert json.loads(row.payload)["create"] is False


def test_load_weights_rejects(api, other, session_id, model_id, add_checkpoint, enqueued):
    sampler = add_checkpoint(model_id, "sampler", "s1")
    weights = add_checkpoint(model_id, "training", "w1")
    base = {"session_id": session_id, "model_seq_id": 1, "optimizer": False}
    resp = api.post("load_weights", base | {"path": sampler.tinker_path})
    assert resp.status_code == 400 and "weights checkpoint" in resp.get_json()["detail"]
    resp = api.post("load_weights", base | {"path": "s3://bucket/x"})
    assert resp.status_code == 400 and "s3://bucket/x" in resp.get_json()["detail"]
    missing = f"tinker://{model_id}/weights/nope"
    resp = api.post("load_weights", base | {"path": missing})
    assert resp.status_code == 404 and missing in resp.get_json()["detail"]
    other_sid = new_session(other)
    resp = other.post("load_weights", base | {"session_id": other_sid, "path": weights.tinker_path})
    assert resp.status_code == 404
    assert enqueued == []


def test_get_info_before_the_model_exists_is_503(api, model_id, services, model_folder):
    (model_folder / "config.json").unlink()
    services.model._config = None  # as in a fresh web process
    resp = api.post("get_info", {"model_id": model_id})
    assert resp.status_code == 503 and "config.json" in resp.get_json()["detail"]
