"""Client bootstrap and service endpoints: client/config, dynamic_config, telemetry,
healthz, get_server_capabilities."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from app.blueprints.common import services
from tasks import placement

bp = Blueprint("client", __name__)


@bp.post("/client/config")
def client_config() -> dict[str, Any]:
    # Otherwise the SDK's defaults suit this server (plain proto bodies).
    return {
        "pjwt_auth_enabled": True,  # the SDK sends a JWT of auth/token: whoami reads it
        "sample_use_retrieve_futures": True,  # one long-poll per sampling client
        "sample_join_sampling_session": True,  # unpickled clients get unique clone ids
        "custom_loss_server_side": True,  # create_custom_loss graphs run in the trainer
    }


@bp.post("/client/dynamic_config")
def dynamic_config() -> dict[str, Any]:
    # abandoned samples are cancelled (cancel_future) instead of running to the end
    return {"sample_cancel_enabled": True, "sample_cancel_max_batch_size": 64}


@bp.post("/telemetry")
def telemetry() -> dict[str, Any]:
    return {"status": "accepted"}  # accepted and dropped


@bp.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@bp.get("/get_server_capabilities")
def server_capabilities() -> dict[str, Any]:
    settings = services().settings
    names = placement.served(services().submit)
    models = [
        {
            "model_name": name,
            "max_context_length": settings.max_seq_len,
            "trainable": True,
            "sampleable": True,
        }
        for name in names
    ]
    return {"supported_models": models}
