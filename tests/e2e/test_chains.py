"""Batch scripts against a live stack: the example's SL chain (examples/sl_chain.py), its
results as stored in the database and read by REST and `python -m tasks.batch status`, and
chains sent again that train nothing twice.

Scripts run in subprocesses with the stack's environment, as a user runs them: importing
`tasks` builds the Celery app (broker, queue) from the environment's settings. One stack,
SQLite + the embedded Redis: a batch writes its rows through `Store.add_request`, the code
path of every REST call, which test_sdk.py runs on PostgreSQL too.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import or_, select
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from config import load_settings
from store.db import Store
from store.schema import DONE, RequestRow, tenant_of
from tests.e2e.stack import API_KEY, ROOT, Stack

pytestmark = pytest.mark.e2e
BATCH = "e2e-sl-chain"
MODEL = f"{BATCH}:train:0"
SAMPLER = f"{BATCH}:sample:0"
EPOCHS, STEPS_PER_EPOCH, LEARNING_RATE = 2, 4, 1e-2  # the example: 8 examples, batch size 2
KINDS = (["create_model"] + ["forward_backward", "optim_step"] * EPOCHS * STEPS_PER_EPOCH
         + ["save_weights_for_sampler", "sample"])
PROBE_DATUM = {"model_input": [9707, 11, 1879, 1096],
               "loss_fn_inputs": {"target_tokens": [11, 1879, 1096, 374],
                                  "weights": [1.0, 1.0, 1.0, 1.0]}}
# Two forward probes of the model after the example's calls: the first is sent and waited
# for, then `resend` sends every call of the batch again as one chain, the second probe last.
PROBE = """
import json, sys, time
from celery import chain
from tinker import types
from tasks.batch import Batch, main, request_id

batch = Batch.open(sys.argv[1], batch_id=sys.argv[2])
run = batch.training_run(sys.argv[3])
spec = json.loads(sys.argv[4])
datum = types.Datum(model_input=types.ModelInput.from_ints(spec["model_input"]),
                    loss_fn_inputs=spec["loss_fn_inputs"])
before, after = run.forward([datum]), run.forward([datum])
chain(before).apply_async()
deadline = time.monotonic() + 60
while {c["request_id"]: c["state"] for c in batch.status()}[request_id(before)] == "pending":
    assert time.monotonic() < deadline, "the first probe did not finish"
    time.sleep(0.2)
assert main(["resend", sys.argv[2], "--api-key", sys.argv[1]]) == 0
print(json.dumps([request_id(before), request_id(after)]))
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("stack-chains"), "sqlite")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def epoch(stack):
    """The example submitted (it exits at once); returns its output once its calls are done."""
    out = script(stack, "examples/sl_chain.py", "--batch-id", BATCH, "--epochs", str(EPOCHS))
    assert out.splitlines()[0] == f"batch: {BATCH}", out
    assert f"python -m tasks.batch status {BATCH}" in out
    wait_done(stack, [r.id for r in example_rows(stack)], timeout=90)
    return out


def script(stack: Stack, *args: str, timeout: float = 120) -> str:
    env = stack.env | {"TINKER_API_KEY": API_KEY}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}\n{stack.logs()}"
    return done.stdout


def stored(stack: Stack, ids: list[str] | None = None) -> list[RequestRow]:
    """The batch's request rows (or the rows `ids`), read from the database itself."""
    store = Store(load_settings(env=stack.env).database)
    where = (RequestRow.id.in_(ids) if ids else
             or_(RequestRow.model_id == MODEL, RequestRow.sampler_id == SAMPLER))
    try:
        with store.transaction() as s:
            return list(s.scalars(select(RequestRow).where(where)
                                  .order_by(RequestRow.created_at, RequestRow.seq_id)))
    finally:
        store.engine.dispose()


def example_rows(stack: Stack) -> list[RequestRow]:
    """The example's calls (the forward probes are the re-send test's)."""
    return [r for r in stored(stack) if r.kind != "forward"]


def wait_done(stack: Stack, ids: list[str], timeout: float = 60) -> list[RequestRow]:
    deadline = time.monotonic() + timeout
    rows = stored(stack, ids)
    while len(rows) < len(ids) or not all(r.finished for r in rows):
        assert time.monotonic() < deadline, f"{ids} not finished:\n{stack.logs()}"
        time.sleep(0.3)
        rows = stored(stack, ids)
    return rows


def loss(row: RequestRow) -> float:
    assert row.result_type == "proto" and row.result is not None
    return deserialize_forward_backward_output(row.result).metrics["loss:sum"]


