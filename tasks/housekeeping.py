"""The GPU worker's chores, on two threads of its own.

Every `checkpoint_sweep_s`: delete the checkpoints past their TTL (rows and files,
store.checkpoints.sweep_expired; every worker sweeps, each checkpoint is deleted by whichever
gets to it first), and the snapshots of runs that will take no call again.

Every few seconds: the worker's heartbeat (store.workers.beat), and the request sweep: a
call of this worker's queue that has waited resend_after_s, that this process does not hold
and whose message is not in the broker (the queue is empty) lost its message (Redis
restarted and kept nothing, or the API died between writing the row and sending it): its
task is sent again. A copy sent in error is harmless: a call already running answers both
copies, and a finished one is never run again.
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

from config import Settings
from store import checkpoints, replay, snapshots, workers
from store.db import Store

log = logging.getLogger(__name__)
Resend = Callable[[str, str, str, str], None]  # (request id, kind, summary, queue)


def start(store: Store, settings: Settings, held: Callable[[], set[str]],
          resend: Resend, queue_depth: Callable[[], int]) -> list[threading.Thread]:
    """Start the chores' daemon threads; returns them."""
    threads = [threading.Thread(target=_watch_forever, name="tinkerq-watch", daemon=True,
                                args=(store, settings, held, resend, queue_depth))]
    if settings.checkpoint_sweep_s > 0:
        threads.append(threading.Thread(
            target=_sweep_forever, name="tinkerq-checkpoint-sweep", daemon=True,
            args=(store, settings.checkpoint_root, settings.snapshot_root,
                  settings.checkpoint_sweep_s)))
    for thread in threads:
        thread.start()
    return threads


def _sweep_forever(store: Store, root: Path, snapshot_root: Path, every_s: float) -> None:
    while True:
        try:
            checkpoints.sweep_expired(store, root)
            forget_snapshots(store, snapshot_root)
        except Exception:  # noqa: BLE001 - the database may be away: try again next round
            log.exception("checkpoint sweep failed; trying again in %.0f s", every_s)
        time.sleep(every_s)


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
    """The heartbeat and the request sweep of one worker process."""

    def __init__(self, store: Store, settings: Settings, held: Callable[[], set[str]],
                 resend: Resend, queue_depth: Callable[[], int]):
        self.store, self.settings = store, settings
        self.held, self.resend, self.queue_depth = held, resend, queue_depth
        self.worker_id = f"{settings.queue}@{socket.gethostname()}:{os.getpid()}"
        self.sent: dict[str, float] = {}  # request id -> when this sweep last sent it

    def beat(self) -> None:
        with self.store.transaction() as s:
            workers.beat(s, self.worker_id, self.settings.queue, socket.gethostname(),
                         os.getpid(), self.settings.base_model)

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


def _watch_forever(store: Store, settings: Settings, held: Callable[[], set[str]],
                   resend: Resend, queue_depth: Callable[[], int]) -> None:
    watch = _Watch(store, settings, held, resend, queue_depth)
    every = min(10.0, settings.worker_lost_s / 3, settings.resend_after_s / 2)
    while True:
        for chore in (watch.beat, watch.sweep):
            try:
                chore()
            except Exception as e:  # noqa: BLE001 - the database or Redis is away: next round
                log.warning("%s failed (%s: %s); trying again in %.0f s", chore.__name__,
                            type(e).__name__, e, every)
        time.sleep(every)
