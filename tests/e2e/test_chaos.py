"""Chaos: SDK clients train while a worker, the API, Redis or PostgreSQL dies, and lose nothing.

One stack with a PostgreSQL and a Redis of its own (the `private` backend: they are killed
here). A fault-free run of the workload comes first; then each test runs the same workload
(three clients, each create → steps × (forward_backward + optim_step) → save_state, with
saves on the way in one test) and, part-way, kills something with SIGKILL. Each asserts
that every client call returned a result (they are counted), that the final adapter
weights, AdamW moments and step counts equal the fault-free run's bit for bit (the CPU's
pass is batch-invariant: workers/lora.py), and that no request row is left pending.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import sqlalchemy as sa
import tinker
import torch
from safetensors.torch import load_file
from tinker import types

from store.engine import normalise_url
from tests.e2e.stack import API_KEY, Stack, procfile_command
from tests.e2e.test_sdk import BASE

pytestmark = pytest.mark.e2e

CLIENTS, STEPS = 3, 12
ADAM = types.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("stack-chaos"), "private", long_poll_seconds="5",
                    snapshot_every_steps="3", resend_after_s="3", checkpoint_sweep_s="0")
    yield s
    s.stop()


def batch(client: int, step: int) -> list[types.Datum]:
    out = []
    for row in range(2):
        tokens = [(31 * client + 7 * step + 3 * i + row) % 500 + 1 for i in range(10 + row)]
        out.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                            "weights": np.ones(len(tokens) - 1, dtype=np.float32)}))
    return out


class Workload:
    """CLIENTS SDK clients training at once; `progress` counts their finished steps."""

    def __init__(self, url: str, save_every: int = 0):
        self.url, self.save_every = url, save_every
        self.progress, self.calls, self.saves = 0, 0, 0
        self.errors: list[BaseException] = []
        self.final: dict[int, str] = {}  # client -> model id
        self._lock = threading.Lock()

    def run(self, chaos: Callable[[Workload], None] | None = None) -> Workload:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        if chaos is not None:
            chaos(self)
        for t in threads:
            t.join(180)
        assert not self.errors, self.errors
        assert not any(t.is_alive() for t in threads), "a client is still waiting"
        return self

    def _count(self, n: int = 1, step: bool = False) -> None:
        with self._lock:
            self.calls += n
            self.progress += step

    def _client(self, i: int) -> None:
        try:
            service = tinker.ServiceClient(base_url=self.url, api_key=API_KEY)
            tc = service.create_lora_training_client(BASE, rank=4, seed=100 + i).result()
            self._count()
        except BaseException as e:  # noqa: BLE001 - reported by run()
            self.errors.append(e)
            return
        self._train(i, tc)

    def _train(self, i: int, tc: tinker.TrainingClient) -> None:
        """Client i's steps and final save_state (errors go to run())."""
        try:
            for step in range(STEPS):
                fb = tc.forward_backward(batch(i, step), "cross_entropy")
                opt = tc.optim_step(ADAM)
                assert fb.result().loss_fn_outputs and opt.result() is not None
                self._count(2, step=True)
                if self.save_every and step % self.save_every == self.save_every - 1:
                    assert tc.save_state(f"step{step}").result().path
                    self._count()
                    with self._lock:
                        self.saves += 1
            assert tc.save_state("final").result().path
            self._count()
            self.final[i] = tc.model_id
        except BaseException as e:  # noqa: BLE001 - reported by run()
            self.errors.append(e)

    def until(self, steps: int, timeout: float = 120.0) -> None:
        """Wait until the clients have finished `steps` steps between them."""
        deadline = time.monotonic() + timeout
        while self.progress < steps:
            assert time.monotonic() < deadline and not self.errors, self.errors
            time.sleep(0.05)

    @property
    def expected_calls(self) -> int:
        return CLIENTS * (2 + 2 * STEPS) + self.saves


def final_state(stack: Stack, model_id: str) -> dict[str, torch.Tensor]:
    [folder] = Path(stack.data_dir, "checkpoints").glob(f"*/{model_id}/weights/final")
    return {**load_file(folder / "adapter_model.safetensors"),
            **load_file(folder / "optimizer.safetensors")}


def pending_rows(stack: Stack) -> int:
    engine = sa.create_engine(normalise_url(stack.env["DATABASE_URL"]))
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM requests "
                                        "WHERE state = 'pending'")).scalar_one()
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def reference(stack):
    run = Workload(stack.url).run()
    return {i: final_state(stack, m) for i, m in run.final.items()}


def check(stack: Stack, run: Workload, reference: dict) -> None:
    assert run.calls == run.expected_calls
    for i, model_id in run.final.items():
        got, want = final_state(stack, model_id), reference[i]
        assert got.keys() == want.keys()
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), (i, key)
    assert int(reference[0]["step"]) == STEPS
    assert pending_rows(stack) == 0


