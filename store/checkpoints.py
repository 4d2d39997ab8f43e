"""The checkpoint store: where a checkpoint's files live, and its rows.

    <checkpoint_root>/<tenant>/<run>/weights/<name>/            adapter + optimizer state
    <checkpoint_root>/<tenant>/<run>/sampler_weights/<name>/    the peft adapter
    <checkpoint_root>/<tenant>/<run>/sampler_weights/_session/<sampler>/
                                                               a path-less sampler save
    <checkpoint_root>/<tenant>/<run>/external_weights/<name>/   an export for download

Rows past their `expires_at` are hidden at once (tasks.submit.expired) and deleted, files
and all, by the worker's sweep (`sweep_expired`). A copy (copy_weights) hard-links the
source's files, so the bytes are stored once and either side may be deleted alone.

The API names each folder when it accepts a save; the worker writes it (workers/checkpoints.py)
and its task records the row (`record`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from protocol.paths import SEGMENTS
from store.db import Store
from store.schema import CheckpointRow, utcnow
from store.usage import audit

log = logging.getLogger(__name__)


def folder(root: Path, tenant: str, run_id: str, segment: str, name: str) -> Path:
    """The folder of checkpoint `name` of run `run_id` (segment weights | sampler_weights)."""
    return root / tenant / run_id / segment / name


def name_taken(store: Store, run_id: str, kind: str, name: str) -> bool:
    with store.transaction() as s:
        found = s.scalars(
            select(CheckpointRow.id).where(
                CheckpointRow.model_id == run_id,
                CheckpointRow.kind == kind,
                CheckpointRow.name == name,
            )
        ).first()
    return found is not None


def record(db: Session, tenant: str, ckpt: dict[str, Any]) -> None:
    """Insert or replace (overwrite) the checkpoint's row; a TTL becomes its expiry time."""
    ttl = ckpt.pop("ttl_seconds", None)
    expires_at = utcnow() + dt.timedelta(seconds=ttl) if ttl else None
    old = (
        db.query(CheckpointRow)
        .filter_by(model_id=ckpt["model_id"], kind=ckpt["kind"], name=ckpt["name"])
        .one_or_none()
    )
    if old is not None:
        db.delete(old)
        db.flush()
    db.add(CheckpointRow(tenant=tenant, expires_at=expires_at, **ckpt))
    audit(db, tenant, "checkpoint_create", model_id=ckpt["model_id"],
          tinker_path=ckpt["tinker_path"], checkpoint_type=ckpt["kind"],
          size_bytes=ckpt.get("size_bytes"))


def remove_files(root: Path, local_dir: str) -> None:
    """Delete one checkpoint's folder: never the checkpoint root, a tenant's, a run's or a
    segment's folder (a name that resolves to one of them), nor anything outside the root."""
    path, root = Path(local_dir).resolve(), Path(root).resolve()
    if path.is_relative_to(root) and len(path.relative_to(root).parts) >= 4 \
            and path.parent.name in SEGMENTS:
        shutil.rmtree(path, ignore_errors=True)


def sweep_expired(store: Store, root: Path, now: dt.datetime | None = None) -> list[str]:
    """Delete every checkpoint past its expiry: its row, then its files. Several sweepers
    may run (one per worker): each row is deleted once, by whoever deletes it first.
    Returns the tinker paths deleted here."""
    now = now or utcnow()
    with store.transaction() as s:
        due = s.execute(
            select(CheckpointRow.id, CheckpointRow.tinker_path, CheckpointRow.local_dir)
            .where(CheckpointRow.expires_at.is_not(None), CheckpointRow.expires_at <= now)
        ).all()
    deleted = []
    for row_id, path, local_dir in due:
        with store.transaction() as s:
            tenant = s.scalar(select(CheckpointRow.tenant).where(CheckpointRow.id == row_id))
            gone = s.execute(delete(CheckpointRow).where(CheckpointRow.id == row_id)).rowcount
            if gone:
                audit(s, str(tenant), "checkpoint_expire", tinker_path=path)
        if gone:
            remove_files(root, local_dir)
            deleted.append(path)
            log.info("checkpoint %s expired: deleted", path)
    return deleted


def link_copy(src: str, dst: Path) -> int:
    """Make `dst` a copy of the checkpoint folder `src` whose files are hard links (a plain
    copy where the file system cannot link); returns its size in bytes. `dst` appears whole
    or not at all."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-copy-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
