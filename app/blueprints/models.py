"""Training runs' lifecycle: create_model, get_info, load_weights (incl. create-via-load).

Model ids are "{session_id}:train:{model_seq_id}" — the SDK derives exactly this id on the
create-via-load path and never reads it from the answer (protocol note §5.2). Creations
are stored with seq_id 0, so a retried creation dedupes on (model_id, 0).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from app.blueprints.checks import (
    check_base_model,
    check_lora,
    check_optimizer_config,
    check_seq_id,
    parse_tinker_path,
)
from app.blueprints.common import (
    checkpoint_by_path,
    existing_request,
    field,
    future,
    json_body,
    load_model,
    new_request_id,
    owned,
    payload,
    seq_call,
    services,
    submit,
    tenant,
)
from protocol.errors import RequestError
from store.schema import CheckpointRow, ModelRow, RequestRow, SessionRow

bp = Blueprint("models", __name__)


def lora_of(model: ModelRow) -> dict[str, Any]:
    return {
        "rank": model.lora_rank,
        "seed": model.lora_seed,
        "train_attn": model.train_attn,
        "train_mlp": model.train_mlp,
        "train_unembed": model.train_unembed,
    }


def new_model_id(body: dict[str, Any]) -> str:
    """ "{session}:train:{model_seq_id}" for a session of the caller's."""
    with services().store.transaction() as s:
        session = owned(s, SessionRow, body.get("session_id"), "session")
    seq = field(body, "model_seq_id", int)
    if seq < 0:
        raise RequestError(400, f"model_seq_id={seq} must be >= 0")
    return f"{session.id}:train:{seq}"


def creation(model: ModelRow, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    row = RequestRow(
        id=new_request_id(),
        tenant=model.tenant,
        kind=kind,
        model_id=model.id,
        seq_id=0,
        queue=model.queue,
        payload=payload(data),
        summary=f"{kind} model={model.id} base={model.base_model} rank={model.lora_rank}",
    )
    return future(submit(row, model), model.id)


@bp.post("/create_model")
def create_model() -> dict[str, Any]:
    body = json_body()
    settings = services().settings
    model_id = new_model_id(body)
    if found := existing_request(model_id, None, 0):
        return future(found, model_id)
    base = check_base_model(field(body, "base_model", str), settings)
    lora = check_lora(field(body, "lora_config", dict, {}), settings)
    check_optimizer_config(body.get("optimizer_config"))
    model = ModelRow(
        id=model_id,
        tenant=tenant(),
        session_id=model_id.split(":")[0],
        base_model=base,
        lora_rank=lora["rank"],
        lora_seed=lora["seed"],
        train_attn=lora["train_attn"],
        train_mlp=lora["train_mlp"],
        train_unembed=lora["train_unembed"],
        user_metadata=field(body, "user_metadata", dict, {}),
        queue=settings.queue,
    )
    return creation(model, "create_model", {"model_id": model_id, "base_model": base, "lora": lora})


@bp.post("/get_info")
def get_info() -> dict[str, Any]:
    model = load_model(json_body().get("model_id"))
    info = services().model
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


def weights_source(path: Any) -> tuple[CheckpointRow, ModelRow]:
    """The caller's `weights` checkpoint at `path` and the run that saved it."""
    _, kind, _ = parse_tinker_path(path)
    if kind != "training":
        raise RequestError(
            400,
            f"load_weights needs a weights checkpoint "
            f"(tinker://<run>/weights/<name>), got {path!r}",
        )
    with services().store.transaction() as s:
        ckpt = checkpoint_by_path(s, path)
        source = owned(s, ModelRow, ckpt.model_id, "training run")
    return ckpt, source


def load_data(
    model_id: str, create: bool, body: dict[str, Any], ckpt: CheckpointRow, source: ModelRow
) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "create": create,
        "checkpoint_dir": ckpt.local_dir,
        "optimizer": field(body, "optimizer", bool, False),
        "tinker_path": ckpt.tinker_path,
        "base_model": source.base_model,
        "lora": lora_of(source),
    }


@bp.post("/load_weights")
def load_weights() -> dict[str, Any]:
    body = json_body()
    if body.get("model_id") is not None:
        return load_into(body)
    model_id = new_model_id(body)
    if found := existing_request(model_id, None, 0):
        return future(found, model_id)
    ckpt, source = weights_source(body.get("path"))
    if body.get("base_model") is not None:
        check_base_model(field(body, "base_model", str), services().settings)
    check_optimizer_config(body.get("optimizer_config"))
    metadata = field(body, "user_metadata", dict, None)
    model = ModelRow(
        id=model_id,
        tenant=tenant(),
        session_id=model_id.split(":")[0],
        base_model=source.base_model,
        lora_rank=source.lora_rank,
        lora_seed=source.lora_seed,
        train_attn=source.train_attn,
        train_mlp=source.train_mlp,
        train_unembed=source.train_unembed,
        queue=services().settings.queue,
        user_metadata=dict(source.user_metadata) if metadata is None else metadata,
    )
    return creation(model, "load_weights", load_data(model_id, True, body, ckpt, source))


def load_into(body: dict[str, Any]) -> dict[str, Any]:
    """Legacy form (deprecated `TrainingClient.load_state`): an existing model, a seq_id."""
    model = load_model(body.get("model_id"))
    seq = check_seq_id(body.get("seq_id"))

    def build() -> tuple[bytes, str]:
        ckpt, source = weights_source(body.get("path"))
        if source.lora_rank != model.lora_rank:
            raise RequestError(
                400,
                f"checkpoint {ckpt.tinker_path!r} has LoRA rank "
                f"{source.lora_rank}; model {model.id!r} has {model.lora_rank}",
            )
        return payload(load_data(model.id, False, body, ckpt, source)), f"from={ckpt.tinker_path}"

    return seq_call(model, seq, "load_weights", build)
