"""The one submit path of every Tinker call: validate, write the request row (with the rows
it brings into being), dedupe, send its task. The REST API and batch scripts both call it.

Each verb takes the caller's tenant and the body the SDK sends (a JSON object, or the
protobuf bytes of forward_backward) and answers the future `{"request_id", "model_id"?}`.
The verbs that name checkpoints, runs and samplers live in `tasks.calls`; this module holds
what they share:

- Only ids travel: the row holds the payload the engine needs, and its task carries the
  row's id. The row is committed before the task is sent; if the broker refuses, the rows
  are removed and the caller gets 503 (the SDK retries).
- (model_id, seq_id) and (sampler_id, seq_id) are unique: a resubmission answers the first
  request and sends nothing (`Store.add_request`); creations use seq_id 0.
- A model's numbered call that fails validation still claims its seq_id (REST): its row is
  stored failed and sent, so that the worker's per-model order skips it instead of waiting
  on a gap. Batch scripts number their own calls, so for them (`claim_rejected=False`) a bad
  call raises before anything is written.
- Every lookup filters on the tenant: another tenant's id is a missing id (404). A
  checkpoint is the one exception: its owner may publish it for every key to read, or the
  caller may show the owner's key as a `weights_access_token`. An expired checkpoint is
  missing for everyone, before the sweeper has deleted it.
- A finished session (`ServiceClient.close`) takes no more calls: its runs are released from
  the worker's memory (`retire_runs`), and new calls on them or new runs and samplers in it
  are refused (400).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config import Settings
from protocol.errors import RequestError
from store.db import Store
from store.model_info import ModelInfo
from store.schema import (
    FAILED,
    CheckpointRow,
    ModelRow,
    RequestRow,
    SamplerRow,
    SessionRow,
    tenant_of,
    utcnow,
)

log = logging.getLogger(__name__)
Send = Callable[[RequestRow], None]
Retire = Callable[[str, list[str]], None]  # (queue, model ids): release them once idle
Build = Callable[[], tuple[bytes, str]]  # validates; returns (payload, summary)
Check = Callable[[], None]  # the body's schema check (app/schemas.py), run as build's first
T = TypeVar("T")
RETRY_SOON = {"Retry-After": "1"}


def expired(row: CheckpointRow | None) -> bool:
    return row is not None and row.expires_at is not None and row.expires_at <= utcnow()


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def payload(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def future(request_id: str, model_id: str | None = None, **extra: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"request_id": request_id}
    if model_id is not None:
        answer["model_id"] = model_id
    return answer | extra


class Submitter:
    """The submit path of one process (the web app, or a batch script)."""

    def __init__(self, settings: Settings, store: Store, model: ModelInfo, send: Send | None,
                 claim_rejected: bool = True, retire: Retire | None = None):
        self.settings = settings
        self.store = store
        self.model = model  # the served base model's config (vocabulary size)
        self.send = send  # None: the caller sends the tasks itself (a batch's chain)
        self.claim_rejected = claim_rejected
        self.retire = retire  # None: finished sessions' runs leave memory when idle only

    # --- lookups within a tenant ----------------------------------------------------------

    def owned(self, s: Session, tenant: str, row_type: type[T], row_id: Any, what: str) -> T:
        row = s.get(row_type, row_id) if isinstance(row_id, str) else None
        if row is None or row.tenant != tenant:  # type: ignore[attr-defined]
            raise RequestError(404, f"{what} {row_id!r} not found")
        return row

    def open_session(self, s: Session, tenant: str, session_id: Any) -> SessionRow:
        """The caller's session, refused (400) once it is finished."""
        row = self.owned(s, tenant, SessionRow, session_id, "session")
        if row.finished_at is not None:
            raise RequestError(400, finished_message(row.id))
        return row

    def checkpoint(self, s: Session, tenant: str, tinker_path: str, *, read: bool = False,
                   access_token: Any = None) -> CheckpointRow:
        """The checkpoint at `tinker_path` if the caller owns it; with `read`, also one its
        owner published, or one owned by the key given as `access_token`."""
        row = s.scalars(
            select(CheckpointRow).where(CheckpointRow.tinker_path == tinker_path)
        ).first()
        readers = {tenant}
        if isinstance(access_token, str) and access_token.startswith("tml-"):
            readers.add(tenant_of(access_token))
        visible = row is not None and (row.tenant == tenant or read and (
            row.public or row.tenant in readers))
        if not visible or expired(row):
            raise RequestError(404, f"checkpoint {tinker_path!r} not found")
        return row

    def load_model(self, tenant: str, model_id: Any) -> ModelRow:
        with self.store.transaction() as s:
            return self.owned(s, tenant, ModelRow, model_id, "model")

    def load_sampler(self, tenant: str, sampler_id: Any) -> SamplerRow:
        with self.store.transaction() as s:
            return self.owned(s, tenant, SamplerRow, sampler_id, "sampler")

    # --- writing and sending --------------------------------------------------------------

    def submit(self, row: RequestRow, *creates: Any) -> str:
        """Insert `row` (with rows it creates) in one transaction, commit, send; a taken
        (model | sampler, seq_id) answers the first request and sends nothing."""
        self._admit(row)
        try:
            request_id = self.store.add_request(row, *creates)
        except IntegrityError as e:
            raise RequestError(400, f"request conflicts with an existing record: {e.orig}") from e
        if request_id == row.id:
            self._send(row, [*creates, row])
        return request_id

    def _admit(self, row: RequestRow) -> None:
        """Backpressure: a 429 with Retry-After (the SDK waits and sends again) while the
        caller's unanswered calls reach max_pending_per_tenant or the worker queue's reach
        max_pending_per_queue. A resent call already accepted never gets here."""
        if row.state == FAILED:
            return  # a refused call, stored failed
        mine, queued, own = self.store.pending_counts(row.tenant, row.queue)
        limits = self.settings.max_pending_per_tenant, self.settings.max_pending_per_queue
        if mine >= (own if own is not None else limits[0]):
            which = f"its own max_pending={own}" if own is not None else \
                f"max_pending_per_tenant={limits[0]}"
            raise RequestError(429, f"this API key has {mine} calls not yet answered "
                                    f"({which}); wait for their results before sending more",
                               RETRY_SOON)
        if queued >= limits[1]:
            raise RequestError(429, f"the worker queue {row.queue!r} holds {queued} calls not "
                                    f"yet answered (max_pending_per_queue={limits[1]}); "
                                    "send again shortly", RETRY_SOON)

    def _send(self, row: RequestRow, rows: list[Any]) -> None:
        if self.send is None:
            return
        try:
            self.send(row)
        except Exception as e:  # the broker is down: undo, so that a retry starts afresh
            log.exception("enqueue of %s failed", row.id)
            with self.store.transaction() as s:
                for r in reversed(rows):
                    s.delete(s.merge(r))
            raise RequestError(
                503, f"could not enqueue the request ({type(e).__name__}); retry"
            ) from e

    def reject(self, row: RequestRow, message: str) -> NoReturn:
        """Refuse a numbered call after claiming its seq_id: the row is stored failed and
        sent anyway, so that the worker's per-model order skips over it."""
        row.state, row.error, row.error_category = FAILED, message, "user"
        row.summary = f"{row.kind} {row.summary} rejected"[:256]
        row.finished_at = utcnow()
        row.payload = b"{}"
        try:
            with self.store.transaction() as s:
                s.add(row)
        except IntegrityError:
            raise RequestError(400, message) from None  # the seq_id is already taken
        self._send(row, [row])
        raise RequestError(400, message)

    def numbered(self, model: ModelRow, seq_id: int, kind: str, build: Build,
                 check: Check | None = None) -> dict[str, Any]:
        """Submit a model's numbered call. A resent seq_id is answered with the original
        request before anything is checked again; otherwise `check()` and `build()` validate
        (a 400 from either still claims the seq_id, see `reject`) and build gives the
        payload."""
        if found := self.store.request_holding(model.id, None, seq_id):
            return future(found, model.id)
        row = RequestRow(
            id=new_request_id(),
            tenant=model.tenant,
            kind=kind,
            model_id=model.id,
            seq_id=seq_id,
            queue=model.queue,
            summary=f"model={model.id} seq={seq_id}",
        )
        try:
            if model.copied_from is not None:
                raise RequestError(400, f"training run {model.id!r} is a copy of "
                                        f"{model.copied_from!r}: it takes no calls; load its "
                                        "checkpoint into a new run to train on it")
            if self.store.session_finished(model.session_id):
                raise RequestError(400, finished_message(model.session_id))
            if check is not None:
                check()
            row.payload, summary = build()
        except RequestError as e:
            if e.status != 400 or not self.claim_rejected:
                raise
            self.reject(row, e.message)
        row.summary = f"{kind} {row.summary} {summary}"[:256]
        return future(self.submit(row), model.id)

    def retire_runs(self, runs: list[tuple[str, str]]) -> None:
        """Ask each run's worker to release it from memory once its calls are done. Best
        effort: a run whose message is lost is released when idle (release_idle_s)."""
        if self.retire is None:
            return
        by_queue: dict[str, list[str]] = {}
        for model_id, queue in runs:
            by_queue.setdefault(queue, []).append(model_id)
        for queue, model_ids in by_queue.items():
            try:
                self.retire(queue, model_ids)
            except Exception:  # noqa: BLE001 - the broker is away: idle release covers it
                log.warning("could not ask queue %s to release %s", queue, model_ids,
                            exc_info=True)

    def creation(self, model: ModelRow, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """A run's creation (create_model, create-via-load): seq_id 0, with its model row.
        A tenant keeps at most max_models_per_tenant live runs, or its key's own max_models
        (see Store.live_models)."""
        own = self.store.max_models(model.tenant)
        limit = own if own is not None else self.settings.max_models_per_tenant
        if self.store.live_models(model.tenant, self.settings.session_idle_s) >= limit:
            which = "its own max_models" if own is not None else "max_models_per_tenant"
            raise RequestError(429, f"this API key already has {which}={limit} "
                                    "live training runs; finish sessions you no longer use "
                                    "(ServiceClient.close) before creating another",
                               {"Retry-After": "10"})
        row = RequestRow(
            id=new_request_id(),
            tenant=model.tenant,
            kind=kind,
            model_id=model.id,
            seq_id=0,
            queue=model.queue,
            payload=payload(data),
            summary=f"{kind} model={model.id} base={model.base_model} rank={model.lora_rank}",
        )
        return future(self.submit(row, model), model.id)


def finished_message(session_id: str) -> str:
    return (f"session {session_id!r} is finished (ServiceClient.close): it takes no more "
            "calls; start a new ServiceClient, and load saved state into it to go on")
