"""Which GPU workers are alive, and the calls no live worker holds.

A worker beats (`beat`) every few seconds from its housekeeping thread. Its request sweep
(`unanswered`) finds the calls of its queue that wait with no message behind them, to send
again; and `retrieve_future` fails a call (`abandon`) whose queue has had no live worker for
worker_lost_s, so that no future waits for ever.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from store.schema import FAILED, PENDING, RequestRow, WorkerRow, utcnow

FORGET_AFTER = dt.timedelta(days=1)  # a worker row silent this long is deleted


def beat(s: Session, worker_id: str, queue: str, host: str, pid: int, base_model: str) -> None:
    """Record that the worker is alive now (its first beat creates its row)."""
    now = utcnow()
    row = s.get(WorkerRow, worker_id)
    if row is None:
        s.add(WorkerRow(id=worker_id, queue=queue, host=host, pid=pid, base_model=base_model,
                        started_at=now, heartbeat_at=now))
    else:
        row.heartbeat_at = now
    s.execute(delete(WorkerRow).where(WorkerRow.heartbeat_at < now - FORGET_AFTER))


def last_seen(s: Session, queue: str) -> dt.datetime | None:
    """The newest heartbeat of any worker of `queue` (None: none ever beat)."""
    return s.scalar(select(func.max(WorkerRow.heartbeat_at)).where(WorkerRow.queue == queue))


def unanswered(s: Session, queue: str, older_than: dt.timedelta,
               limit: int = 1000) -> Sequence[Any]:
    """Pending calls of `queue` created more than `older_than` ago, oldest first: rows of
    (id, kind, summary, queue)."""
    return s.execute(
        select(RequestRow.id, RequestRow.kind, RequestRow.summary, RequestRow.queue)
        .where(RequestRow.queue == queue, RequestRow.state == PENDING,
               RequestRow.created_at < utcnow() - older_than)
        .order_by(RequestRow.created_at).limit(limit)
    ).all()


def abandon(s: Session, request_id: str, queue: str, lost_after: dt.timedelta) -> bool:
    """Fail the pending call `request_id` with a `server` error if it and its queue's
    workers have been silent for `lost_after`; True if it was failed now."""
    now = utcnow()
    seen = last_seen(s, queue)
    if seen is not None and now - seen < lost_after:
        return False
    silent = (f"no worker of queue {queue!r} has ever been seen" if seen is None else
              f"the worker of queue {queue!r} was last seen "
              f"{(now - seen).total_seconds():.0f} s ago")
    message = (f"{silent}: this call waited past worker_lost_s="
               f"{lost_after.total_seconds():.0f} and was not run; send it again once a "
               "worker serves the queue")
    done = s.execute(
        update(RequestRow)
        .where(RequestRow.id == request_id, RequestRow.state == PENDING,
               RequestRow.created_at < now - lost_after)
        .values(state=FAILED, error=message, error_category="server", finished_at=now)
    )
    return bool(done.rowcount)