def test_worker_killed_twice_mid_training(stack, reference):
    def chaos(run: Workload) -> None:
        for at in (STEPS * CLIENTS // 3, 2 * STEPS * CLIENTS // 3):
            run.until(at)
            stack.kill("worker", signal.SIGKILL)
            stack.restart("worker")

    check(stack, Workload(stack.url).run(chaos), reference)
    assert "rebuilding model" in (stack.data_dir / "worker.log").read_text()


def test_api_killed_mid_training(stack, reference):
    def chaos(run: Workload) -> None:
        run.until(STEPS * CLIENTS // 2)
        stack.kill("web", signal.SIGKILL)
        stack.restart("web")

    check(stack, Workload(stack.url).run(chaos), reference)


def test_redis_restarted_mid_training(stack, reference):
    """The restarted Redis keeps nothing: messages queued at the kill are gone, and the
    worker's sweep sends their calls again (resend_after_s)."""
    def chaos(run: Workload) -> None:
        run.until(STEPS * CLIENTS // 2)
        stack.kill("redis", signal.SIGKILL)
        time.sleep(3.0)  # the outage: clients keep calling meanwhile
        stack.restart("redis")

    check(stack, Workload(stack.url).run(chaos), reference)


def test_postgres_restarted_mid_training(stack, reference):
    """While the database is away the API answers 503 (never 500: Stack.stop checks) and
    the worker waits for it with the calls it holds. The worker is paused until calls are
    pending, so that it surely has some to run while the database is away (a tick lasts
    milliseconds: left running, it is most often idle at the kill)."""
    def chaos(run: Workload) -> None:
        run.until(STEPS * CLIENTS // 2)
        worker = stack.procs["worker"].pid
        os.killpg(worker, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            while pending_rows(stack) == 0:
                assert time.monotonic() < deadline and not run.errors, run.errors
                time.sleep(0.05)
            stack.kill("postgres", signal.SIGKILL)
        finally:
            os.killpg(worker, signal.SIGCONT)
        time.sleep(3.0)
        stack.restart("postgres")

    check(stack, Workload(stack.url).run(chaos), reference)
    assert "the database is away" in (stack.data_dir / "worker.log").read_text()


def test_worker_killed_during_a_save(stack, reference):
    """Killed while saves are on the way: every save answers once, every checkpoint listed
    loads, and no half-written folder is left."""
    log = stack.data_dir / "worker.log"

    def chaos(run: Workload) -> None:
        seen = log.read_text().count("tinker.save_weights[")
        deadline = time.monotonic() + 120
        while log.read_text().count("tinker.save_weights[") == seen:
            assert time.monotonic() < deadline and not run.errors, run.errors
            time.sleep(0.01)
        stack.kill("worker", signal.SIGKILL)
        stack.restart("worker")

    run = Workload(stack.url, save_every=4).run(chaos)
    check(stack, run, reference)
    rest = tinker.RestClient(base_url=stack.url, api_key=API_KEY)
    for model_id in run.final.values():
        listed = rest.list_checkpoints(model_id).result().checkpoints
        assert sorted(c.checkpoint_id for c in listed) == sorted(
            ["weights/final"] + [f"weights/step{s}" for s in range(3, STEPS, 4)])
        for checkpoint in listed:
            [folder] = Path(stack.data_dir, "checkpoints").glob(
                f"*/{model_id}/{checkpoint.checkpoint_id}")
            assert int(load_file(folder / "optimizer.safetensors")["step"]) >= 1
            assert load_file(folder / "adapter_model.safetensors")
    leftovers = list(Path(stack.data_dir, "checkpoints").glob("*/*/*/.*"))
    assert leftovers == []


def test_the_procfiles_supervisor_restarts_a_killed_worker(stack, reference):
    """Under `honcho start` nothing restarts a dead process: the Procfile runs the worker
    under workers.supervise, which does. Its worker is killed with SIGKILL and nobody else
    intervenes; the clients finish all the same."""
    command = procfile_command("worker").split()
    assert command[:3] == ["python", "-m", "workers.supervise"]
    stack.kill("worker")
    stack.commands["worker"] = [sys.executable, *command[1:]]
    stack.restart("worker")
    supervisor = psutil.Process(stack.procs["worker"].pid)

    def chaos(run: Workload) -> None:
        run.until(STEPS * CLIENTS // 2)
        [worker] = supervisor.children()
        worker.kill()

    check(stack, Workload(stack.url).run(chaos), reference)
    assert "starting it again" in (stack.data_dir / "worker.log").read_text()
