"""Many workers behind one API: three Celery workers, two serving the built-in tiny model
and one a second tiny model of another shape, SDK clients on both base models at once; one
of the pair is killed with SIGKILL mid-training and nothing restarts it. The workers are
laid out as on two hosts: each host has a data_dir of its own, and they share only the
database, Redis and the checkpoint store (store_dir).

The live one of the pair takes over its queue once it has been silent for failover_after_s
(its runs are rebuilt from their snapshots and done calls, its pending calls sent again),
so every client finishes with no error and the final adapters and AdamW state of every run
equal a fault-free run's bit for bit (the CPU's pass is batch-invariant).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import tinker
import torch
from safetensors.torch import load_file

from store.engine import normalise_url
from tests.e2e.stack import API_KEY, Stack
from tests.e2e.test_chaos import CLIENTS, STEPS, Workload, pending_rows
from tests.e2e.test_sdk import BASE

pytestmark = pytest.mark.e2e

def write_other_model(folder) -> str:
    """A second tiny base model: the default's config with a narrower MLP."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from workers.default_model import DEFAULT_MODEL_CONFIG, write_tokenizer

    torch.manual_seed(1)
    config = Qwen3Config(**(DEFAULT_MODEL_CONFIG | {"intermediate_size": 96}))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    write_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack-fleet")
    other = write_other_model(tmp / "other-model")
    s = Stack.start(tmp / "data", "postgres", long_poll_seconds="5", snapshot_every_steps="3",
                    resend_after_s="3", failover_after_s="10", checkpoint_sweep_s="0",
                    store_dir=str(tmp / "store"))
    try:
        queue, host2 = s.env["TINKERQ_QUEUE"], str(tmp / "host2")
        s.add_worker("worker-a2", TINKERQ_QUEUE=f"{queue}-a2", TINKERQ_DATA_DIR=host2)
        s.add_worker("worker-b", TINKERQ_QUEUE=f"{queue}-b", TINKERQ_BASE_MODEL=other,
                     TINKERQ_DATA_DIR=host2)
        s.names = {queue: "worker", f"{queue}-a2": "worker-a2"}  # type: ignore[attr-defined]
        s.other = other  # type: ignore[attr-defined]
        deadline = time.monotonic() + 60  # every worker has beaten: all three are live
        while len(served(s)) < 2:
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.5)
        yield s
    finally:
        s.stop()


def served(stack: Stack) -> list[str]:
    answer = httpx.get(f"{stack.url}/api/v1/get_server_capabilities",
                       headers={"X-API-Key": API_KEY}, timeout=10).json()
    return [m["model_name"] for m in answer["supported_models"]]


def final_state(stack: Stack, model_id: str) -> dict[str, torch.Tensor]:
    """A run's final checkpoint, from the shared store."""
    [folder] = Path(stack.env["TINKERQ_STORE_DIR"], "checkpoints").glob(
        f"*/{model_id}/weights/final")
    return {**load_file(folder / "adapter_model.safetensors"),
            **load_file(folder / "optimizer.safetensors")}


def queue_of(stack: Stack, model_id: str) -> str:
    engine = sa.create_engine(normalise_url(stack.env["DATABASE_URL"]))
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT queue FROM models WHERE id = :m"),
                                {"m": model_id}).scalar_one()
    finally:
        engine.dispose()


class Fleet(Workload):
    """The chaos tests' workload, but two clients on the tiny model and one on the other,
    created one after the other (so that the pair's runs land on both of its workers)
    before they train at once."""

    def __init__(self, stack: Stack):
        super().__init__(stack.url)
        service = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)
        self.clients = [service.create_lora_training_client(base, rank=4, seed=100 + i).result()
                        for i, base in enumerate((BASE, BASE, stack.other))]  # type: ignore
        assert len(self.clients) == CLIENTS
        self.calls = CLIENTS

    def _client(self, i: int) -> None:
        self._train(i, self.clients[i])


def test_capabilities_list_both_base_models(fleet):
    assert sorted(served(fleet)) == sorted([BASE, fleet.other])


def test_a_killed_worker_of_the_pair_fails_over_to_the_other(fleet):
    reference = Fleet(fleet).run()
    want = {i: final_state(fleet, m) for i, m in reference.final.items()}

    run = Fleet(fleet)
    queues = [queue_of(fleet, tc.model_id) for tc in run.clients]
    assert queues[0] != queues[1] and set(queues[:2]) == set(fleet.names)  # both of the pair
    assert queues[2] == fleet.env["TINKERQ_QUEUE"] + "-b"
    victim = queues[1]

    def chaos(run: Fleet) -> None:
        run.until(STEPS * CLIENTS // 3)
        fleet.kill(fleet.names[victim], signal.SIGKILL)

    run.run(chaos)
    assert run.calls == run.expected_calls
    survivor = next(q for q in fleet.names if q != victim)
    assert queue_of(fleet, run.clients[1].model_id) == survivor  # the run moved
    for i, model_id in run.final.items():
        got = final_state(fleet, model_id)
        assert got.keys() == want[i].keys()
        for key, tensor in want[i].items():
            assert torch.equal(got[key], tensor), (i, key)
    assert int(want[0]["step"]) == STEPS
    assert pending_rows(fleet) == 0
    log = (fleet.data_dir / f"{fleet.names[survivor]}.log").read_text()
    assert f"took over queue {victim}" in log and "rebuilding model" in log
    assert not Path(fleet.data_dir, "checkpoints").exists()  # all in the shared store
    assert sorted(served(fleet)) == sorted([BASE, fleet.other])  # the pair still serves

    # The victim comes back: the calls it had taken when it died are put back on its queue,
    # and it forwards them to the queue that owns their run now instead of running them.
    name = fleet.names[victim]
    env = {"TINKERQ_QUEUE": victim} | ({"TINKERQ_DATA_DIR": str(fleet.data_dir.parent / "host2")}
                                       if name == "worker-a2" else {})
    fleet.add_worker(name, **env)
    deadline = time.monotonic() + 60
    while "moved to queue" not in (fleet.data_dir / f"{name}.log").read_text():
        assert time.monotonic() < deadline, fleet.logs()
        time.sleep(0.5)
    assert pending_rows(fleet) == 0
