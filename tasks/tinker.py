"""The Tinker-call tasks: thin, idempotent, carrying only a request id.

Each task reads its request row, hands a `Job` to the worker's engine and waits for the
engine's tick to answer it, stores the answer in the row (and the checkpoint row, if the
call wrote one), rings the doorbell so a waiting `retrieve_future` returns, and only then
returns (late ack). A row that is already finished is not computed again: a training call
becomes a `skip` job that only advances its model's seq_id order. A call of a run that this
process does not hold (its worker died) first queues the run's restore (tasks/recovery.py).
While the database is away the task waits for it, holding its answer: an answer is never
dropped, and the message is acknowledged only once the answer is stored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from celery import signals

from config import logs
from protocol.jobs import ALL_KINDS, CREATION_KINDS, OPENING_KINDS, TRAIN_KINDS, Job, Outcome
from protocol.wire import decode_sample_sequences
from store import checkpoints
from store.db import Store
from store.doorbell import Doorbell, sampler_bell
from store.schema import DONE, FAILED, RequestRow, utcnow
from tasks import housekeeping, recovery
from tasks.celery_app import celery_app
from tasks.enqueue import RELEASE_TASK, task_name

log = logging.getLogger(__name__)


class _WorkerContext:
    """Per-process handles of the GPU worker, built on first use (never at import)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: tuple[Store, Doorbell, Any] | None = None

    def get(self) -> tuple[Store, Doorbell, Any]:
        with self._lock:
            if self._built is None:
                from workers.engine import Engine  # torch enters the process here

                settings = celery_app.conf.tinkerq_settings
                store = Store(settings.database)
                store.patiently(store.create_schema, "migrating the database")
                engine = Engine.start(settings, lambda m: recovery.first_pending(store, m))
                self._built = (store, Doorbell(settings.redis), engine)
            return self._built


context = _WorkerContext()


STARTED = time.time()  # this worker process's start: what it was handed later is its own


@signals.worker_ready.connect
def _warm_up(sender: Any = None, **_: Any) -> None:
    """Take back what a dead predecessor held, then load the model as soon as the GPU
    worker is up, not on the first call, and start the checkpoint sweep."""
    queue = celery_app.conf.tinkerq_settings.queue
    if queue in _consumed_queues(sender):
        restored = restore_orphans(queue, STARTED)
        if restored:
            log.warning("put back %d call(s) that a previous worker of queue %s had taken "
                        "and not finished", restored, queue)
        store, _, engine = context.get()
        settings = celery_app.conf.tinkerq_settings
        if settings.metrics_port:
            from workers import metrics

            metrics.serve(settings.metrics_host, settings.metrics_port, engine,
                          lambda: queue_depth(queue))
        housekeeping.start(store, celery_app.conf.tinkerq_settings, held, resend,
                           lambda: queue_depth(queue), lambda: len(engine.executor.runs))


def restore_orphans(queue: str, before: float) -> int:
    """Requeue the messages of `queue` that were delivered before `before` and never
    acknowledged: the calls an earlier process of this worker held when it died (killed,
    out of memory, a tensor-parallel rank lost). Late acknowledgement keeps them in Redis,
    but its transport hands them out again only after the visibility timeout (hours); at
    start-up they can only be orphans, because a queue has one GPU worker. Each is then run
    or, if its row is already finished, skipped. Returns how many were put back."""
    restored = 0
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        qos = channel.qos
        if not hasattr(qos, "restore_by_tag"):  # not the Redis transport
            return 0
        with channel.conn_or_acquire() as client:
            for tag in client.zrangebyscore(qos.unacked_index_key, "-inf", before):
                raw = client.hget(qos.unacked_key, tag)
                if raw is None:
                    continue
                _, exchange, routing_key = json.loads(raw)
                if queue in (exchange, routing_key):
                    qos.restore_by_tag(tag, client)
                    restored += 1
    return restored


def _consumed_queues(consumer: Any) -> set[str]:
    try:
        return {q.name for q in consumer.task_consumer.queues}
    except AttributeError:
        return set()


def _job_for(row: RequestRow) -> Job:
    kind = row.kind
    if row.finished:
        kind = "skip"
    seq_id = None if row.kind in CREATION_KINDS and row.seq_id == 0 else row.seq_id
    return Job(
        request_id=row.id,
        kind=kind,
        payload=row.payload,
        model_id=row.model_id,
        seq_id=seq_id,
        sampler_id=row.sampler_id,
    )


def _usage(job: Job, outcome: Outcome) -> dict[str, int]:
    """The tokens a request trained, prefilled and sampled (store/usage.py)."""
    if job.kind in TRAIN_KINDS and job.invalid is None:
        return {"tokens_in": job.body.num_tokens}
    if job.kind == "sample" and outcome.proto is not None:
        prompt, n = len(job.body["prompt"]), job.body["num_samples"]
        sampled = sum(len(s.tokens) for s in decode_sample_sequences(outcome.proto))
        return {"tokens_in": prompt, "tokens_cached": prompt * (n - 1), "tokens_out": sampled}
    return {}


