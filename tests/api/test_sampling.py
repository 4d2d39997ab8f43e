"""create_sampling_session, GET samplers/<id>, asample."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tinker import types

from tests.api.conftest import ALIAS, new_session


@pytest.fixture
def sampler_id(api, session_id):
    body = {
        "session_id": session_id,
        "sampling_session_seq_id": 1,
        "base_model": ALIAS,
        "type": "create_sampling_session",
    }
    answer = types.CreateSamplingSessionResponse.model_validate(
        api.ok("create_sampling_session", body)
    )
    assert answer.sampling_session_id == f"{session_id}:sample:1"
    again = api.ok("create_sampling_session", body)  # a retried creation: same sampler
    assert again["sampling_session_id"] == answer.sampling_session_id
    return answer.sampling_session_id


TARGET = {"data": [5, 6], "dtype": "int64", "shape": [2, 1]}


def sample_body(sampler_id: str, seq_id: int = 0, **params: Any) -> dict[str, Any]:
    extra = params.pop("extra", {})
    return {
        "num_samples": 2,
        "prompt": {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]},
        "sampling_params": {
            "max_tokens": 3,
            "seed": 1,
            "stop": ["\n"],
            "temperature": 0.7,
            "top_k": -1,
            "top_p": 1.0,
        }
        | params,
        "sampling_session_id": sampler_id,
        "seq_id": seq_id,
        "prompt_logprobs": False,
        "topk_prompt_logprobs": 0,
        "topk_sample_logprobs": 0,
        "prompt_alt_tokens_k": 0,
        "record_stability_info": False,
        "type": "sample",
    } | extra


def test_get_sampler(api, other, sampler_id):
    answer = types.GetSamplerResponse.model_validate(api.get(f"samplers/{sampler_id}").get_json())
    assert answer.base_model == ALIAS and answer.model_path is None
    assert other.get(f"samplers/{sampler_id}").status_code == 404


def test_sampler_from_model_path(api, session_id, model_id, add_checkpoint):
    ckpt = add_checkpoint(model_id, "sampler", "ckpt1")
    body = {"session_id": session_id, "sampling_session_seq_id": 2, "model_path": ckpt.tinker_path}
    sid = api.ok("create_sampling_session", body)["sampling_session_id"]
    answer = types.GetSamplerResponse.model_validate(api.get(f"samplers/{sid}").get_json())
    assert answer.model_path == ckpt.tinker_path and answer.base_model == ALIAS


def test_sampler_from_a_weights_checkpoint(api, session_id, model_id, add_checkpoint):
    """A training checkpoint holds the same peft files: the sampler reads them from its
    folder (the optimizer state beside them is not read)."""
    weights = add_checkpoint(model_id, "training", "w")
    body = {"session_id": session_id, "sampling_session_seq_id": 5,
            "model_path": weights.tinker_path}
    sid = api.ok("create_sampling_session", body)["sampling_session_id"]
    answer = types.GetSamplerResponse.model_validate(api.get(f"samplers/{sid}").get_json())
    assert answer.model_path == weights.tinker_path


def test_create_sampling_session_rejects(api, other, session_id, model_id, add_checkpoint):
    base = {"session_id": session_id, "sampling_session_seq_id": 3}
    resp = api.post("create_sampling_session", base | {"base_model": "other/model"})
    assert resp.status_code == 400 and ALIAS in resp.get_json()["detail"]
    path = f"tinker://{model_id}/sampler_weights/missing"
    resp = api.post("create_sampling_session", base | {"model_path": path})
    assert resp.status_code == 404 and path in resp.get_json()["detail"]
    export = f"tinker://{model_id}/external_weights/e"
    resp = api.post("create_sampling_session", base | {"model_path": export})
    assert resp.status_code == 400 and "download" in resp.get_json()["detail"]
    sampler = add_checkpoint(model_id, "sampler", "s")
    other_sid = new_session(other)
    body = {
        "session_id": other_sid,
        "sampling_session_seq_id": 0,
        "model_path": sampler.tinker_path,
    }
    assert other.post("create_sampling_session", body).status_code == 404


def test_asample(api, sampler_id, enqueued, settings):
    answer = api.ok("asample", sample_body(sampler_id))
    fut = types.UntypedAPIFuture.model_validate(answer)
    assert fut.sample_sequence_ids == [f"{fut.request_id}:0", f"{fut.request_id}:1"]
    [row] = enqueued
    assert (row.kind, row.sampler_id, row.seq_id, row.model_id) == ("sample", sampler_id, 0, None)
    assert row.queue == settings.queue
    assert json.loads(row.payload) == {
        "prompt": [1, 2, 3],
        "num_samples": 2,
        "max_tokens": 3,
        "temperature": 0.7,
        "top_k": -1,
        "top_p": 1.0,
        "seed": 1,
        "stop_strings": ["\n"],
        "stop_token_ids": [],
        "stop_at_eos": True,
        "prompt_logprobs": False,
        "topk_prompt_logprobs": 0,
        "topk_sample_logprobs": 0,
        "prompt_logprobs_last_n": None,
        "prompt_alt_tokens_k": 0,
        "target_prompt": None,
        "adapter_dir": None,
    }
    assert api.ok("asample", sample_body(sampler_id)) == answer and len(enqueued) == 1


def test_asample_adapter_dir_from_checkpoint(api, session_id, model_id, add_checkpoint, enqueued):
    ckpt = add_checkpoint(model_id, "sampler", "ckpt1")
    sid = api.ok(
        "create_sampling_session",
        {"session_id": session_id, "sampling_session_seq_id": 5, "model_path": ckpt.tinker_path},
    )
    api.ok("asample", sample_body(sid["sampling_session_id"]))
    assert json.loads(enqueued[-1].payload)["adapter_dir"] == ckpt.local_dir


@pytest.mark.parametrize(
    ("stop", "strings", "ids", "eos"),
    [
        (None, [], [], True),
        ([], [], [], False),
        ("END", ["END"], [], True),
        ([7, 8], [], [7, 8], True),
    ],
)
def test_asample_stop_forms(api, sampler_id, enqueued, stop, strings, ids, eos):
    body = sample_body(sampler_id)
    body["sampling_params"]["stop"] = stop
    if stop is None:
        del body["sampling_params"]["stop"]
    api.ok("asample", body)
    data = json.loads(enqueued[-1].payload)
    assert (data["stop_strings"], data["stop_token_ids"], data["stop_at_eos"]) == (
        strings,
        ids,
        eos,
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"max_tokens": 65}, "64"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"stop": [1, "x"]}, "sampling_params.stop"),
        ({"stop": [9999]}, "9999"),
        ({"extra": {"num_samples": 0}}, "num_samples=0"),
        ({"extra": {"num_samples": 129}}, "128"),
        ({"extra": {"prompt": {"chunks": []}}}, "empty"),
        ({"extra": {"prompt": {"chunks": [{"tokens": [512], "type": "encoded_text"}]}}}, "512"),
        (
            {
                "extra": {
                    "prompt": {"chunks": [{"tokens": list(range(255)), "type": "encoded_text"}]}
                }
            },
            "max_seq_len=256",
        ),
        ({"extra": {"topk_sample_logprobs": 129}}, "topk_sample_logprobs=129"),
        ({"extra": {"prompt_logprobs_last_n": 1}}, "needs prompt_logprobs=true"),
        ({"extra": {"prompt_logprobs": True, "prompt_logprobs_last_n": 3}}, "[1, len(prompt)"),
        ({"extra": {"prompt_alt_tokens_k": 129}}, "prompt_alt_tokens_k=129"),
        ({"extra": {"target_prompt_logprobs": TARGET | {"shape": [3, 1]}}}, "[len(prompt) - 1"),
        ({"extra": {"target_prompt_logprobs": TARGET | {"data": [-1, -1]}}}, "at least one id"),
        ({"extra": {"target_prompt_logprobs": TARGET | {"data": [512, 1]}}}, "[0, 512)"),
        ({"extra": {"target_prompt_logprobs": TARGET | {"dtype": "float32"}}}, "int64"),
        ({"extra": {"target_prompt_logprobs": TARGET | {"shape": [2, 1 << 22]}}}, "cells"),
    ],
)
def test_asample_rejects(api, sampler_id, enqueued, change, needle):
    """(TARGET is a valid [2, 1] target for the 3-token prompt, changed one field at a
    time.)"""
    resp = api.post("asample", sample_body(sampler_id, **change))
    assert resp.status_code == 400
    assert needle in resp.get_json()["detail"]
    assert enqueued == []


def test_prompt_scoring_payload(api, sampler_id, enqueued):
    """A sparse target keeps its layout for the answer; the payload holds the dense ids."""
    sparse = {"data": [7], "dtype": "int64", "shape": [2, 2], "sparse_crow_indices": [0, 0, 1],
              "sparse_col_indices": [1]}
    extra = {"prompt_logprobs": True, "prompt_logprobs_last_n": 2, "prompt_alt_tokens_k": 3,
             "target_prompt_logprobs": sparse}
    api.ok("asample", sample_body(sampler_id, extra=extra))
    data = json.loads(enqueued[0].payload)
    assert (data["prompt_logprobs_last_n"], data["prompt_alt_tokens_k"]) == (2, 3)
    assert data["target_prompt"] == {"ids": [[-1, -1], [-1, 7]],
                                     "layout": {"crow": [0, 0, 1], "col": [1]}}


def test_asample_foreign_sampler_is_404(other, sampler_id, enqueued):
    assert other.post("asample", sample_body(sampler_id)).status_code == 404
    assert enqueued == []
