"""Request retention: finished calls older than `request_retention_s` are deleted (row,
payload and result), all but those that recovery or a retry may still read (no torch here).

A run is rebuilt after a worker crash from its newest usable snapshot and its done calls
after that snapshot's seq_id (tasks/recovery.py). So of a run that may take calls again (not
one of store.replay.finished_runs) the sweep keeps:

- every numbered call from the seq_id of its newest usable snapshot on, that call included
  (when nothing is pending, replay.first_pending starts past the run's highest seq_id, so the
  highest must stay); every numbered call while the run has no snapshot;
- its creation (seq_id 0): a retried create_model is answered with it.

Kept whatever their run: a sample recorded for stable_reinforce until request_retention_s
after its record expires (`stability_expires_at`), and a create_custom_loss future (a
retried creation answers it; one small row per loss). A deleted id is unknown to
retrieve_future (404), and usage reports (store/usage.py) no longer count its tokens.

The sweep reads the calls oldest first (the index on requests.finished_at), `chunk` rows at a
time, each chunk looked at and deleted in one short transaction; on PostgreSQL its rows are
locked with SKIP LOCKED, so the sweeps of several workers never wait on one another.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from store import replay, snapshots
from store.db import Store
from store.schema import DONE, FAILED, RequestRow, utcnow

CHUNK = 1000
KEPT_KINDS = ("create_custom_loss",)


def prune(store: Store, snapshot_root: Path, older_than: dt.timedelta,
          now: dt.datetime | None = None, chunk: int = CHUNK) -> int:
    """Delete the finished calls older than `older_than` that nothing needs; returns how
    many. `snapshot_root`: the runs' snapshots (settings.snapshot_root)."""
    now = now or utcnow()
    bounds: dict[str, int | None] = {}  # run -> its deletable seq_ids (see _bounds)
    after: tuple[dt.datetime, str] | None = None  # the last row looked at (finished_at, id)
    deleted = 0
    while True:
        with store.transaction() as s:
            rows = s.execute(_candidates(now - older_than, after, chunk)).all()
            runs = {r.model_id for r in rows if r.model_id and r.seq_id is not None}
            bounds |= _bounds(s, snapshot_root, runs - bounds.keys())
            ids = [r.id for r in rows if not _kept(r, bounds)]
            if ids:
                deleted += s.execute(delete(RequestRow).where(RequestRow.id.in_(ids))).rowcount
        if len(rows) < chunk:
            return deleted
        after = (rows[-1].finished_at, rows[-1].id)  # past the rows kept


def _candidates(cutoff: dt.datetime, after: tuple[dt.datetime, str] | None,
                chunk: int) -> Any:
    """The next `chunk` calls finished before `cutoff`, oldest first (the index on
    finished_at), past `after`; a recorded sample counts from its record's expiry."""
    query = (
        select(RequestRow.id, RequestRow.finished_at, RequestRow.model_id, RequestRow.seq_id)
        .where(RequestRow.finished_at < cutoff, RequestRow.state.in_((DONE, FAILED)),
               or_(RequestRow.stability_expires_at.is_(None),
                   RequestRow.stability_expires_at < cutoff),
               RequestRow.kind.not_in(KEPT_KINDS))
        .order_by(RequestRow.finished_at, RequestRow.id).limit(chunk)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has no row locks
    )
    if after is None:
        return query
    at, request_id = after
    return query.where(RequestRow.finished_at >= at, or_(
        RequestRow.finished_at > at, RequestRow.id > request_id))


def _bounds(s: Session, root: Path, runs: set[str]) -> dict[str, int | None]:
    """Per run, None: it takes no call again, all its calls may go; n: it is live, its
    numbered calls with 0 < seq_id < n may go (n is its newest usable snapshot's seq_id, 0
    without a snapshot: none goes)."""
    if not runs:
        return {}
    done = replay.finished_runs(s, sorted(runs))
    out: dict[str, int | None] = dict.fromkeys(done)
    for run in sorted(runs - done):
        usable = snapshots.newest_usable(root, run, replay.first_pending(s, run))
        out[run] = usable[0] if usable else 0
    return out


def _kept(row: Any, bounds: dict[str, int | None]) -> bool:
    if row.model_id is None or row.seq_id is None:
        return False  # a sample, a save, an unnumbered call: nothing replays it
    bound = bounds[row.model_id]
    return bound is not None and not 0 < row.seq_id < bound
