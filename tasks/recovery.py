"""The restore of a run that this worker process does not hold (docs/design.md,
Reliability): its worker died, and this process starts from the run's last usable snapshot
and the done calls after it.

`restore_job` reads, in one transaction, the run's first unsettled seq_id (every call below
it is done or failed), picks the newest snapshot below it (store/snapshots.py) and the done
calls between the two that changed the run's state (store/replay.py). The engine runs the
job as a barrier that opens the model at that seq_id (workers/recovery.py), so the calls
that were pending (redelivered, or sent again by the sweeper) run next, in order.
"""

from __future__ import annotations

import json
import logging

from config import Settings
from protocol.jobs import RESTORE, Job
from store import replay, snapshots
from store.db import Store
from store.schema import ModelRow

log = logging.getLogger(__name__)


def restore_job(store: Store, settings: Settings, model_id: str) -> Job | None:
    """The job that rebuilds `model_id`, or None when it cannot be rebuilt (no snapshot:
    snapshots are off, or the run predates them; or the run is not a trainable one)."""
    with store.transaction() as s:
        model = s.get(ModelRow, model_id)
        if model is None or model.copied_from is not None:
            return None
        cursor = replay.first_pending(s, model_id)
        found = snapshots.newest_usable(settings.snapshot_root, model_id, cursor)
        if found is None:
            log.warning("model %s has no usable snapshot below seq_id %d; it cannot be "
                        "rebuilt", model_id, cursor)
            return None
        seq, folder = found
        rows = replay.done_calls(s, model_id, seq, cursor)
    body = {"model_id": model_id, "base_model": model.base_model, "snapshot_dir": str(folder),
            "snapshot_seq": seq, "next_seq": cursor}
    job = Job(request_id=f"restore-{model_id}", kind=RESTORE, payload=json.dumps(body).encode(),
              model_id=model_id)
    job.body["replay"] = [Job(request_id=r.id, kind=r.kind, payload=r.payload,
                              model_id=model_id, seq_id=r.seq_id) for r in rows]
    log.info("rebuilding model %s: snapshot at seq_id %d, %d call(s) to replay, next seq_id "
             "%d", model_id, seq, len(rows), cursor)
    return job


def first_pending(store: Store, model_id: str) -> int:
    """The run's first unsettled seq_id (the snapshot writer prunes below it)."""
    with store.transaction() as s:
        return replay.first_pending(s, model_id)
