"""What a worker reads to rebuild a run it does not hold: where the run's settled calls
end, and the done calls that changed its state after a snapshot (tasks/recovery.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from protocol.jobs import REPLAYED_KINDS
from store.schema import DONE, PENDING, ModelRow, RequestRow, SessionRow


def first_pending(s: Session, model_id: str) -> int:
    """The run's first numbered call not settled yet (pending), or one past its last call:
    every call below it is done or failed, so its effect is known."""
    low = s.scalar(select(func.min(RequestRow.seq_id)).where(
        RequestRow.model_id == model_id, RequestRow.state == PENDING, RequestRow.seq_id > 0))
    if low is not None:
        return int(low)
    high = s.scalar(select(func.max(RequestRow.seq_id)).where(RequestRow.model_id == model_id))
    return int(high or 0) + 1


def done_calls(s: Session, model_id: str, after: int, before: int) -> Sequence[Any]:
    """The run's done calls with after < seq_id < before that changed its state, in order:
    rows of (id, kind, seq_id, payload)."""
    return s.execute(
        select(RequestRow.id, RequestRow.kind, RequestRow.seq_id, RequestRow.payload)
        .where(RequestRow.model_id == model_id, RequestRow.state == DONE,
               RequestRow.seq_id > after, RequestRow.seq_id < before,
               RequestRow.kind.in_(sorted(REPLAYED_KINDS)))
        .order_by(RequestRow.seq_id)
    ).all()


def finished_runs(s: Session, model_ids: list[str]) -> set[str]:
    """Those of `model_ids` that will take no call again: gone, or of a finished session
    with none of their calls pending (their snapshots may go)."""
    live = set(s.scalars(
        select(ModelRow.id).join(SessionRow, SessionRow.id == ModelRow.session_id)
        .where(ModelRow.id.in_(model_ids), SessionRow.finished_at.is_(None))))
    waiting = set(s.scalars(select(RequestRow.model_id).where(
        RequestRow.model_id.in_(model_ids), RequestRow.state == PENDING)))
    return set(model_ids) - live - waiting
