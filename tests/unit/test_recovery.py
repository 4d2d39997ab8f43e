"""Snapshots and restores in the engine: a run rebuilt in a fresh process from a snapshot and
the done calls after it holds exactly the state of the run that never stopped."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from protocol.jobs import RESTORE, Job, Outcome
from store import snapshots
from tests.conftest import tiny_qwen3_config
from tests.unit.test_engine import create_body, start_engine
from tests.unit.test_executor import fwdbwd_body, job
from workers import checkpoints
from workers.model import AdapterSpec, LoraModel
from workers.scheduler import Scheduler
from workers.snapshots import DUTY_WINDOW_S, SnapshotWriter

ADAM = {"adam_params": {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                        "weight_decay": 0.01, "grad_clip_norm": 1.0}}


def fresh_model(device: str = "cpu") -> LoraModel:
    return LoraModel.from_config(tiny_qwen3_config(), torch.device(device), torch.float32,
                                 seed=0)


def calls(model_id: str, steps: int) -> list[Job]:
    """`steps` rounds of forward_backward + optim_step, then one forward_backward more (its
    gradients stay pending): seq_ids 1 .. 2 * steps + 1."""
    out, seq = [], 1
    for step in range(steps + 1):
        tokens = [(7 * step + 3 * i + len(model_id)) % 500 + 1 for i in range(9 + step % 4)]
        out.append(job("forward_backward", fwdbwd_body(model_id, seq, tokens), model_id, seq))
        seq += 1
        if step < steps:
            out.append(job("optim_step", ADAM, model_id, seq))
            seq += 1
    return out


def state(engine, model_id: str) -> dict[str, torch.Tensor]:
    """The run's weights, pending gradients and AdamW moments and step, as CPU tensors."""
    ex = engine.executor
    run = ex.residency.resident(model_id)
    out = {}
    for name, w in ex.model.adapter_weights(run.slot).items():
        for part, t in (("A", w.A), ("B", w.B)):
            out[f"{name}.{part}"] = t.detach().cpu().clone()
            out[f"{name}.{part}.grad"] = t.grad.cpu().clone() if t.grad is not None else None
    for i, (m, v) in enumerate(zip(run.adam.exp_avg, run.adam.exp_avg_sq, strict=True)):
        out[f"m{i}"], out[f"v{i}"] = m.cpu().clone(), v.cpu().clone()
    out["step"] = torch.tensor(run.adam.step)
    return out


def restore_job(root, model_id: str, done: list[Job], first_pending: int) -> Job:
    """What tasks.recovery.restore_job makes from the database (tested end to end)."""
    seq, folder = snapshots.newest_usable(root, model_id, first_pending)
    body = {"model_id": model_id, "base_model": "tiny", "snapshot_dir": str(folder),
            "snapshot_seq": seq, "next_seq": first_pending}
    restore = Job(request_id=f"restore-{model_id}", kind=RESTORE,
                  payload=json.dumps(body).encode(), model_id=model_id)
    restore.body["replay"] = [j for j in done if seq < j.seq_id < first_pending]
    return restore


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_two(tmp_path_factory.mktemp("trained"))


def train_two(tmp_path, device: str = "cpu"):
    """Two runs trained side by side (their calls share ticks), snapshot every 3 steps
    (no duty budget: the cadence is asserted below)."""
    engine = start_engine(fresh_model(device), tmp_path, snapshot_every_steps=3,
                          snapshot_max_duty=0, max_lora_adapters=4)
    work = {m: calls(m, 7) for m in ("a", "bb")}
    for m in work:
        assert engine.submit(job("create_model", create_body(m), m)).result(30).ok
    every = [j for jobs in zip(*work.values(), strict=True) for j in jobs]
    with ThreadPoolExecutor(len(every)) as pool:
        assert all(o.ok for o in pool.map(lambda j: engine.submit(j).result(60), every))
    assert engine.executor.snapshots.wait_idle(30)
    return engine, work, tmp_path / "snapshots"


@pytest.mark.parametrize("first_pending", [16, 9, 2])
def test_a_restored_run_equals_the_run_that_never_stopped(trained, tmp_path, first_pending):
    """first_pending 16: everything settled (the newest snapshot, 12, then 3 calls); 9: the
    answers after seq_id 8 were not stored yet (snapshot 6, 2 calls); 2: only the creation's
    snapshot is usable. Every call up to first_pending - 1 is replayed exactly once."""
    engine, work, root = trained
    assert snapshots.listing(root, "a") == [0, 6, 12]
    fresh = start_engine(fresh_model(), tmp_path / "second", snapshot_every_steps=3)
    restore = restore_job(root, "a", work["a"], first_pending)
    outcome = fresh.submit(restore).result(60)
    assert outcome.ok, outcome.error
    assert outcome.json["replayed"] == first_pending - 1 - restore.body["snapshot_seq"]
    for later in work["a"][first_pending - 1:]:  # the calls that were pending run now
        assert fresh.submit(later).result(60).ok
    expected, got = state(engine, "a"), state(fresh, "a")
    assert expected.keys() == got.keys() and int(got["step"]) == 7
    for key, tensor in expected.items():
        assert (tensor is None and got[key] is None) or torch.equal(tensor, got[key]), key


