"""What an owner does with a saved checkpoint besides listing and deleting it (runs.py):
download an export through signed URLs, set its lifetime, publish it, copy it.

    GET  training_runs/<run>/checkpoints/external_weights/<name>/external_weights_urls
    GET  downloads/<token>/<file>        no API key: the signed token is the permission
    PUT  training_runs/<run>/checkpoints/<segment>/<name>/ttl      {"ttl_seconds": int|null}
    POST|DELETE training_runs/<run>/checkpoints/<segment>/<name>/publish
    POST copy_weights

A published checkpoint can be loaded (create_training_client_from_state) and sampled
(create_sampling_session) by any key until its owner unpublishes it; it never shows in
another key's listings. A copy is a new training run of the caller's that holds one
checkpoint (its files hard links to the source's) and takes no calls.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from pathlib import Path
from typing import Any

from flask import Blueprint, request, send_file
from sqlalchemy import select

from app.blueprints.common import (
    audit_checkpoint,
    checkpoint_by_path,
    json_body,
    public_link,
    services,
    tenant,
)
from app.blueprints.runs import iso
from protocol import paths
from protocol.checks import field
from protocol.errors import RequestError, bad
from store import checkpoints
from store.downloads import file_token, files_of, grants, open_file_token
from store.schema import CheckpointRow, ModelRow, SessionRow, utcnow
from tasks.saves import MAX_TTL_SECONDS
from tasks.submit import expired

bp = Blueprint("checkpoints", __name__)


def _path(run_id: str, segment: str, name: str) -> str:
    if segment not in paths.SEGMENTS:
        raise bad(f"checkpoint segment {segment!r} must be one of {sorted(paths.SEGMENTS)}")
    return paths.checkpoint_path(run_id, segment, paths.check_name(name))


# --- downloads of exported weights ----------------------------------------------------------


@bp.get("/training_runs/<run_id>/checkpoints/external_weights/<name>/external_weights_urls")
def external_weights_urls(run_id: str, name: str) -> dict[str, Any]:
    path = _path(run_id, "external_weights", name)
    with services().store.transaction() as s:
        ckpt = checkpoint_by_path(s, path)
        audit_checkpoint(s, ckpt, "checkpoint_read", purpose="download")
    signer = services().signer
    expires = utcnow() + dt.timedelta(seconds=signer.max_age_s)
    urls = {file: public_link("checkpoints.download", token=file_token(signer, ckpt, file),
                              file=file) for file in files_of(ckpt.local_dir)}
    return {"urls": urls, "expires": iso(expires)}


@bp.get("/downloads/<token>/<path:file>")
def download(token: str, file: str) -> Any:
    grant = open_file_token(services().signer, token)
    with services().store.transaction() as s:
        ckpt = s.scalars(
            select(CheckpointRow).where(CheckpointRow.tinker_path == grant.tinker_path)
        ).first()
    if ckpt is None or expired(ckpt) or not grants(grant, ckpt):
        raise RequestError(404, f"checkpoint {grant.tinker_path!r} no longer exists")
    folder = Path(ckpt.local_dir).resolve()
    target = (folder / grant.file).resolve()
    if not target.is_relative_to(folder) or not target.is_file():
        raise RequestError(404, f"{grant.file!r} is not a file of {grant.tinker_path!r}")
    return send_file(target, mimetype="application/octet-stream", as_attachment=True,
                     download_name=target.name, max_age=0)


# --- lifetime and visibility ----------------------------------------------------------------


@bp.put("/training_runs/<run_id>/checkpoints/<segment>/<name>/ttl")
def set_ttl(run_id: str, segment: str, name: str) -> dict[str, Any]:
    ttl = _ttl(json_body())
    with services().store.transaction() as s:
        ckpt = checkpoint_by_path(s, _path(run_id, segment, name))
        ckpt.expires_at = None if ttl is None else utcnow() + dt.timedelta(seconds=ttl)
        audit_checkpoint(s, ckpt, "checkpoint_ttl_set", ttl_seconds=ttl)
    return {}


def _ttl(body: dict[str, Any]) -> int | None:
    ttl = field(body, "ttl_seconds", int, None)
    if ttl is not None and not 1 <= ttl <= MAX_TTL_SECONDS:
        raise bad(f"ttl_seconds={ttl} must be between 1 and {MAX_TTL_SECONDS} (10 years), "
                  "or null: never expires")
    return ttl


@bp.post("/training_runs/<run_id>/checkpoints/<segment>/<name>/publish")
def publish(run_id: str, segment: str, name: str) -> dict[str, Any]:
    return _set_public(_path(run_id, segment, name), True)


@bp.delete("/training_runs/<run_id>/checkpoints/<segment>/<name>/publish")
def unpublish(run_id: str, segment: str, name: str) -> dict[str, Any]:
    return _set_public(_path(run_id, segment, name), False)


def _set_public(path: str, public: bool) -> dict[str, Any]:
    with services().store.transaction() as s:
        ckpt = checkpoint_by_path(s, path)
        ckpt.public = public
        audit_checkpoint(s, ckpt, "checkpoint_publish" if public else "checkpoint_unpublish")
    return {}


# --- copies ---------------------------------------------------------------------------------


@bp.post("/copy_weights")
def copy_weights() -> dict[str, Any]:
    body = json_body()
    sub, me = services().submit, tenant()
    ttl = _ttl(body)
    token = request.headers.get("X-Tinker-Weights-Access-Token") or body.get(
        "weights_access_token")
    source_path = field(body, "source_path", str)
    _, kind, name = paths.parse_tinker_path(source_path)
    with services().store.transaction() as s:
        source = sub.checkpoint(s, me, source_path, read=True, access_token=token)
        audit_checkpoint(s, source, "checkpoint_read", purpose="copy")
        run = s.get(ModelRow, source.model_id)
        if run is None:
            raise RequestError(404, f"the training run of {source_path!r} no longer exists")
        model_id, session_id = _destination(s, body)
        if (done := s.get(ModelRow, model_id)) is not None:  # a retried copy
            if done.tenant != me or done.copied_from != source_path:
                raise bad(f"training run {model_id!r} already exists")
            return {"tinker_path": paths.checkpoint_path(model_id, paths.SEGMENT_OF[kind], name)}
        base = {c: getattr(run, c) for c in ("base_model", "lora_rank", "lora_seed",
                                             "train_attn", "train_mlp", "train_unembed")}
        s.add(ModelRow(id=model_id, tenant=me, session_id=session_id, queue=run.queue,
                       user_metadata={}, copied_from=source_path, **base))
        segment = paths.SEGMENT_OF[kind]
        folder = checkpoints.folder(sub.settings.checkpoint_root, me, model_id, segment, name)
        size = checkpoints.link_copy(source.local_dir, folder)
        path = paths.checkpoint_path(model_id, segment, name)
        checkpoints.record(s, me, {
            "model_id": model_id, "kind": kind, "name": name, "tinker_path": path,
            "local_dir": str(folder), "size_bytes": size, "ttl_seconds": ttl,
            "user_metadata": source.user_metadata,
        })
    return {"tinker_path": path}


def _destination(s: Any, body: dict[str, Any]) -> tuple[str, str]:
    """(run id, session id) of the copy: the slot the caller names in its session, or a run
    in a session of its own for a destination project (the same one again for a retry that
    carries the same X-Idempotency-Key)."""
    sub, me = services().submit, tenant()
    if body.get("session_id") is not None:
        session = sub.open_session(s, me, body.get("session_id"))
        n = field(body, "model_seq_id", int)
        if n < 0:
            raise bad(f"model_seq_id={n} must be >= 0")
        return paths.model_id(session.id, n), session.id
    project = field(body, "destination_project_id", str, None)
    if not project:
        raise bad("copy_weights needs a destination_project_id, or a session_id and "
                  "model_seq_id")
    key = request.headers.get("X-Idempotency-Key") or uuid.uuid4().hex
    session_id = "copy-" + hashlib.sha256(f"{me}\0{key}".encode()).hexdigest()[:24]
    if s.get(SessionRow, session_id) is None:
        s.add(SessionRow(id=session_id, tenant=me, project_id=project[:256],
                         tags=["copy_weights"], finished_at=utcnow(),
                         finish_reason="copy_weights"))
        s.flush()
    return paths.model_id(session_id, 0), session_id
