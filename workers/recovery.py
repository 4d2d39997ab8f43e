"""A run's durability in the executor: its snapshots, and its restore after a worker death.

`snapshot` runs in the tick right after a barrier that the scheduler marked (Plan.snapshots):
it copies the run's weights and AdamW moments on the device (a collective under tensor
parallelism; one device-to-device copy, about a millisecond for a 4B model's rank-32
adapter) and hands them to the writer thread (workers/snapshots.py), which brings them to
the host on a stream of its own and writes them. A barrier leaves no pending gradients, so
the state is whole.

`restore_many` runs a tick's `restore_model` barriers (tasks/recovery.py makes one when a
call comes for a run this process does not hold): it installs each snapshot as
`load_weights` would, then runs the done calls after it again, in seq_id order, each kind
through the executor's own code (consecutive forward_backward calls in one pass, and the
runs restored together share their passes), and discards their answers: they were stored
when first computed. Every rank runs it alike.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from protocol.jobs import Job, Outcome
from workers import checkpoints

Executor = Any  # workers.executor.Executor, which imports this module

log = logging.getLogger(__name__)


def snapshot(ex: Executor, job: Job) -> None:
    """Snapshot the run of barrier `job` (which succeeded); a failure is logged, not raised:
    the older snapshot and the calls after it still rebuild the run."""
    model_id = job.model_id
    # a restore holds the calls it replayed; an opening, the run as created or loaded
    seq = job.body["next_seq"] - 1 if job.kind == "restore_model" else job.seq_id or 0
    try:
        run = ex.residency.resident(model_id)
        state = checkpoints.gather_training_state(ex.model, run.slot, run.adam,
                                                  run.base_model, on_device=True)
        if state is not None:
            ex.snapshots.put(model_id, seq, state)
    except Exception:  # noqa: BLE001 - the call's answer does not depend on it
        log.exception("could not snapshot model %s at seq_id %d", model_id, seq)


def restore_many(ex: Executor, jobs: list[Job]) -> dict[str, Outcome]:
    """Run the tick's `restore_model` barriers together: each run's snapshot is installed,
    then the runs' replays advance in rounds, each round one group per run, the rounds'
    forward_backward groups in one pass (as the runs' calls batched when they first ran).
    A run whose snapshot or replay fails is dropped and fails alone."""
    outcomes: dict[str, Outcome] = {}
    todo: dict[str, list[list[Job]]] = {}
    for job in jobs:
        try:
            todo[job.request_id] = _install(ex, job)
        except Exception as e:  # noqa: BLE001 - this run's restore fails, not the others
            log.exception("could not restore model %s", job.model_id)
            outcomes[job.request_id] = Outcome.fail(f"{type(e).__name__}: {e}", "server")
    by_id = {job.request_id: job for job in jobs}
    replayed = {rid: sum(map(len, groups)) for rid, groups in todo.items()}
    while any(todo.values()):
        turn = {rid: groups.pop(0) for rid, groups in todo.items() if groups}
        train = [j for group in turn.values() if group[0].kind == "forward_backward"
                 for j in group]
        results = ex._train(train) if train else {}
        for rid, group in turn.items():
            if group[0].kind != "forward_backward":
                results[group[0].request_id] = ex._barrier(group[0])
            failed = [results[j.request_id] for j in group if not results[j.request_id].ok]
            if failed:
                model_id = by_id[rid].model_id
                log.error("replaying the calls of model %s failed: %s", model_id,
                          failed[0].error)
                ex.residency.drop(model_id)
                outcomes[rid] = Outcome.fail(f"replaying {group[0].request_id} failed: "
                                             f"{failed[0].error}", "server")
                del todo[rid]
    for rid in todo:
        job = by_id[rid]
        log.info("restored model %s from the snapshot at seq_id %d and %d call(s) after it",
                 job.model_id, job.body["snapshot_seq"], replayed[rid])
        outcomes[rid] = Outcome(json={"model_id": job.model_id, "replayed": replayed[rid],
                                      "type": "restore_model"})
    return outcomes


def _install(ex: Executor, job: Job) -> list[list[Job]]:
    """Install the run's snapshot; returns its replay's groups (none: already held)."""
    if job.invalid is not None:
        raise ValueError(job.invalid)
    body = job.body
    if body["model_id"] in ex.runs:  # restored already (a duplicate): nothing to do
        return []
    spec, weights, adam = checkpoints.load_training_state(Path(body["snapshot_dir"]))
    ex.install(body["model_id"], spec, weights, adam, body["base_model"])
    return _groups(body["replay"])


def _groups(replay: list[Job]) -> list[list[Job]]:
    """Runs of consecutive forward_backward calls, and every other call alone."""
    groups: list[list[Job]] = []
    for job in replay:
        if job.kind == "forward_backward" and groups and groups[-1][0].kind == job.kind:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups
