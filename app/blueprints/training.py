"""A model's numbered calls: forward_backward (and forward), optim_step, save_weights,
save_weights_for_sampler, save_weights_external. Each claims the model's seq_id, valid or
not (tasks/submit.py)."""

from __future__ import annotations

from typing import Any

import zstandard
from flask import Blueprint, request

from app.blueprints.common import json_body, numbered_body, services, tenant
from protocol.errors import RequestError
from tasks import calls, custom_losses, saves

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
    return calls.forward_backward(services().submit, tenant(), proto_body())


@bp.post("/optim_step")
def optim_step() -> dict[str, Any]:
    return calls.optim_step(services().submit, tenant(), *numbered_body())


@bp.post("/save_weights")
def save_weights() -> dict[str, Any]:
    return saves.save_weights(services().submit, tenant(), *numbered_body())


@bp.post("/save_weights_for_sampler")
def save_weights_for_sampler() -> dict[str, Any]:
    return saves.save_weights_for_sampler(services().submit, tenant(), *numbered_body())


@bp.post("/create_custom_loss")
def create_custom_loss() -> dict[str, Any]:
    return custom_losses.create(services().submit, tenant(), json_body())


@bp.post("/save_weights_external")
def save_weights_external() -> dict[str, Any]:
    return saves.save_weights_external(services().submit, tenant(), *numbered_body())
