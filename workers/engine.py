"""The engine: one thread that owns the model and runs the tick loop.

Celery's worker threads call `submit(job)` and block on the returned future; the engine
thread gathers whatever has been submitted, then runs one tick:

    plan = scheduler.schedule(now)       # pure Python: order, barriers, batching, fairness
    outcomes = executor.run(plan)        # torch: one batched pass per kind of work, then
                                         # a slice of decode steps of the running samples
    scheduler.complete(plan, outcomes)   # advance each model's seq_id order

A model with no call for release_idle_s is released: its state goes to the worker's disk
and its memory is freed, until its next call loads it back (see workers.residency). A model
whose session finished (`retire`) is released as soon as its pending calls are done.

Sample requests join the executor's running batch (continuous batching) and answer in a
later tick, when their last sequence ends; while it has work, ticks follow each other
without waiting, so training calls interleave with decode steps.

A failure inside a tick becomes per-request error outcomes; the loop never dies, unless the
GPU itself is lost (an illegal address or a device-side assert poisons the CUDA context for
every later call): then every call the engine holds is answered with a `server` error, later
ones too, and `on_fatal` stops the worker (a warm Celery shutdown, then exit status 70) so
that its supervisor starts a fresh process.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from config import Settings
from protocol.jobs import OPENING_KINDS, RESTORE, Job, Outcome
from workers.executor import Executor
from workers.metrics import Stopwatch, Tick
from workers.model import device_lost
from workers.scheduler import Scheduler

log = logging.getLogger(__name__)
FATAL: list[str] = []  # why this process's GPU was lost (python -m workers exits non-zero)
EXIT_GPU_LOST = 70


def _stop_worker() -> None:
    """Celery's warm shutdown: tasks in flight store their (failed) answers, then it exits."""
    os.kill(os.getpid(), signal.SIGTERM)


class Engine:
    def __init__(self, settings: Settings, executor: Executor):
        self.settings = settings
        self.executor = executor
        self.scheduler = Scheduler(settings.seq_gap_timeout_s, settings.max_tokens_per_tick,
                                   settings.release_idle_s, settings.snapshot_every_steps,
                                   settings.snapshot_every_s)
        if settings.snapshot_max_duty > 0:
            self.scheduler.snapshot_gate = (
                lambda: executor.snapshots.duty() < settings.snapshot_max_duty)
        # submitted calls, or the ids of models to retire (see `retire`)
        self._inbox: queue.Queue[tuple[Job, Future[Outcome]] | list[str]] = queue.Queue()
        self._futures: dict[str, list[Future[Outcome]]] = {}
        self._restoring: set[str] = set()  # models whose restore job is queued
        self._thread = threading.Thread(target=self._loop, name="tinkerq-engine", daemon=True)
        self.ticks = 0
        self.lost: str | None = None  # set once the device is lost: nothing runs any more
        self.on_fatal: Callable[[], None] = _stop_worker
        self.metrics = Tick(executor)  # workers/metrics.py: what each tick did
        self.probe: Callable[[], str | None] = lambda: device_lost(executor.model.device)

    @classmethod
    def start(cls, settings: Settings,
              first_pending: Callable[[str], int | None] | None = None) -> Engine:
        """Build the executor and start the loop; `first_pending(model_id)` (the run's first
        seq_id not settled in the database) lets the snapshot writer prune."""
        engine = cls(settings, Executor.from_settings(settings))
        engine.executor.snapshots.first_pending = first_pending
        engine._thread.start()
        return engine

    def knows(self, model_id: str) -> bool:
        """Whether this process holds the run, or is about to (its restore is queued)."""
        return self.scheduler.knows(model_id) or model_id in self._restoring

    def submit(self, job: Job) -> Future[Outcome]:
        future: Future[Outcome] = Future()
        if self.lost:
            future.set_result(self._lost_outcome())
        else:
            self._inbox.put((job, future))
        return future

    def retire(self, model_ids: list[str]) -> None:
        """These models' session finished: release them once their pending calls are done."""
        if model_ids and not self.lost:
            self._inbox.put(list(model_ids))

    # --- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.lost:
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("engine tick failed")

    def _tick(self) -> None:
        busy = self.executor.busy  # sequences are decoding: never sit idle
        # 1 s with jobs pending: expire gaps; idle: wake when the next model is due to release
        wait = (0.0 if busy else 1.0 if self.scheduler.pending
                else self.scheduler.until_release(time.monotonic()))
        if (not self._take(timeout=wait) and not self.scheduler.pending and not busy
                and wait is None):
            return
        if not busy:
            time.sleep(self.settings.tick_gather_ms / 1000)  # let concurrent calls join
        self._take(timeout=0)
        watch = Stopwatch()
        plan = self.scheduler.schedule(time.monotonic())
        if plan.empty() and not busy:
            return
        watch.lap("schedule")
        try:
            outcomes = self.executor.run(plan)
        except Exception as e:  # noqa: BLE001 - the tick's calls fail; none is left waiting
            log.exception("tick failed; its %d call(s) fail", len(plan.jobs()))
            outcomes = {job.request_id: Outcome.fail(f"the worker failed while running this "
                                                     f"call: {type(e).__name__}: {e}", "server")
                        for job in plan.barriers + plan.train + plan.samples}
        for job, message in plan.expired:
            outcomes[job.request_id] = Outcome.fail(message)
        for job in plan.skips:
            outcomes[job.request_id] = Outcome(json={})
        watch.lap("execute")
        self.scheduler.complete(plan, outcomes, time.monotonic())
        watch.lap("complete")
        self.ticks += 1
        for job in plan.barriers:
            if job.kind == RESTORE:
                self._restored(job, outcomes.get(job.request_id))
        self._resolve(outcomes)
        self.metrics.observe(plan, watch, self.ticks)  # once the answers are on their way
        failed = any(o.category == "server" for o in outcomes.values() if not o.ok)
        if failed and (why := self.probe()):
            self._give_up(why)

    # --- a lost device ------------------------------------------------------------------------
    def _give_up(self, why: str) -> None:
        """Answer every call held or still to come with a server error; stop the worker."""
        self.lost = why
        FATAL.append(why)
        log.critical("the GPU is lost (%s): every waiting call fails and the worker stops so "
                     "that its supervisor starts a fresh one", why)
        held = [f for futures in self._futures.values() for f in futures]
        self._futures.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
                if not isinstance(item, list):
                    held.append(item[1])
            except queue.Empty:
                break
        for future in held:
            if not future.done():
                future.set_result(self._lost_outcome())
        self.on_fatal()

    def _lost_outcome(self) -> Outcome:
        return Outcome.fail(f"the worker's GPU failed ({self.lost}); the worker is restarting "
                            "and the unsaved state of its models is lost", "server")

    def _take(self, timeout: float | None) -> bool:
        """Move submitted jobs into the scheduler; False if none came within `timeout`."""
        try:
            self._admit(self._inbox.get(timeout=timeout))
        except queue.Empty:
            return False
        while True:
            try:
                self._admit(self._inbox.get_nowait())
            except queue.Empty:
                return True

    def _admit(self, item: tuple[Job, Future[Outcome]] | list[str]) -> None:
        if isinstance(item, list):
            log.info("session finished: releasing model(s) %s once idle", ", ".join(item))
            for model_id in item:
                self.scheduler.retire(model_id)
            return
        job, future = item
        job.enqueued_at = time.monotonic()
        if job.kind == RESTORE:
            if self.scheduler.knows(job.model_id):  # a second restore of a live run
                future.set_result(Outcome(json={"model_id": job.model_id, "replayed": 0}))
                return
            self._restoring.add(job.model_id)
        if self._orphaned(job):
            # A call of a model this process never created: its state died with an earlier
            # worker process. Nothing to order or run; say so rather than wait forever.
            future.set_result(Outcome(json={}) if job.kind == "skip" else _orphan(job, None))
            return
        self._futures.setdefault(job.request_id, []).append(future)
        if len(self._futures[job.request_id]) == 1:
            self.scheduler.add(job, job.num_tokens)

    def _orphaned(self, job: Job) -> bool:
        return (
            job.model_id is not None
            and job.kind not in OPENING_KINDS
            and not self.knows(job.model_id)
        )

    def _restored(self, job: Job, outcome: Outcome | None) -> None:
        """A restore ended: if it failed, the run's queued calls cannot run; answer them."""
        self._restoring.discard(job.model_id)
        if outcome is not None and outcome.ok:
            return
        why = outcome.error if outcome is not None else "no answer"
        for dropped in self.scheduler.drop(job.model_id):
            self._resolve({dropped.request_id: _orphan(dropped, why)})

    def _resolve(self, outcomes: dict[str, Outcome]) -> None:
        for request_id, outcome in outcomes.items():
            for future in self._futures.pop(request_id, []):
                future.set_result(outcome)


def _orphan(job: Job, why: str | None) -> Outcome:
    cause = f"rebuilding it from its snapshot failed ({why})" if why else "it has no snapshot"
    return Outcome.fail(
        f"model {job.model_id} has no state in this worker: the worker restarted after the "
        f"model was created and {cause}, so its unsaved adapter state is lost; create a "
        "training client from your last saved state "
        "(create_training_client_from_state_with_optimizer)",
        "server",
    )
