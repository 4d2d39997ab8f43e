"""The one submit path (tasks/submit.py, tasks/calls.py): REST and a batch script that make
the same calls write the same rows, and differ only where they must (a batch sends no task,
and refuses bad input before claiming a seq_id, where REST claims it)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from store.schema import FAILED, RequestRow, SamplerRow, tenant_of
from tasks.batch import Batch, request_id
from tests.api.conftest import ALIAS, KEY, VOCAB, create_model_body
from tests.api.test_training import PROTO, datum, fwdbwd_body

ADAM = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


@pytest.fixture
def batch(app, settings):
    return Batch.open(KEY, batch_id="same-calls", settings=settings)


def stored(services, model_id: str) -> list[RequestRow]:
    with services.store.transaction() as s:
        query = select(RequestRow).where(RequestRow.model_id == model_id)
        return list(s.scalars(query.order_by(RequestRow.seq_id)))


def without_model_id(body: bytes) -> bytes:
    msg = pb.ForwardBackwardRequest.FromString(body)
    msg.model_id = ""
    return msg.SerializeToString(deterministic=True)


def rest_calls(api, model_id: str) -> None:
    api.post("forward_backward", fwdbwd_body(model_id, 1), headers=PROTO)
    api.ok("optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": ADAM})
    api.ok("save_weights", {"model_id": model_id, "seq_id": 3, "path": "ckpt"})


def batch_calls(run) -> list:
    data = [datum([1, 2, 3, 4]), datum([5, 6])]  # what fwdbwd_body sends
    return [run.forward_backward(data), run.optim_step(ADAM), run.save_state("ckpt")]


def test_rest_and_batch_write_the_same_rows(api, session_id, services, batch, enqueued):
    rest_id = api.ok("create_model", create_model_body(session_id))["model_id"]
    rest_calls(api, rest_id)
    run = batch.create_model(ALIAS, rank=8, user_metadata={"renderer_name": "qwen3"})
    sigs = [run.create, *batch_calls(run)]

    rest, scripted = stored(services, rest_id), stored(services, run.model_id)
    assert [r.kind for r in rest] == [r.kind for r in scripted] == [
        "create_model", "forward_backward", "optim_step", "save_weights"]
    assert [r.id for r in scripted] == [request_id(s) for s in sigs]
    assert len(enqueued) == len(rest)  # REST sent every call; the batch sent none
    for a, b in zip(rest, scripted, strict=True):
        assert (a.tenant, a.seq_id, a.queue, a.state) == (b.tenant, b.seq_id, b.queue, b.state)
        assert a.summary.replace(rest_id, "M") == b.summary.replace(run.model_id, "M")
        if a.kind == "forward_backward":  # the protobuf body, as the SDK would send it
            assert without_model_id(a.payload) == without_model_id(b.payload)
        else:
            assert json.loads(a.payload.decode().replace(rest_id, "M")) == json.loads(
                b.payload.decode().replace(run.model_id, "M"))


def test_bad_input_claims_the_seq_id_over_rest_but_not_in_a_batch(api, model_id, services,
                                                                  batch, enqueued):
    bad_adam = dict(ADAM, beta1=1.5)
    resp = api.post("optim_step", {"model_id": model_id, "seq_id": 1, "adam_params": bad_adam})
    assert resp.status_code == 400 and "beta1=1.5" in resp.get_json()["detail"]
    row = stored(services, model_id)[-1]
    assert (row.seq_id, row.state) == (1, FAILED)
    assert [r.id for r in enqueued] == [row.id]  # sent, so that the worker's order skips it

    run = batch.create_model(ALIAS, rank=8)
    with pytest.raises(ValueError, match=r"beta1=1\.5"):
        run.optim_step(bad_adam)
    with pytest.raises(ValueError, match=f"outside the vocabulary \\[0, {VOCAB}\\)"):
        run.forward_backward([datum([1, VOCAB])])
    assert [r.kind for r in stored(services, run.model_id)] == ["create_model"]
    assert run.next_seq == 1
    good = run.optim_step(ADAM)  # the refused calls took no seq_id
    assert [(r.seq_id, r.kind) for r in stored(services, run.model_id)][-1] == (1, "optim_step")
    assert request_id(good) == stored(services, run.model_id)[-1].id


def test_a_batch_run_again_gets_the_first_rows(app, settings, services):
    first = Batch.open(KEY, batch_id="again", settings=settings)
    run = first.create_model(ALIAS, rank=8)
    ids = [request_id(s) for s in [run.create, *batch_calls(run)]]
    again = Batch.open(KEY, batch_id="again", settings=settings)
    rerun = again.create_model(ALIAS, rank=8)
    assert [request_id(s) for s in [rerun.create, *batch_calls(rerun)]] == ids
    assert stored(services, run.model_id)[0].tenant == tenant_of(KEY)
    reopened = again.training_run(run.model_id)
    assert reopened.next_seq == 4  # after the three calls
    reopened.next_seq = 1  # a re-run that makes another call where the first made another
    with pytest.raises(ValueError, match="already a tinker.forward_backward call"):
        reopened.optim_step(ADAM)


def test_a_batch_sampler_may_name_weights_saved_later(app, settings, batch, services):
    run = batch.create_model(ALIAS, rank=8)
    path = run.sampler_path("later")
    sampler = batch.sampler(model_path=path)
    sig = sampler.sample(types.ModelInput.from_ints([1, 2]), 2,
                         types.SamplingParams(max_tokens=4))
    with services.store.transaction() as s:
        row = s.get(RequestRow, request_id(sig))
    data = json.loads(row.payload)
    assert data["adapter_dir"].endswith(f"{run.model_id}/sampler_weights/later")
    assert (data["prompt"], data["num_samples"], data["max_tokens"]) == ([1, 2], 2, 4)
    later = batch.sampler(model_path=f"tinker://{run.model_id}/weights/x")  # a save_state's
    with services.store.transaction() as s:
        folder = s.get(SamplerRow, later.sampler_id).checkpoint_dir
    assert folder.endswith(f"{run.model_id}/weights/x")
    with pytest.raises(ValueError, match="export for download"):
        batch.sampler(model_path=f"tinker://{run.model_id}/external_weights/x")
