"""Sampling: create_sampling_session, GET samplers/<id>, join_sampling_session, asample.

Sampler ids are "{session_id}:sample:{sampling_session_seq_id}" (the counter is shared
with path-less save_weights_for_sampler). Samples have no order; (sampler_id, seq_id)
only dedupes the SDK's resubmissions.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from app.blueprints.common import json_body, services, tenant
from protocol.errors import RequestError
from store import completions
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


@bp.post("/join_sampling_session")
def join_sampling_session() -> dict[str, Any]:
    """An unpickled SamplingClient's clone id (it numbers its samples from id * 10^9), unique
    in the session; the SDK asks once `sample_join_sampling_session` is on."""
    body = json_body()
    sampler = services().submit.load_sampler(tenant(), body.get("sampling_session_id"))
    clone = completions.join(services().store, sampler.id)
    return {"type": "join_sampling_session", "client_counter": clone}


@bp.post("/asample")
def asample() -> Any:
    body = json_body()
    if request.headers.get("X-Tinker-Sampling-Backpressure") == "1":
        backpressure(body)
    return calls.sample(services().submit, tenant(), body)


def backpressure(body: dict[str, Any]) -> None:
    """A 429 (the SDK backs off a second and sends again) while the sampler's queue holds
    `sample_max_pending` unanswered samples; a resent seq_id is never refused."""
    sub, limit = services().submit, services().settings.sample_max_pending
    sampler = sub.load_sampler(tenant(), body.get("sampling_session_id"))
    seq_id = body.get("seq_id")
    if isinstance(seq_id, int) and sub.store.request_holding(None, sampler.id, seq_id):
        return
    pending = sub.store.pending_samples(sampler.queue)
    if pending >= limit:
        raise RequestError(429, f"the sampler queue {sampler.queue!r} holds {pending} "
                                f"unanswered samples (sample_max_pending={limit}); "
                                "send again shortly")
