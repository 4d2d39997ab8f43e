"""Request retention (store/retention.py), on SQLite and on PostgreSQL: old finished calls
are deleted in chunks; recent, pending and recorded ones stay; a live run keeps what its
recovery replays (tasks/recovery.py answers the same before and after); a deleted future is
a 404 with a JSON body."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select, update

from config import SettingsError, load_settings
from store import retention, snapshots
from store.schema import DONE, FAILED, PENDING, RequestRow, SessionRow, tenant_of, utcnow
from tasks.housekeeping import prune_requests
from tasks.recovery import restore_job
from tests.api.conftest import KEY

WEEK = dt.timedelta(days=7)
SAMPLER = "s-test:sample:0"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    return request.getfixturevalue("pg_url") if request.param == "postgres" else ""


def add_call(services, request_id: str, *, days: float = 10, state: str = DONE,
             kind: str = "sample", model_id: str | None = None, seq: int | None = None,
             at: dt.datetime | None = None, **extra: Any) -> str:
    """A call that finished (or, pending, was made) `days` ago, or `at`."""
    at = at or utcnow() - dt.timedelta(days=days)
    row = RequestRow(id=request_id, tenant=tenant_of(KEY), kind=kind, model_id=model_id,
                     sampler_id=None if model_id else SAMPLER, seq_id=seq, queue="gpu-0",
                     payload=b"{}", state=state, created_at=at,
                     finished_at=None if state == PENDING else at,
                     result=None if state == PENDING else b'{"ok": 1}',
                     result_type=None if state == PENDING else "json", **extra)
    with services.store.transaction() as s:
        s.add(row)
    return request_id


def train(services, model_id: str, seqs: range, **kw: Any) -> list[str]:
    """The run's forward_backward / optim_step calls at `seqs`; its creation done long ago."""
    with services.store.transaction() as s:
        s.execute(update(RequestRow).where(RequestRow.model_id == model_id,
                                           RequestRow.seq_id == 0)
                  .values(state=DONE, finished_at=utcnow() - 2 * WEEK))
    return [add_call(services, f"req-{model_id[-7:]}-{seq:03d}", model_id=model_id, seq=seq,
                     kind="optim_step" if seq % 2 == 0 else "forward_backward", **kw)
            for seq in seqs]


def snapshot(services, model_id: str, *seqs: int) -> None:
    for seq in seqs:  # the layout store/snapshots.py reads; the files are not looked at
        snapshots.folder(services.settings.snapshot_root, model_id, seq).mkdir(parents=True)


def prune(services, **kw: Any) -> int:
    return retention.prune(services.store, services.settings.snapshot_root, WEEK, **kw)


def left(services) -> set[str]:
    with services.store.transaction() as s:
        return set(s.scalars(select(RequestRow.id)))


def seqs_left(services, model_id: str) -> list[int]:
    with services.store.transaction() as s:
        return sorted(s.scalars(select(RequestRow.seq_id)
                                .where(RequestRow.model_id == model_id)))


def recovery(services, model_id: str) -> tuple[int, list[int], int]:
    """What a worker would rebuild the run from: (snapshot seq, replayed seqs, next seq)."""
    job = restore_job(services.store, services.settings, model_id)
    assert job is not None
    replayed = [j.seq_id for j in job.body["replay"]]
    return job.body["snapshot_seq"], replayed, job.body["next_seq"]


def test_old_finished_calls_go_recent_pending_and_recorded_ones_stay(services):
    now = utcnow()
    gone = {add_call(services, "req-done"), add_call(services, "req-failed", state=FAILED),
            add_call(services, "req-record-expired-long-ago",
                     stability_expires_at=now - 2 * WEEK)}
    kept = {add_call(services, "req-recent", days=1),
            add_call(services, "req-pending", state=PENDING),
            add_call(services, "req-record-expired-lately", stability_expires_at=now - WEEK / 2),
            add_call(services, "req-record-live", stability_expires_at=now + WEEK),
            add_call(services, "req-custom-loss", kind="create_custom_loss")}
    assert prune(services) == len(gone)
    assert left(services) == kept
    assert prune(services) == 0  # each row is deleted once


