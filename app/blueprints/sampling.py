"""Sampling: create_sampling_session, GET samplers/<id>, asample.

Sampler ids are "{session_id}:sample:{sampling_session_seq_id}" (the counter is shared
with path-less save_weights_for_sampler). Samples have no order; (sampler_id, seq_id)
only dedupes the SDK's resubmissions.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from app.blueprints.common import json_body, services, tenant
from tasks import calls

bp = Blueprint("sampling", __name__)


@bp.post("/create_sampling_session")
def create_sampling_session() -> dict[str, Any]:
    sampler = calls.create_sampler(services().submit, tenant(), json_body())
    return {"type": "create_sampling_session", "sampling_session_id": sampler.id}


@bp.get("/samplers/<sampler_id>")
def get_sampler(sampler_id: str) -> dict[str, Any]:
    sampler = services().submit.load_sampler(tenant(), sampler_id)
    return {
        "sampler_id": sampler.id,
        "base_model": sampler.base_model,
        "model_path": sampler.model_path,
    }


@bp.post("/asample")
def asample() -> dict[str, Any]:
    return calls.sample(services().submit, tenant(), json_body())
