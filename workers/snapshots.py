"""The snapshot writer: training runs' states written to disk off the engine's tick.

The executor copies a run's state on its device in the tick (`put`, after the barrier that
the scheduler marked in `Plan.snapshots`); this thread brings the copy to a pinned host
buffer on a CUDA stream of its own (once the tick's stream has made it), writes it as a
training checkpoint folder (store/snapshots.py says where; workers/tensorfile.py streams the
bytes, with O_DIRECT where the file system has it), and prunes the run's older snapshots,
keeping the newest that the database says is usable (`first_pending`). While a run's
snapshot waits to be written, a newer one of the same run replaces it: memory holds at most
one state per run, and a slow disk skips snapshots rather than slowing training.

Writing costs the tick about what it takes: a 0.6B tick is bound by its CPU, and on an H100
each second the writer spent writing slowed training by about 0.8 s, with O_DIRECT or
without. `duty()` is the share of the last minute the writer was busy; the scheduler holds
periodic snapshots back while it is above `snapshot_max_duty` (Engine), which bounds what
snapshots cost whatever the model, the disk and the number of runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from store import snapshots
from workers.checkpoints import TrainingState, write_training_state

log = logging.getLogger(__name__)

DUTY_WINDOW_S = 60.0  # duty() looks back this far


@dataclass
class Written:
    """What the writer has done so far (benchmarks/snapshots.py reads it)."""

    count: int = 0
    bytes: int = 0
    seconds: float = 0.0
    replaced: int = 0  # states dropped for a newer one of the same run before being written


class SnapshotWriter:
    def __init__(self, root: Path, first_pending: Callable[[str], int | None] | None = None,
                 direct: bool = True):
        self.root = Path(root)
        # O_DIRECT where it can (tensorfile.save): the pinned buffer goes to disk by DMA, not
        # by a CPU copy into the page cache beside the tick
        self.direct = direct
        # the run's first seq_id not settled in the database; None when it cannot be read
        self.first_pending = first_pending
        self.written = Written()
        self._pending: dict[str, tuple[int, TrainingState, torch.cuda.Event | None]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pinned: torch.Tensor | None = None  # reused for every state (one at a time)
        self._busy = False
        self._spans: deque[tuple[float, float]] = deque()  # recent (start, end) of writes
        self._started: float | None = None  # the write in progress began then
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, model_id: str, seq: int, state: TrainingState) -> None:
        """Queue the state of `model_id` after seq_id `seq` for writing; returns at once."""
        ready = None
        if state.flat is not None and state.flat.is_cuda:
            ready = torch.cuda.Event()
            ready.record()  # the copies are made once the tick's stream gets here
        with self._cond:
            if model_id in self._pending:
                self.written.replaced += 1
            self._pending[model_id] = (seq, state, ready)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tinkerq-snapshots",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every queued state is written (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True

    def duty(self, now: float | None = None) -> float:
        """The share of the last DUTY_WINDOW_S seconds spent bringing states to disk (host
        copy, write, prune), a write in progress counted up to `now`."""
        now = time.monotonic() if now is None else now
        with self._cond:
            spans = list(self._spans)
            if self._started is not None:
                spans.append((self._started, now))
        start = now - DUTY_WINDOW_S
        return sum(max(0.0, min(e, now) - max(s, start)) for s, e in spans) / DUTY_WINDOW_S

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                model_id = next(iter(self._pending))
                seq, state, ready = self._pending.pop(model_id)
                self._busy = True
                self._started = time.monotonic()
            try:
                host = self._host(state, ready)
                del state  # the device copy is done with: back to the allocator before the write
                self._write(model_id, seq, host)
            except Exception:  # noqa: BLE001 - a full disk: the older snapshot stays usable
                log.exception("could not write the snapshot of model %s at seq_id %d",
                              model_id, seq)
            with self._cond:
                now = time.monotonic()
                self._spans.append((self._started or now, now))
                self._started = None
                while self._spans and self._spans[0][1] < now - DUTY_WINDOW_S:
                    self._spans.popleft()

    def _host(self, state: TrainingState, ready: torch.cuda.Event | None) -> TrainingState:
        """The state in CPU memory: copied into one pinned buffer that the writer reuses,
        as DMA on a stream of its own, so neither the tick's stream nor its thread waits."""
        if ready is None:
            return state
        flat = state.flat  # a device state is packed (checkpoints.gather_training_state)
        assert flat is not None
        total = flat.numel() * flat.element_size()
        if self._pinned is None or self._pinned.numel() < total:
            self._pinned = None  # the old buffer goes before the larger one is made
            self._pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        host = state.over(self._pinned[:total].view(flat.dtype))
        stream = self._streams.setdefault(flat.device, torch.cuda.Stream(flat.device))
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            host.flat.copy_(flat, non_blocking=True)  # type: ignore[union-attr]
        stream.synchronize()
        return host

    def _write(self, model_id: str, seq: int, state: TrainingState) -> None:
        started = time.perf_counter()
        size = write_training_state(snapshots.folder(self.root, model_id, seq), state,
                                    direct=self.direct)
        took = time.perf_counter() - started
        with self._cond:
            self.written.count += 1
            self.written.bytes += size
            self.written.seconds += took
        log.info("snapshot of model %s at seq_id %d: %.1f MiB in %.2f s", model_id, seq,
                 size / 2**20, took)
        first_pending = None
        if self.first_pending is not None:
            try:
                first_pending = self.first_pending(model_id)
            except Exception:  # noqa: BLE001 - the database is away: prune next time
                log.warning("could not read model %s's settled calls; its older snapshots "
                            "stay for now", model_id, exc_info=True)
        if first_pending is not None:
            snapshots.prune(self.root, model_id, first_pending)