def _store(store: Store, request_id: str, outcome: Outcome, job: Job | None = None) -> None:
    with store.transaction() as db:
        row = db.get(RequestRow, request_id)
        if row is None or row.finished:
            return
        row.finished_at = utcnow()
        row.compute_seconds = outcome.compute_seconds
        if outcome.ok:
            for name, value in (_usage(job, outcome) if job else {}).items():
                setattr(row, name, value)
            row.state = DONE
            if outcome.proto is not None:
                row.result, row.result_type = outcome.proto, "proto"
            else:
                row.result, row.result_type = json.dumps(outcome.json).encode(), "json"
            if outcome.checkpoint:
                checkpoints.record(db, row.tenant, outcome.checkpoint)
        else:
            row.state, row.error, row.error_category = FAILED, outcome.error, outcome.category


_HELD: set[str] = set()  # request ids inside run_request in this process
_held_lock = threading.Lock()


def held() -> set[str]:
    """The calls this process is running now (the request sweeper leaves them alone)."""
    with _held_lock:
        return set(_HELD)


def resend(request_id: str, kind: str, summary: str, queue: str) -> None:
    """Send a stored call's task again (the sweeper: its message was lost)."""
    celery_app.send_task(task_name(kind), args=[request_id], kwargs={"summary": summary},
                         queue=queue)


def queue_depth(queue: str) -> int:
    """Messages waiting in the broker for `queue` (not yet delivered to a worker)."""
    with celery_app.connection_for_write() as conn:
        try:
            declared = conn.default_channel.queue_declare(queue=queue, passive=True)
        except conn.channel_errors:  # Redis drops an empty queue's key: nothing waits
            return 0
        return int(declared.message_count)


def run_request(request_id: str) -> str:
    with _held_lock:
        _HELD.add(request_id)
    token = logs.REQUEST_ID.set(request_id)  # every line logged for this call names it
    started = time.perf_counter()
    try:
        answer = _run(request_id)
        log.info("%s in %.3f s", answer, time.perf_counter() - started)
        return answer
    finally:
        logs.REQUEST_ID.reset(token)
        with _held_lock:
            _HELD.discard(request_id)


def _read(store: Store, request_id: str) -> tuple[Job, str, str] | None:
    """The call's job, the queue that runs it now and its kind (a finished call's job is a
    `skip`)."""
    with store.transaction() as db:
        row = db.get(RequestRow, request_id)
        return None if row is None else (_job_for(row), row.queue, row.kind)


def _run(request_id: str) -> str:
    store, doorbell, engine = context.get()
    found = store.patiently(lambda: _read(store, request_id), f"reading {request_id}")
    if found is None:
        log.warning("request %s is not in the database; dropped", request_id)
        return "missing"
    job, queue, kind = found
    settings = celery_app.conf.tinkerq_settings
    if queue and queue != settings.queue:
        # its run moved to another worker (a failover) after this message was sent: only
        # the worker that owns the run may run it
        resend(request_id, kind, "", queue)
        return f"moved to queue {queue}"
    if job.kind == "skip" and (job.seq_id is None or job.model_id is None):
        doorbell.ring(request_id)  # nothing to order (a creation, a sample): wake any poller
        return "already answered"
    if (job.model_id is not None and job.kind not in OPENING_KINDS | {"skip"}
            and not engine.knows(job.model_id)):
        restore = store.patiently(lambda: recovery.restore_job(store, settings, job.model_id),
                                  f"reading what rebuilds {job.model_id}")
        if restore is not None:
            engine.submit(restore)  # runs first: it opens the model; its answer is not stored
    try:
        outcome = engine.submit(job).result()
    except Exception as e:  # noqa: BLE001 - the engine could not answer: the call fails
        log.exception("the engine did not answer %s (%s)", request_id, job.kind)
        outcome = Outcome.fail(f"the worker could not run this call: {type(e).__name__}: {e}",
                               "server")
    if job.kind != "skip":
        try:
            store.patiently(lambda: _store(store, request_id, outcome, job),
                            f"storing the answer of {request_id}")
        except Exception as e:  # noqa: BLE001 - an answer that cannot be stored fails the call
            log.exception("could not store the answer of %s (%s)", request_id, job.kind)
            failed = Outcome.fail(f"the worker could not store this call's answer: "
                                  f"{type(e).__name__}: {e}", "server")
            store.patiently(lambda: _store(store, request_id, failed),
                            f"storing the failure of {request_id}")
            outcome = failed
    doorbell.ring(request_id)
    if job.sampler_id is not None:
        doorbell.ring(sampler_bell(job.sampler_id))
    return "ok" if outcome.ok else f"failed ({outcome.category}): {outcome.error}"[:200]


@celery_app.task(name=RELEASE_TASK)
def release_runs(model_ids: list[str]) -> str:
    """These runs' session finished: the engine releases them from memory once their calls
    are done (their state goes to the worker's disk, as for runs idle past release_idle_s)."""
    context.get()[2].retire(list(model_ids))
    return f"{len(model_ids)} run(s) released once idle"


def _register(kind: str) -> None:
    def task(self: Any, request_id: str, summary: str = "") -> str:
        return run_request(request_id)

    task.__name__ = kind
    task.__doc__ = f"Run one Tinker `{kind}` call through the engine."
    celery_app.task(name=task_name(kind), bind=True)(task)


for _kind in sorted(ALL_KINDS - {"skip", "forward"}) + ["forward"]:
    _register(_kind)
