"""Sampling: create_sampling_session, GET samplers/<id>, asample.

Sampler ids are "{session_id}:sample:{sampling_session_seq_id}" (the counter is shared
with path-less save_weights_for_sampler). Samples have no order; (sampler_id, seq_id)
only dedupes the SDK's resubmissions.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from sqlalchemy.exc import IntegrityError

from app.blueprints.checks import check_base_model, check_sample, parse_tinker_path
from app.blueprints.common import (
    checkpoint_by_path,
    field,
    future,
    json_body,
    new_request_id,
    owned,
    payload,
    services,
    submit,
    tenant,
)
from protocol.errors import RequestError
from store.schema import ModelRow, RequestRow, SamplerRow, SessionRow

bp = Blueprint("sampling", __name__)


def sampler_answer(sampler: SamplerRow) -> dict[str, Any]:
    return {"type": "create_sampling_session", "sampling_session_id": sampler.id}


@bp.post("/create_sampling_session")
def create_sampling_session() -> dict[str, Any]:
    body = json_body()
    try:
        return new_sampler(body)
    except IntegrityError:  # an identical creation won the race
        return new_sampler(body)


def new_sampler(body: dict[str, Any]) -> dict[str, Any]:
    settings = services().settings
    with services().store.transaction() as s:
        session = owned(s, SessionRow, body.get("session_id"), "session")
        n = field(body, "sampling_session_seq_id", int)
        if n < 0:
            raise RequestError(400, f"sampling_session_seq_id={n} must be >= 0")
        sampler_id = f"{session.id}:sample:{n}"
        if (old := s.get(SamplerRow, sampler_id)) is not None:
            return sampler_answer(old)  # a retried creation
        sampler = SamplerRow(
            id=sampler_id,
            tenant=tenant(),
            session_id=session.id,
            queue=settings.queue,
            base_model="",
            model_path=None,
        )
        if (path := body.get("model_path")) is not None:
            _, kind, _ = parse_tinker_path(path)
            if kind != "sampler":
                raise RequestError(400, f"model_path {path!r} must be a sampler_weights checkpoint")
            ckpt = checkpoint_by_path(s, path)
            source = owned(s, ModelRow, ckpt.model_id, "training run")
            sampler.base_model, sampler.model_path = source.base_model, path
            sampler.checkpoint_dir = ckpt.local_dir
        else:
            sampler.base_model = check_base_model(field(body, "base_model", str), settings)
        s.add(sampler)
    return sampler_answer(sampler)


@bp.get("/samplers/<sampler_id>")
def get_sampler(sampler_id: str) -> dict[str, Any]:
    with services().store.transaction() as s:
        sampler = owned(s, SamplerRow, sampler_id, "sampler")
    return {
        "sampler_id": sampler.id,
        "base_model": sampler.base_model,
        "model_path": sampler.model_path,
    }


@bp.post("/asample")
def asample() -> dict[str, Any]:
    body = json_body()
    with services().store.transaction() as s:
        sampler = owned(s, SamplerRow, body.get("sampling_session_id"), "sampler")
    seq_id = field(body, "seq_id", int)
    data = check_sample(body, services().settings, services().model.vocab_size)
    data["adapter_dir"] = sampler.checkpoint_dir
    row = RequestRow(
        id=new_request_id(),
        tenant=sampler.tenant,
        kind="sample",
        sampler_id=sampler.id,
        seq_id=seq_id,
        queue=sampler.queue,
        payload=payload(data),
        summary=(
            f"sample sampler={sampler.id} seq={seq_id} n={data['num_samples']} "
            f"prompt={len(data['prompt'])} max_tokens={data['max_tokens']}"
        )[:256],
    )
    request_id = submit(row)
    ids = [f"{request_id}:{j}" for j in range(data["num_samples"])]
    return future(request_id, sample_sequence_ids=ids)
