"""Training runs' lifecycle: create_model, get_info, load_weights (incl. create-via-load).

Creations are stored with seq_id 0, so a retried creation dedupes on (model_id, 0); the
calls themselves are in tasks/calls.py.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from app.blueprints.common import json_body, numbered_body, services, tenant
from tasks import calls, placement

bp = Blueprint("models", __name__)


@bp.post("/create_model")
def create_model() -> dict[str, Any]:
    return calls.create_model(services().submit, tenant(), json_body())


@bp.post("/get_info")
def get_info() -> dict[str, Any]:
    model = services().submit.load_model(tenant(), json_body().get("model_id"))
    info = placement.model_info(services().submit, model.base_model)
    return {
        "type": "get_info",
        "model_id": model.id,
        "model_data": {
            "arch": info.arch,
            "model_name": model.base_model,
            "tokenizer_id": info.tokenizer_id,
        },
        "is_lora": True,
        "lora_rank": model.lora_rank,
        "model_name": model.base_model,
    }


@bp.post("/load_weights")
def load_weights() -> dict[str, Any]:
    return calls.load_weights(services().submit, tenant(), *numbered_body())
