"""The worker registry: which GPU workers are alive, what they serve, and the calls no live
worker holds.

A worker beats (`beat`) every few seconds from its housekeeping thread, with what it serves
(its base model's names and folder, its GPUs, its runs). The API lists the base models of
the live workers (`live`: beaten within failover_after_s), places a new training run on the
live worker of its base model that holds the fewest runs (`pick_trainer`) and a sampling
session on the one with the fewest unanswered samples (`pick_sampler`). A live worker takes
over the runs, samplers and pending calls of a queue of its base model whose workers have
been silent for failover_after_s (`dead_queues`, `take_over`). Its request sweep
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

from store.schema import (
    FAILED,
    PENDING,
    ModelRow,
    RequestRow,
    SamplerRow,
    SessionRow,
    WorkerRow,
    utcnow,
)

FORGET_AFTER = dt.timedelta(days=1)  # a worker row silent this long is deleted


def beat(s: Session, worker_id: str, queue: str, host: str, pid: int, base_model: str,
         **serves: Any) -> None:
    """Record that the worker is alive now (its first beat creates its row), and what it
    serves: `names`, `model_path`, `gpus`, `runs`, `max_runs` (WorkerRow's columns)."""
    now = utcnow()
    row = s.get(WorkerRow, worker_id)
    if row is None:
        row = WorkerRow(id=worker_id, queue=queue, host=host, pid=pid, base_model=base_model,
                        started_at=now)
        s.add(row)
    row.heartbeat_at = now
    for name, value in serves.items():
        setattr(row, name, value)
    s.execute(delete(WorkerRow).where(WorkerRow.heartbeat_at < now - FORGET_AFTER))


def live(s: Session, within: dt.timedelta) -> list[WorkerRow]:
    """The workers that beat within `within`, newest first."""
    return list(s.scalars(select(WorkerRow).where(WorkerRow.heartbeat_at >= utcnow() - within)
                          .order_by(WorkerRow.heartbeat_at.desc())))


def registered(s: Session) -> list[WorkerRow]:
    """Every worker that beat within the last FORGET_AFTER, live or not."""
    return list(s.scalars(select(WorkerRow).order_by(WorkerRow.heartbeat_at.desc())))


def serving(s: Session, name: str, within: dt.timedelta) -> list[WorkerRow]:
    """The live workers whose base model answers to `name` (its name or an alias), one per
    queue."""
    found: dict[str, WorkerRow] = {}
    for row in live(s, within):
        if name in names_of(row) and row.queue not in found:
            found[row.queue] = row
    return list(found.values())


def model_path(s: Session, name: str) -> str | None:
    """The folder of base model `name` as its most recent worker registered it."""
    for row in s.scalars(select(WorkerRow).order_by(WorkerRow.heartbeat_at.desc())):
        if name in names_of(row) and row.model_path:
            return row.model_path
    return None


def names_of(row: WorkerRow) -> list[str]:
    return [n for n in (row.names or row.base_model).split(",") if n]


def pick_trainer(s: Session, name: str, within: dt.timedelta) -> WorkerRow | None:
    """The live worker of base model `name` for a new training run: the fewest runs of
    live sessions assigned to its queue (a creation counts from its transaction on), then
    the queue's name."""
    assigned = dict(s.execute(
        select(ModelRow.queue, func.count()).join(SessionRow, SessionRow.id == ModelRow.session_id)
        .where(SessionRow.finished_at.is_(None)).group_by(ModelRow.queue)).all())
    rows = serving(s, name, within)
    return min(rows, key=lambda r: (assigned.get(r.queue, 0), r.queue), default=None)


def pick_sampler(s: Session, name: str, within: dt.timedelta) -> WorkerRow | None:
    """The live worker of base model `name` for a new sampling session: the fewest
    unanswered samples, then the queue's name."""
    waiting = dict(s.execute(select(RequestRow.queue, func.count()).where(
        RequestRow.state == PENDING, RequestRow.kind == "sample").group_by(RequestRow.queue)).all())
    rows = serving(s, name, within)
    return min(rows, key=lambda r: (waiting.get(r.queue, 0), r.queue), default=None)


def dead_queues(s: Session, base_model: str, mine: str, after: dt.timedelta
                ) -> list[tuple[str, dt.datetime]]:
    """The queues of base model `base_model` (not `mine`) whose workers have all been
    silent for `after`, and that still own runs, samplers or pending calls: (queue, its
    last heartbeat)."""
    last = dict(s.execute(select(WorkerRow.queue, func.max(WorkerRow.heartbeat_at))
                          .where(WorkerRow.base_model == base_model, WorkerRow.queue != mine)
                          .group_by(WorkerRow.queue)).all())
    dead = {q: seen for q, seen in last.items() if seen < utcnow() - after}
    owned: set[str] = set()
    for column, *pending in ((ModelRow.queue,), (SamplerRow.queue,),
                             (RequestRow.queue, RequestRow.state == PENDING)):
        owned |= set(s.scalars(select(column).where(column.in_(list(dead)), *pending).distinct()))
    return sorted((q, seen) for q, seen in dead.items() if q in owned)


def take_over(s: Session, queue: str, mine: str) -> tuple[int, int, Sequence[Any]]:
    """Move the runs, samplers and pending calls of `queue` to `mine`; returns how many
    runs and samplers moved, and the moved calls as (id, kind, summary, queue) rows."""
    runs = s.execute(update(ModelRow).where(ModelRow.queue == queue).values(queue=mine))
    samplers = s.execute(update(SamplerRow).where(SamplerRow.queue == queue).values(queue=mine))
    calls = s.execute(select(RequestRow.id).where(RequestRow.queue == queue,
                                                  RequestRow.state == PENDING)).scalars().all()
    s.execute(update(RequestRow).where(RequestRow.id.in_(calls), RequestRow.queue == queue)
              .values(queue=mine))  # (another taker may have moved some first)
    moved = s.execute(select(RequestRow.id, RequestRow.kind, RequestRow.summary,
                             RequestRow.queue).where(RequestRow.id.in_(calls),
                                                     RequestRow.queue == mine)
                      .order_by(RequestRow.created_at)).all() if calls else []
    return runs.rowcount, samplers.rowcount, moved


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