def test_chain_trains_an_epoch_in_order_and_stores_every_result(stack, epoch):
    rows = example_rows(stack)
    assert [r.kind for r in rows] == KINDS
    assert all(r.state == DONE for r in rows), [(r.kind, r.error) for r in rows]
    assert {r.tenant for r in rows} == {tenant_of(API_KEY)}
    train = rows[:-1]
    assert [r.seq_id for r in train] == list(range(len(train)))
    # A chain sends each call after the previous one is stored: they finished in seq order.
    finished = [r.finished_at for r in rows]
    assert finished == sorted(finished)

    losses = [loss(r) for r in rows if r.kind == "forward_backward"]
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    first, second = losses[:STEPS_PER_EPOCH], losses[STEPS_PER_EPOCH:]
    assert all(b < a for a, b in zip(first, second, strict=True)), losses  # same minibatches
    assert sum(second) < 0.9 * sum(first), losses
    for r in rows:
        if r.kind == "optim_step":
            metrics = json.loads(r.result)["metrics"]
            assert metrics["learning_rate:mean"] == pytest.approx(LEARNING_RATE)
            assert metrics["grad_norm:mean"] > 0

    saved = json.loads(rows[-2].result)
    assert saved["path"] == f"tinker://{MODEL}/sampler_weights/final"
    folder = stack.data_dir / "checkpoints" / tenant_of(API_KEY) / MODEL / "sampler_weights"
    assert (folder / "final" / "adapter_config.json").is_file()
    sample = deserialize_sample_response(rows[-1].result).sequences
    assert len(sample) == 1 and 1 <= len(sample[0].tokens) <= 4


def test_rest_reads_what_the_chain_stored(stack, epoch):
    rows = example_rows(stack)
    fb = next(r for r in rows if r.kind == "forward_backward")
    answer = httpx.post(f"{stack.url}/api/v1/retrieve_future", json={"request_id": fb.id},
                        headers={"X-API-Key": API_KEY}, timeout=30)
    assert answer.status_code == 200
    assert deserialize_forward_backward_output(answer.content).metrics["loss:sum"] == loss(fb)
    foreign = httpx.post(f"{stack.url}/api/v1/retrieve_future", json={"request_id": fb.id},
                         headers={"X-API-Key": "tml-someone-else"}, timeout=30)
    assert foreign.status_code == 404
    session = httpx.get(f"{stack.url}/api/v1/sessions/{BATCH}",
                        headers={"X-API-Key": API_KEY}, timeout=30).json()
    assert session["training_run_ids"] == [MODEL] and session["sampler_ids"] == [SAMPLER]
    checkpoints = httpx.get(f"{stack.url}/api/v1/training_runs/{MODEL}/checkpoints",
                            headers={"X-API-Key": API_KEY}, timeout=30).json()["checkpoints"]
    assert [c["tinker_path"] for c in checkpoints] == [f"tinker://{MODEL}/sampler_weights/final"]


def test_status_command_shows_progress_and_results(stack, epoch):
    rows = example_rows(stack)
    status = script(stack, "-m", "tasks.batch", "status", BATCH)
    lines = status.splitlines()
    assert lines[0] == f"{BATCH}: {len(KINDS)} calls: {len(KINDS)} done, 0 failed, 0 pending"
    assert len(lines) == 2 + len(KINDS)
    assert "create_model" in lines[2] and lines[2].endswith(MODEL)
    assert "forward_backward" in lines[3] and f"loss:sum={loss(rows[1]):.4g}" in lines[3]
    assert "optim_step" in lines[4] and "learning_rate:mean=0.01" in lines[4]
    assert "save_weights_for_sampler" in lines[-2]
    assert lines[-2].endswith(f"tinker://{MODEL}/sampler_weights/final")
    assert lines[-1].split()[1:4] == ["sample", SAMPLER, "done"]


def test_sending_a_chain_again_trains_nothing_twice(stack, epoch):
    first = example_rows(stack)
    # The same script with the same batch id: every call dedupes to the first run's row.
    again = script(stack, "examples/sl_chain.py", "--batch-id", BATCH, "--epochs", str(EPOCHS))
    assert again.splitlines()[0] == f"batch: {BATCH}"
    rerun = example_rows(stack)
    assert [(r.id, r.state, r.result, r.finished_at) for r in rerun] == [
        (r.id, r.state, r.result, r.finished_at) for r in first]

    # A probe before and one after every call of the batch is sent again (`resend`): the
    # model's weights must not have moved in between.
    out = script(stack, "-c", PROBE, API_KEY, BATCH, MODEL, json.dumps(PROBE_DATUM))
    assert out.startswith(f"sent {len(KINDS) + 2} calls again as one chain (1 not finished")
    before, after = json.loads(out.splitlines()[-1])
    probes = json.loads(script(stack, "-m", "tasks.batch", "status", before, after,
                               "--wait", "60", "--json"))
    assert [p["state"] for p in probes] == ["done", "done"]
    assert [p["seq_id"] for p in probes] == [len(KINDS) - 1, len(KINDS)]
    lb, la = (p["result"]["metrics"]["loss:sum"] for p in probes)
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-6), (lb, la)
    assert [(r.id, r.result, r.finished_at) for r in example_rows(stack)] == [
        (r.id, r.result, r.finished_at) for r in first]
