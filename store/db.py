"""The store of one process: its engine, the one transaction helper, and the requests
repository (dedupe on (model | sampler, seq_id), results written back).

Shared by the web process (writes requests, reads results), batch scripts (write requests)
and the worker's tasks (write results). The schema is in `store.schema`; `create_schema()`
runs the alembic migrations (`store.migrate`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from store.engine import make_engine
from store.migrate import upgrade
from store.schema import PENDING, ApiKeyRow, ModelRow, RequestRow, SessionRow, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")
# The database is away (refused or dropped connection, a restart, a full pool, SQLite's
# lock): the web answers 503, and a worker's read or write waits for it (`patiently`).
UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


class Store:
    """The engine and session factory of one process."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commit on success, roll back on error, always close."""
        session = self.sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def patiently(self, fn: Callable[[], T], what: str, max_delay: float = 5.0) -> T:
        """`fn()`, tried again for as long as the database is away: the worker's reads and
        writes that must not be lost (a call's row, its answer) wait for it to come back."""
        delay, failures = 0.2, 0
        while True:
            try:
                return fn()
            except UNAVAILABLE as e:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    first = str(e.orig if getattr(e, "orig", None) else e).strip()
                    log.warning("%s: the database is away (%s); trying again (attempt %d)",
                                what, first.splitlines()[0] if first else type(e).__name__,
                                failures)
                time.sleep(delay)
                delay = min(delay * 2, max_delay)

    def request_holding(
        self, model_id: str | None, sampler_id: str | None, seq_id: int
    ) -> str | None:
        """The id of the request already holding (model_id | sampler_id, seq_id), if any."""
        key = RequestRow.model_id == model_id if model_id else RequestRow.sampler_id == sampler_id
        with self.transaction() as s:
            return s.scalars(select(RequestRow.id).where(key, RequestRow.seq_id == seq_id)).first()

    def pending_samples(self, queue: str) -> int:
        """Samples sent to `queue` and not yet answered."""
        with self.transaction() as s:
            return s.scalar(select(func.count(RequestRow.id)).where(
                RequestRow.queue == queue, RequestRow.kind == "sample",
                RequestRow.state == PENDING)) or 0

    def pending_counts(self, tenant: str, queue: str) -> tuple[int, int, int | None]:
        """Calls accepted and not yet answered: the tenant's, and `queue`'s (anyone's); and
        the tenant's own max_pending, if its key has one."""
        mine = func.count(RequestRow.id).filter(RequestRow.tenant == tenant)
        queued = func.count(RequestRow.id).filter(RequestRow.queue == queue)
        own = select(ApiKeyRow.max_pending).where(ApiKeyRow.tenant == tenant).scalar_subquery()
        with self.transaction() as s:  # one round trip: this runs before every submission
            row = s.execute(select(mine, queued, own).where(RequestRow.state == PENDING)).one()
            return int(row[0] or 0), int(row[1] or 0), row[2]

    def add_request(self, row: RequestRow, *creates: Any) -> str:
        """Insert `row` and the rows it brings into being (a model, a sampler) in one
        transaction, and return the id of the request that holds its (model | sampler,
        seq_id): `row.id`, or the first submission's when the key is taken (the SDK's
        resubmissions; a batch script run again). Nothing is written in that case.

        The one dedupe rule of every submission (tasks.submit); the caller enqueues only
        when the answer is `row.id`.
        """
        if row.seq_id is not None and (
            found := self.request_holding(row.model_id, row.sampler_id, row.seq_id)
        ):
            return found
        try:
            with self.transaction() as s:
                s.add_all([*creates, row])
                if row.model_id and not any(isinstance(r, ModelRow) for r in creates):
                    s.execute(
                        update(ModelRow)
                        .where(ModelRow.id == row.model_id)
                        .values(last_request_time=utcnow())
                    )
        except IntegrityError:  # lost a race with an identical submission
            if row.seq_id is not None and (
                found := self.request_holding(row.model_id, row.sampler_id, row.seq_id)
            ):
                return found
            raise
        return row.id

    def session_finished(self, session_id: str) -> bool:
        with self.transaction() as s:
            row = s.get(SessionRow, session_id)
            return row is not None and row.finished_at is not None

    def max_models(self, tenant: str) -> int | None:
        """The tenant's own limit on live runs, if its key has one."""
        with self.transaction() as s:
            return s.scalar(select(ApiKeyRow.max_models).where(ApiKeyRow.tenant == tenant))

    def live_models(self, tenant: str, idle_s: float) -> int:
        """The tenant's training runs whose session is neither finished nor silent for more
        than `idle_s` seconds (no heartbeat); copies (copy_weights) hold no worker memory."""
        cutoff = utcnow() - dt.timedelta(seconds=idle_s)
        with self.transaction() as s:
            return s.scalar(
                select(func.count(ModelRow.id))
                .join(SessionRow, SessionRow.id == ModelRow.session_id)
                .where(ModelRow.tenant == tenant, SessionRow.finished_at.is_(None),
                       SessionRow.last_heartbeat >= cutoff, ModelRow.copied_from.is_(None))
            ) or 0

    def create_schema(self) -> None:
        """Bring the schema to the newest migration (alembic upgrade head)."""
        upgrade(self.url)