def test_a_restore_that_fails_answers_the_runs_waiting_calls(trained, tmp_path):
    engine, work, root = trained
    fresh = start_engine(fresh_model(), tmp_path / "second")
    restore = restore_job(root, "a", work["a"], 16)
    restore.body["snapshot_dir"] = str(tmp_path / "nowhere")
    later = job("forward_backward", fwdbwd_body("a", 16, [1, 2, 3]), "a", 16)
    waiting = fresh.submit(restore), fresh.submit(later)
    assert not waiting[0].result(30).ok
    failure = waiting[1].result(30)
    assert failure.category == "server" and "rebuilding it from its snapshot failed" in \
        failure.error, failure.error
    assert "a" not in fresh.executor.runs


def test_snapshots_are_written_at_creation_and_every_k_steps_and_pruned(tmp_path):
    scheduler = Scheduler(300, 10_000, snapshot_every_steps=2, snapshot_every_s=100)
    marks = []
    for seq, kind, now in [(None, "create_model", 0), (1, "optim_step", 1),
                           (2, "optim_step", 2), (3, "optim_step", 3), (4, "optim_step", 150),
                           (5, "optim_step", 151)]:
        scheduler.add(j := job(kind, create_body("m") if seq is None else ADAM, "m", seq))
        j.enqueued_at = now
        plan = scheduler.schedule(now)
        assert plan.barriers == [j]
        marks.append(plan.snapshots == ["m"])
        scheduler.complete(plan, {j.request_id: Outcome()}, now)
    # creation; 2nd step; (3rd: 1 since); 4th: 147 s since the last, past snapshot_every_s
    assert marks == [True, False, True, False, True, False]
    # an ordered load (load_state) is snapshotted; a redelivered creation of the live run not
    for seq, kind, want in [(6, "load_weights", ["m"]), (None, "create_model", [])]:
        scheduler.add(j := job(kind, create_body("m"), "m", seq, rid=f"{kind}-again"))
        j.enqueued_at = 200
        plan = scheduler.schedule(200)
        assert plan.barriers == [j] and plan.snapshots == want
        scheduler.complete(plan, {j.request_id: Outcome()}, 200)
    for seq in (0, 4, 8, 12):
        os.makedirs(snapshots.folder(tmp_path, "m", seq))
    (tmp_path / "m" / ".000000000016.tmp-host-1-x").mkdir()  # a write in progress
    assert snapshots.newest_usable(tmp_path, "m", 12) == (8, snapshots.folder(tmp_path, "m", 8))
    snapshots.prune(tmp_path, "m", 12)
    assert snapshots.listing(tmp_path, "m") == [8, 12]
    assert snapshots.prune(tmp_path, "m", 5) == []  # 8 is not usable yet: nothing goes


def test_due_snapshots_wait_while_the_writer_is_over_its_budget():
    """snapshot_every_steps makes a snapshot due; the gate (the writer's duty under its
    budget) holds it back until it opens, and snapshot_every_s forces one through."""
    scheduler = Scheduler(300, 10_000, snapshot_every_steps=2, snapshot_every_s=100)
    gate = [True]
    scheduler.snapshot_gate = lambda: gate[0]
    marks = []
    for seq, kind, now, open_ in [(None, "create_model", 0, False), (1, "optim_step", 1, False),
                                  (2, "optim_step", 2, False), (3, "optim_step", 3, True),
                                  (4, "optim_step", 4, False), (5, "optim_step", 5, False),
                                  (6, "optim_step", 120, False)]:
        gate[0] = open_
        scheduler.add(j := job(kind, create_body("m") if seq is None else ADAM, "m", seq))
        j.enqueued_at = now
        plan = scheduler.schedule(now)
        marks.append(plan.snapshots == ["m"])
        scheduler.complete(plan, {j.request_id: Outcome()}, now)
    # creation (always); 2nd step due but held; 3rd: the gate opens; 5th held; 6th: 117 s
    assert marks == [True, False, False, True, False, False, True]


def test_the_writers_duty_is_its_busy_share_of_the_last_minute(tmp_path):
    model = fresh_model()
    model.add_adapter(0, AdapterSpec(rank=4, alpha=8), torch.Generator().manual_seed(0))
    writer = SnapshotWriter(tmp_path)
    assert writer.duty() == 0.0
    state = checkpoints.gather_training_state(model, 0, None, "tiny")
    before = time.monotonic()
    writer.put("m", 2, state)
    assert writer.wait_idle(60)
    after = time.monotonic()
    busy = writer.duty(after)
    assert 0 < busy * DUTY_WINDOW_S <= after - before  # the write's time, within the window
    assert writer.written.count == 1
    assert writer.duty(after + DUTY_WINDOW_S + 1) == 0.0  # a minute later it has gone
