"""No accepted call is left pending: whatever fails inside a task after its row is read (the
engine refusing it, the engine's answer raising, the answer not fitting the database), the
row ends `failed` with a `server` error and its doorbell rings, for every kind of call.

The engine is replaced by one that fails on purpose (fault injection); the database (SQLite)
and the doorbell (Redis) are the real ones."""

from __future__ import annotations

import uuid
from concurrent.futures import Future

import pytest

from protocol.jobs import ALL_KINDS, CREATION_KINDS, Outcome
from store.db import Store
from store.doorbell import Doorbell
from store.schema import FAILED, PENDING, RequestRow
from tasks import tinker
from tests.api.conftest import REDIS_URL

KINDS = sorted(ALL_KINDS - {"skip"})


class FailingEngine:
    """An engine that fails in the way `how` names."""

    def __init__(self, how: str):
        self.how = how

    def knows(self, model_id: str) -> bool:
        return True  # it holds every run: no restore first

    def submit(self, job) -> Future:
        if self.how == "submit":
            raise RuntimeError("the engine thread is gone")
        future: Future = Future()
        if self.how == "result":
            future.set_exception(RuntimeError("the tick failed"))
        else:  # an answer whose checkpoint record overflows (the ttl case of issue 20)
            future.set_result(Outcome(json={"type": job.kind}, checkpoint={
                "model_id": "m", "kind": "training", "name": "n", "tinker_path": "tinker://m/x",
                "local_dir": "/nowhere", "size_bytes": 1, "ttl_seconds": 10**12,
                "user_metadata": None}))
        return future


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('tasks') / 'tasks.db'}")
    store.create_schema()
    doorbell = Doorbell(REDIS_URL)
    yield store, doorbell
    doorbell.close()
    store.engine.dispose()


def add_row(store: Store, kind: str) -> str:
    numbered, owner = kind not in CREATION_KINDS | {"sample"}, uuid.uuid4().hex
    row = RequestRow(id=f"req-{owner}", tenant="t", kind=kind, model_id=f"m-{owner}",
                     seq_id=1 if numbered else 0, queue="gpu-0", summary=kind, payload=b"{}")
    if kind == "sample":
        row.model_id, row.sampler_id = None, f"s-{owner}"
    assert store.add_request(row) == row.id
    return row.id


@pytest.mark.parametrize("how", ["submit", "result", "store"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_failure_after_the_row_is_read_fails_the_call(worker, monkeypatch, kind, how):
    store, doorbell = worker
    monkeypatch.setattr(tinker.context, "_built", (store, doorbell, FailingEngine(how)))
    request_id = add_row(store, kind)
    with doorbell.listen(request_id) as rang:
        answer = tinker.run_request(request_id)
        assert rang.wait(5), "the doorbell must ring so that a waiting poll returns"
    with store.transaction() as s:
        row = s.get(RequestRow, request_id)
        assert row.state == FAILED != PENDING and row.error_category == "server", answer
        assert "could not" in row.error and row.finished_at is not None
