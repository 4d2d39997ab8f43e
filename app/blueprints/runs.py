"""REST views of training runs and checkpoints (protocol note §5.4): training_runs,
checkpoints per run and per user, checkpoint deletion, weights_info."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, request
from sqlalchemy import or_, select

from app.blueprints.common import (
    audit_checkpoint,
    checkpoint_by_path,
    count,
    json_body,
    owned,
    page_args,
    services,
    str_values,
    tenant,
)
from protocol.checks import field
from protocol.errors import RequestError
from protocol.paths import parse_tinker_path
from store import checkpoints
from store.schema import CheckpointRow, ModelRow, SessionRow, utcnow

bp = Blueprint("runs", __name__)


def iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat() + "Z"  # stored naive UTC


def checkpoint_json(c: CheckpointRow) -> dict[str, Any]:
    return {
        "checkpoint_id": f"{c.segment}/{c.name}",
        "checkpoint_type": c.kind,
        "time": iso(c.created_at),
        "tinker_path": c.tinker_path,
        "size_bytes": c.size_bytes,
        "public": c.public,
        "user_metadata": str_values(c.user_metadata),
        "expires_at": iso(c.expires_at),
    }


def unexpired() -> Any:
    return or_(CheckpointRow.expires_at.is_(None), CheckpointRow.expires_at > utcnow())


def latest(s: Any, model_id: str, kind: str) -> dict[str, Any] | None:
    row = s.scalars(
        select(CheckpointRow)
        .where(CheckpointRow.model_id == model_id, CheckpointRow.kind == kind, unexpired())
        .order_by(CheckpointRow.created_at.desc(), CheckpointRow.id.desc())
    ).first()
    return checkpoint_json(row) if row else None


def run_json(s: Any, m: ModelRow) -> dict[str, Any]:
    return {
        "training_run_id": m.id,
        "base_model": m.base_model,
        "model_owner": m.tenant,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": m.lora_rank,
        "last_request_time": iso(m.last_request_time),
        "last_checkpoint": latest(s, m.id, "training"),
        "last_sampler_checkpoint": latest(s, m.id, "sampler"),
        "user_metadata": str_values(m.user_metadata),
    }


def cursor(offset: int, limit: int, total: int) -> dict[str, int]:
    return {"offset": offset, "limit": limit, "total_count": total}


def _scope() -> Any:
    """The runs a call may see: the caller's (`access_scope=owned`, the default), or with
    `accessible` also every run holding a published, unexpired checkpoint."""
    scope = request.args.get("access_scope", "owned")
    if scope not in ("owned", "accessible"):
        raise RequestError(400, f"access_scope={scope[:40]!r} must be owned or accessible")
    mine = ModelRow.tenant == tenant()
    if scope == "owned":
        return mine
    published = select(CheckpointRow.model_id).where(CheckpointRow.public.is_(True),
                                                      unexpired())
    return or_(mine, ModelRow.id.in_(published))


@bp.get("/training_runs")
def list_runs() -> dict[str, Any]:
    limit, offset = page_args()
    query = select(ModelRow).where(_scope())
    if (project := request.args.get("project_id")) is not None:
        sessions = select(SessionRow.id).where(SessionRow.project_id == project)
        query = query.where(ModelRow.session_id.in_(sessions))
    with services().store.transaction() as s:
        total = count(s, query)
        rows = s.scalars(
            query.order_by(ModelRow.created_at, ModelRow.id).limit(limit).offset(offset)
        )
        runs = [run_json(s, m) for m in rows]
    return {"training_runs": runs, "cursor": cursor(offset, limit, total)}


@bp.get("/training_runs/<run_id>")
def get_run(run_id: str) -> dict[str, Any]:
    with services().store.transaction() as s:
        row = s.scalars(select(ModelRow).where(ModelRow.id == run_id, _scope())).first()
        if row is None:
            raise RequestError(404, f"training run {run_id[:80]!r} not found")
        return run_json(s, row)


def list_checkpoints(where: Any, limit: int | None, offset: int) -> dict[str, Any]:
    """A page of the caller's unexpired checkpoints, newest first (all of them: no limit)."""
    query = select(CheckpointRow).where(CheckpointRow.tenant == tenant(), where, unexpired())
    with services().store.transaction() as s:
        total = count(s, query)
        rows = s.scalars(
            query.order_by(CheckpointRow.created_at.desc(), CheckpointRow.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return {
            "checkpoints": [checkpoint_json(c) for c in rows],
            "cursor": cursor(offset, total if limit is None else limit, total),
        }


@bp.get("/training_runs/<run_id>/checkpoints")
def run_checkpoints(run_id: str) -> dict[str, Any]:
    """Every checkpoint of the run (the SDK asks for no page), or a page when asked."""
    with services().store.transaction() as s:
        owned(s, ModelRow, run_id, "training run")
    limit, offset = page_args() if request.args else (None, 0)
    return list_checkpoints(CheckpointRow.model_id == run_id, limit, offset)


@bp.get("/checkpoints")
def user_checkpoints() -> dict[str, Any]:
    limit, offset = page_args()
    return list_checkpoints(True, limit, offset)


@bp.delete("/training_runs/<run_id>/checkpoints/<path:checkpoint_id>")
def delete_checkpoint(run_id: str, checkpoint_id: str) -> dict[str, Any]:
    path = f"tinker://{run_id}/{checkpoint_id}"
    parse_tinker_path(path)
    with services().store.transaction() as s:
        ckpt = checkpoint_by_path(s, path)
        audit_checkpoint(s, ckpt, "checkpoint_delete")
        s.delete(ckpt)
    checkpoints.remove_files(services().settings.checkpoint_root, ckpt.local_dir)
    return {}


@bp.post("/weights_info")
def weights_info() -> dict[str, Any]:
    path = field(json_body(), "tinker_path", str)
    parse_tinker_path(path)
    with services().store.transaction() as s:
        ckpt = checkpoint_by_path(s, path, read=True)  # a published one too
        m = services().submit.owned(s, ckpt.tenant, ModelRow, ckpt.model_id, "training run")
    return {
        "base_model": m.base_model,
        "is_lora": True,
        "lora_rank": m.lora_rank,
        "train_unembed": m.train_unembed,
        "train_mlp": m.train_mlp,
        "train_attn": m.train_attn,
    }
