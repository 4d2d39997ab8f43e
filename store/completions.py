"""A sampling session's completions, as retrieve_futures reports them, and its clone ids.

A SamplingClient (or an unpickled clone of it, `cloned_sampler_id` c) numbers its samples
seq_id = c * 10^9 + n, so a poll's target is the session's finished samples in that block.
The cursor is per target and counts polls that reported something new:

- a poll sends the cursor of the last answer it received, `prev`;
- samples first reported in an answer after `prev` (one the client never saw: it was lost
  on the way back) are reported again, with what finished since, which gets the next cursor;
- samples reported at or before `prev` are never reported again.

So a lost answer loses nothing and a seen completion comes back never, whatever order the
workers commit their results in (a cursor is given at poll time, not at finish time).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update

from store.db import Store
from store.schema import DONE, FAILED, RequestRow, SamplerRow

CLONE_BLOCK = 1_000_000_000
MAX_REPORT = 1000  # completions in one answer; the rest come with the next poll


def _target(sampler_id: str, clone: int) -> Any:
    return (RequestRow.sampler_id == sampler_id,
            RequestRow.seq_id >= clone * CLONE_BLOCK,
            RequestRow.seq_id < (clone + 1) * CLONE_BLOCK)


def report(store: Store, sampler_id: str, clone: int, prev: int
           ) -> tuple[list[dict[str, Any]], int]:
    """(completions, cursor) for one poll of the target; an empty list keeps `prev`."""
    target = _target(sampler_id, clone)
    columns = (RequestRow.id, RequestRow.state, func.length(RequestRow.result),
               RequestRow.report_cursor)
    with store.transaction() as s:
        resent = s.execute(select(*columns).where(*target, RequestRow.report_cursor > prev)
                           .limit(MAX_REPORT)).all()
        fresh = s.execute(
            select(*columns)
            .where(*target, RequestRow.state.in_((DONE, FAILED)),
                   RequestRow.report_cursor.is_(None))
            .limit(MAX_REPORT - len(resent))
        ).all() if len(resent) < MAX_REPORT else []
        cursor = max([prev, *(r.report_cursor for r in resent)])
        if fresh:
            newest = s.scalar(select(func.max(RequestRow.report_cursor)).where(*target))
            cursor = max(cursor, newest or 0) + 1
            s.execute(update(RequestRow).where(RequestRow.id.in_([r.id for r in fresh]))
                      .values(report_cursor=cursor))
    return [_completion(r) for r in (*resent, *fresh)], cursor


def _completion(row: Any) -> dict[str, Any]:
    if row.state == FAILED:
        return {"state": "failed", "request_id": row.id}
    return {"state": "finished", "request_id": row.id,
            "response_payload_uncompressed_size": row[2]}


def join(store: Store, sampler_id: str) -> int:
    """A new clone id of the sampling session: 1, 2, ... (the original client is 0)."""
    with store.transaction() as s:
        s.execute(update(SamplerRow).where(SamplerRow.id == sampler_id)
                  .values(clients=SamplerRow.clients + 1))
        return int(s.scalar(select(SamplerRow.clients).where(SamplerRow.id == sampler_id)))
