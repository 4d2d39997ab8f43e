"""A model's numbered calls: forward_backward (and forward), optim_step, save_weights,
save_weights_for_sampler. Each claims the model's seq_id, valid or not (common.seq_call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zstandard
from flask import Blueprint, request
from sqlalchemy import select

from app.blueprints.checks import (
    check_adam,
    check_checkpoint_name,
    check_forward_backward,
    check_seq_id,
)
from app.blueprints.common import (
    existing_request,
    field,
    future,
    json_body,
    load_model,
    new_request_id,
    payload,
    reject,
    seq_call,
    services,
    submit,
)
from protocol.errors import RequestError
from protocol.wire import WireError, decode_forward_backward
from store.schema import CheckpointRow, ModelRow, RequestRow, SamplerRow

bp = Blueprint("training", __name__)
MAX_BODY = 1 << 30  # decompressed forward_backward bodies larger than this are refused


def proto_body() -> bytes:
    if request.mimetype == "application/json":
        raise RequestError(400, "forward_backward takes a protobuf body (application/x-protobuf)")
    body = request.get_data()
    if request.headers.get("Content-Encoding", "").lower() != "zstd":
        return body
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            out = reader.read(MAX_BODY + 1)
    except zstandard.ZstdError as e:
        raise RequestError(400, f"body is not a valid zstd frame: {e}") from e
    if len(out) > MAX_BODY:
        raise RequestError(400, f"decompressed body exceeds {MAX_BODY} bytes")
    return out


@bp.post("/forward_backward")
def forward_backward() -> dict[str, Any]:
    body = proto_body()
    try:
        req = decode_forward_backward(body)
    except (WireError, ValueError) as e:
        raise RequestError(400, str(e)) from e
    model = load_model(req.model_id)
    kind = "forward" if req.forward_only else "forward_backward"

    def build() -> tuple[bytes, str]:
        check_forward_backward(req, services().settings, services().model.vocab_size)
        return body, f"loss={req.loss_fn} datums={len(req.data)} tokens={req.num_tokens}"

    return seq_call(model, check_seq_id(req.seq_id), kind, build)


@bp.post("/optim_step")
def optim_step() -> dict[str, Any]:
    body = json_body()
    model = load_model(body.get("model_id"))

    def build() -> tuple[bytes, str]:
        if body.get("optimizer_params") is not None:
            raise RequestError(
                400,
                "optimizer_params is not supported: this server trains with AdamW (adam_params)",
            )
        adam = check_adam(field(body, "adam_params", dict, {}))
        return payload({"adam_params": adam}), f"lr={adam['learning_rate']:g}"

    return seq_call(model, check_seq_id(body.get("seq_id")), "optim_step", build)


def checkpoint_dir(model: ModelRow, segment: str, name: str) -> Path:
    return services().settings.checkpoint_root / model.tenant / model.id / segment / name


def check_new_name(model: ModelRow, kind: str, name: str, overwrite: bool) -> None:
    """400 (never 409: the SDK retries 409 for minutes) when the name is taken."""
    with services().store.transaction() as s:
        taken = s.scalars(
            select(CheckpointRow.id).where(
                CheckpointRow.model_id == model.id,
                CheckpointRow.kind == kind,
                CheckpointRow.name == name,
            )
        ).first()
    if taken is not None and not overwrite:
        raise RequestError(
            400,
            f"checkpoint {name!r} already exists for {model.id!r}; "
            "choose another name or pass overwrite=true",
        )


@bp.post("/save_weights")
def save_weights() -> dict[str, Any]:
    body = json_body()
    model = load_model(body.get("model_id"))

    def build() -> tuple[bytes, str]:
        name = check_checkpoint_name(body.get("path"))
        check_new_name(model, "training", name, field(body, "overwrite", bool, False))
        path = f"tinker://{model.id}/weights/{name}"
        data = {"checkpoint_dir": str(checkpoint_dir(model, "weights", name)), "tinker_path": path,
                **checkpoint_extras(body)}
        return payload(data), f"path={path}"

    return seq_call(model, check_seq_id(body.get("seq_id")), "save_weights", build)


@bp.post("/save_weights_for_sampler")
def save_weights_for_sampler() -> dict[str, Any]:
    body = json_body()
    model = load_model(body.get("model_id"))
    if body.get("path") is None and body.get("sampling_session_seq_id") is not None:
        return save_for_session(model, body)

    def build() -> tuple[bytes, str]:
        check_kind(body)
        name = check_checkpoint_name(body.get("path"))
        check_new_name(model, "sampler", name, False)
        path = f"tinker://{model.id}/sampler_weights/{name}"
        data = {
            "checkpoint_dir": str(checkpoint_dir(model, "sampler_weights", name)),
            "tinker_path": path,
            "sampling_session_id": None,
            **checkpoint_extras(body),
        }
        return payload(data), f"path={path}"

    return seq_call(model, check_seq_id(body.get("seq_id")), "save_weights_for_sampler", build)


def checkpoint_extras(body: dict[str, Any]) -> dict[str, Any]:
    """What a named checkpoint keeps besides its files: its lifetime and the caller's tags."""
    ttl = field(body, "ttl_seconds", int, None)
    if ttl is not None and ttl < 1:
        raise RequestError(400, f"ttl_seconds={ttl} must be at least 1 (omit it: never expires)")
    return {"ttl_seconds": ttl, "user_metadata": field(body, "user_metadata", dict, None)}


def check_kind(body: dict[str, Any]) -> None:
    kind = body.get("kind", "snapshot")
    if kind != "snapshot":
        raise RequestError(400, f"kind={kind!r} is not supported (supported: 'snapshot')")


def save_for_session(model: ModelRow, body: dict[str, Any]) -> dict[str, Any]:
    """Path-less save (save_weights_and_get_sampling_client): the sampling session is
    created now, with the folder the save will write, so the answer can name it."""
    seq_id = check_seq_id(body.get("seq_id"))
    if found := existing_request(model.id, None, seq_id):
        return future(found, model.id)
    n = body.get("sampling_session_seq_id")
    sampler_id = f"{model.session_id}:sample:{n}"
    row = RequestRow(
        id=new_request_id(),
        tenant=model.tenant,
        kind="save_weights_for_sampler",
        model_id=model.id,
        seq_id=seq_id,
        queue=model.queue,
        summary=f"model={model.id} seq={seq_id} sampler={sampler_id}",
    )
    try:
        check_kind(body)
        if type(n) is not int or n < 0:
            raise RequestError(400, f"sampling_session_seq_id={n!r} must be an integer >= 0")
        with services().store.transaction() as s:
            if s.get(SamplerRow, sampler_id) is not None:
                raise RequestError(400, f"sampling session {sampler_id!r} already exists")
    except RequestError as e:
        reject(row, e.message)
    folder = checkpoint_dir(model, "sampler_weights", "_session") / sampler_id
    sampler = SamplerRow(
        id=sampler_id,
        tenant=model.tenant,
        session_id=model.session_id,
        base_model=model.base_model,
        model_path=None,
        checkpoint_dir=str(folder),
        queue=model.queue,
    )
    row.payload = payload(
        {"checkpoint_dir": str(folder), "tinker_path": None, "sampling_session_id": sampler_id}
    )
    row.summary = f"save_weights_for_sampler {row.summary}"
    return future(submit(row, sampler), model.id)
