"""The checkpoint store: where a checkpoint's files live, and its rows.

    <checkpoint_root>/<tenant>/<run>/weights/<name>/            adapter + optimizer state
    <checkpoint_root>/<tenant>/<run>/sampler_weights/<name>/    the peft adapter
    <checkpoint_root>/<tenant>/<run>/sampler_weights/_session/<sampler>/
                                                               a path-less sampler save

The API names each folder when it accepts a save; the worker writes it (workers/checkpoints.py)
and its task records the row (`record`).
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from protocol.paths import SEGMENTS
from store.db import Store
from store.schema import CheckpointRow, utcnow


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


def remove_files(root: Path, local_dir: str) -> None:
    """Delete one checkpoint's folder: never the checkpoint root, a tenant's, a run's or a
    segment's folder (a name that resolves to one of them), nor anything outside the root."""
    path, root = Path(local_dir).resolve(), Path(root).resolve()
    if path.is_relative_to(root) and len(path.relative_to(root).parts) >= 4 \
            and path.parent.name in SEGMENTS:
        shutil.rmtree(path, ignore_errors=True)
