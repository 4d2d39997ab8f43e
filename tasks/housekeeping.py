"""The GPU worker's chores on a thread of their own: every `checkpoint_sweep_s`, delete the
checkpoints past their TTL (rows and files, store.checkpoints.sweep_expired). Every worker
sweeps; each checkpoint is deleted by whichever gets to it first."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from config import Settings
from store import checkpoints
from store.db import Store

log = logging.getLogger(__name__)


def start(store: Store, settings: Settings) -> threading.Thread | None:
    """Start the sweeping thread (a daemon); None when the sweep is off (0)."""
    if settings.checkpoint_sweep_s <= 0:
        return None
    thread = threading.Thread(
        target=_sweep_forever, name="tinkerq-checkpoint-sweep", daemon=True,
        args=(store, settings.checkpoint_root, settings.checkpoint_sweep_s),
    )
    thread.start()
    return thread


def _sweep_forever(store: Store, root: Path, every_s: float) -> None:
    while True:
        try:
            checkpoints.sweep_expired(store, root)
        except Exception:  # noqa: BLE001 - the database may be away: try again next round
            log.exception("checkpoint sweep failed; trying again in %.0f s", every_s)
        time.sleep(every_s)