def test_a_live_run_keeps_what_its_recovery_replays(services, model_id):
    train(services, model_id, range(1, 7))
    add_call(services, "req-pending-7", model_id=model_id, seq=7, kind="optim_step",
             state=PENDING)
    snapshot(services, model_id, 0, 4)
    before = recovery(services, model_id)
    assert before == (4, [5, 6], 7)
    assert prune(services) == 3  # seq 1..3: below the newest usable snapshot
    assert seqs_left(services, model_id) == [0, 4, 5, 6, 7]  # 0: its creation
    assert recovery(services, model_id) == before


def test_a_snapshot_past_the_first_pending_call_is_not_the_bound(services, model_id):
    train(services, model_id, range(1, 6))
    add_call(services, "req-pending-6", model_id=model_id, seq=6, kind="optim_step",
             state=PENDING)
    train(services, model_id, range(7, 9))  # done while 6 waits
    snapshot(services, model_id, 2, 8)  # 8 is not usable: 6 is not settled
    assert prune(services) == 1  # seq 1 only
    assert seqs_left(services, model_id) == [0, 2, 3, 4, 5, 6, 7, 8]
    assert recovery(services, model_id) == (2, [3, 4, 5], 6)


def test_a_live_runs_newest_call_stays_when_nothing_is_pending(services, model_id):
    train(services, model_id, range(1, 7))
    snapshot(services, model_id, 6)
    assert prune(services) == 5
    # its highest seq_id is where replay.first_pending starts: without it, recovery would
    # look for a snapshot below seq 1 and find none
    assert seqs_left(services, model_id) == [0, 6]
    assert recovery(services, model_id) == (6, [], 7)


def test_a_live_run_without_a_snapshot_keeps_its_calls(services, model_id):
    train(services, model_id, range(1, 4))
    assert prune(services) == 0
    assert seqs_left(services, model_id) == [0, 1, 2, 3]


def test_a_finished_runs_old_calls_all_go(services, session_id, model_id):
    train(services, model_id, range(1, 7))
    recent = add_call(services, "req-recent-7", model_id=model_id, seq=7, days=1)
    snapshot(services, model_id, 4)
    with services.store.transaction() as s:
        s.get(SessionRow, session_id).finished_at = utcnow()
    assert prune(services) == 7  # seq 0..6
    assert left(services) == {recent}


def test_the_sweep_goes_in_chunks_past_rows_it_keeps(services, model_id):
    at = utcnow() - 2 * WEEK  # one finish time: the chunks go on in id order
    kept = train(services, model_id, range(1, 5), at=at)  # a live run, no snapshot: all stay
    gone = {add_call(services, f"req-z{i}", at=at) for i in range(5)}  # after them by id
    with services.store.transaction() as s:
        creation = s.scalar(select(RequestRow.id).where(RequestRow.seq_id == 0))
    assert prune(services, chunk=2) == len(gone)
    assert left(services) == {creation, *kept}


def test_a_deleted_future_answers_404_with_json(api, services):
    request_id = add_call(services, "req-to-prune")
    assert api.post("retrieve_future", {"request_id": request_id}).get_json() == {"ok": 1}
    assert prune(services) == 1
    resp = api.post("retrieve_future", {"request_id": request_id})
    assert resp.status_code == 404
    assert request_id in resp.get_json()["detail"]


def test_the_worker_sweep_follows_request_retention_s(services):
    request_id = add_call(services, "req-two-days", days=2)
    forever = dataclasses.replace(services.settings, request_retention_s=0.0)
    assert prune_requests(services.store, forever) == 0
    assert request_id in left(services)
    a_day = dataclasses.replace(services.settings, request_retention_s=86400.0)
    assert prune_requests(services.store, a_day) == 1
    assert request_id not in left(services)


def test_request_retention_s_is_checked():
    assert load_settings(env={}).request_retention_s == 7 * 86400
    with pytest.raises(SettingsError, match="request_retention_s=-1"):
        load_settings(env={}, request_retention_s=-1.0)
    env = {"TINKERQ_REQUEST_RETENTION_S": "3600"}
    assert load_settings(env=env).request_retention_s == 3600.0
