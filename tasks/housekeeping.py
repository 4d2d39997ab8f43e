"""The GPU worker's chores, on two threads of its own.

Every `checkpoint_sweep_s`: delete the checkpoints past their TTL (rows and files,
store.checkpoints.sweep_expired; every worker sweeps, each checkpoint is deleted by whichever
gets to it first), the snapshots of runs that will take no call again, and the finished
calls past `request_retention_s` that no recovery needs (store.retention.prune).

Every few seconds: the worker's heartbeat (store.workers.beat, with what it serves), the
failover, and the request sweep.

- Failover: a queue of this worker's base model whose workers have all been silent for
  failover_after_s is taken over (store.workers.take_over): its runs, samplers and pending
  calls move to this worker's queue, and the moved calls are sent here at once; the runs
  are rebuilt from their snapshots and done calls when their first call arrives
  (tasks/recovery.py). A worker takes over only once its own beats have gone through for
  failover_after_s (after a database outage every worker is silent for a while: each gets
  the time to beat again). A worker whose own beats failed for failover_after_s may have
  been taken over: it stops (exit code 75), so that its supervisor starts it again with no
  run in memory that another worker now owns.
- The request sweep: a call of this worker's queue that has waited resend_after_s, that
  this process does not hold and whose message is not in the broker (the queue is empty)
  lost its message (Redis restarted and kept nothing, or the API died between writing the
  row and sending it): its task is sent again. A copy sent in error is harmless: a call
  already running answers both copies, and a finished one is never run again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from config import Settings, SettingsError, model_dir
from store import checkpoints, replay, retention, snapshots, workers
from store.db import Store
from store.schema import utcnow

log = logging.getLogger(__name__)
Resend = Callable[[str, str, str, str], None]  # (request id, kind, summary, queue)


def start(store: Store, settings: Settings, held: Callable[[], set[str]],
          resend: Resend, queue_depth: Callable[[], int],
          runs: Callable[[], int] = lambda: 0) -> list[threading.Thread]:
    """Start the chores' daemon threads; returns them. `runs()`: the training runs the
    engine holds (the registry's load figure)."""
    watch = _Watch(store, settings, held, resend, queue_depth, runs)
    threads = [threading.Thread(target=_watch_forever, name="tinkerq-watch", daemon=True,
                                args=(watch,))]
    if settings.checkpoint_sweep_s > 0:
        threads.append(threading.Thread(
            target=_sweep_forever, name="tinkerq-checkpoint-sweep", daemon=True,
            args=(store, settings)))
    for thread in threads:
        thread.start()
    return threads


def _sweep_forever(store: Store, settings: Settings) -> None:
    every_s = settings.checkpoint_sweep_s
    while True:
        try:
            checkpoints.sweep_expired(store, settings.checkpoint_root)
            forget_snapshots(store, settings.snapshot_root)
            prune_requests(store, settings)
        except Exception:  # noqa: BLE001 - the database may be away: try again next round
            log.exception("sweep of checkpoints, snapshots and old calls failed; trying "
                          "again in %.0f s", every_s)
        time.sleep(every_s)


def prune_requests(store: Store, settings: Settings) -> int:
    """Delete the finished calls past request_retention_s that no run may replay (0: keep
    them all); returns how many."""
    keep_s = settings.request_retention_s
    if keep_s <= 0:
        return 0
    gone = retention.prune(store, settings.snapshot_root, dt.timedelta(seconds=keep_s))
    if gone:
        log.info("deleted %d finished call(s) older than request_retention_s=%.0f", gone,
                 keep_s)
    return gone


def forget_snapshots(store: Store, root: Path) -> list[str]:
    """Delete the snapshots of the runs that will take no call again; returns their ids."""
    candidates = snapshots.models(root)
    if not candidates:
        return []
    with store.transaction() as s:
        done = sorted(replay.finished_runs(s, candidates))
    for model_id in done:
        snapshots.remove(root, model_id)
    return done


class _Watch:
    """The heartbeat, the failover and the request sweep of one worker process."""

    def __init__(self, store: Store, settings: Settings, held: Callable[[], set[str]],
                 resend: Resend, queue_depth: Callable[[], int],
                 runs: Callable[[], int] = lambda: 0):
        self.store, self.settings = store, settings
        self.held, self.resend, self.queue_depth, self.runs = held, resend, queue_depth, runs
        self.worker_id = f"{settings.queue}@{socket.gethostname()}:{os.getpid()}"
        self.sent: dict[str, float] = {}  # request id -> when this sweep last sent it
        self.beaten: float | None = None  # when the last beat went through (monotonic)
        self.steady_since: float | None = None  # beats have gone through since then
        self.on_lost: Callable[[], None] = _stop  # its own beats failed for failover_after_s
        self.model_path: str | None = None  # its base model's folder, as registered

    def beat(self) -> None:
        now = time.monotonic()
        if self.beaten is not None and now - self.beaten > self.settings.failover_after_s:
            log.critical("this worker's heartbeat failed for %.0f s (failover_after_s=%.0f): "
                         "another worker may own its runs now; it stops, to start again "
                         "empty", now - self.beaten, self.settings.failover_after_s)
            self.on_lost()
            return
        settings = self.settings
        if self.model_path is None:  # found once (a Hugging Face id: a cache lookup)
            try:
                self.model_path = str(model_dir(settings))
            except SettingsError:
                self.model_path = ""
        path = self.model_path
        with self.store.transaction() as s:
            workers.beat(s, self.worker_id, settings.queue, socket.gethostname(), os.getpid(),
                         settings.base_model, names=",".join(settings.served_model_names()),
                         model_path=path, gpus=_gpus(settings), runs=self.runs(),
                         max_runs=settings.max_models)
        if self.beaten is None or time.monotonic() - self.beaten > self._every():
            self.steady_since = now  # the first beat, or the first after a gap
        self.beaten = time.monotonic()

    def _every(self) -> float:
        return 3 * _interval(self.settings)

    def failover(self) -> int:
        """Take over the queues of this base model whose workers are gone; returns the
        calls moved here (each sent at once)."""
        settings, now = self.settings, time.monotonic()
        after = settings.failover_after_s
        if self.steady_since is None or now - self.steady_since < after:
            return 0  # this worker's own view is not steady yet
        moved_calls = 0
        with self.store.transaction() as s:
            dead = workers.dead_queues(s, settings.base_model, settings.queue,
                                       dt.timedelta(seconds=after))
        for queue, seen in dead:
            with self.store.transaction() as s:
                runs, samplers, calls = workers.take_over(s, queue, settings.queue)
            silent = (utcnow() - seen).total_seconds()
            log.warning("took over queue %s (its workers silent for %.0f s): %d run(s), %d "
                        "sampler(s), %d pending call(s) now on queue %s", queue, silent, runs,
                        samplers, len(calls), settings.queue)
            for row in calls:
                self.resend(row.id, row.kind, row.summary, row.queue)
                self.sent[row.id] = now
            moved_calls += len(calls)
        return moved_calls

    def sweep(self) -> int:
        """Send again the calls whose message was lost; returns how many."""
        after = self.settings.resend_after_s
        if self.queue_depth() > 0:
            return 0  # messages still wait in the broker: nothing can be called lost yet
        with self.store.transaction() as s:
            rows = workers.unanswered(s, self.settings.queue, dt.timedelta(seconds=after))
        mine, now, sent = self.held(), time.monotonic(), 0
        self.sent = {k: t for k, t in self.sent.items() if now - t < 10 * after}
        for row in rows:
            if row.id in mine or now - self.sent.get(row.id, -after) < after:
                continue
            self.resend(row.id, row.kind, row.summary, row.queue)
            self.sent[row.id] = now
            sent += 1
        if sent:
            log.warning("sent %d call(s) of queue %s again: pending for over %.0f s with no "
                        "message in the broker", sent, self.settings.queue, after)
        return sent


def _interval(settings: Settings) -> float:
    return min(10.0, settings.worker_lost_s / 3, settings.resend_after_s / 2,
               settings.failover_after_s / 4)


def _gpus(settings: Settings) -> int:
    return settings.world_size if settings.device in ("auto", "cuda") and _cuda() else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _stop() -> None:
    logging.shutdown()
    os._exit(75)


def _watch_forever(watch: _Watch) -> None:
    every = _interval(watch.settings)
    while True:
        for chore in (watch.beat, watch.failover, watch.sweep):
            try:
                chore()
            except Exception as e:  # noqa: BLE001 - the database or Redis is away: next round
                log.warning("%s failed (%s: %s); trying again in %.0f s", chore.__name__,
                            type(e).__name__, e, every)
        time.sleep(every)
