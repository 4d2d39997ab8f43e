"""The whole stack with `--tensor-parallel-size 2` on the CPU (two gloo ranks): the Celery
worker's engine starts its follower process, the SDK trains and samples through it, and a
follower that dies in the middle of a call takes the worker down (exit 70, a message naming
the rank) without losing the call: after the restart it is answered and training goes on.
"""

from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import psutil
import pytest
import tinker
from tinker import types
from tinker.proto.response_conv import deserialize_forward_backward_output

from config import load_settings
from tests.e2e.stack import API_KEY, Stack
from tests.unit.test_executor import create, fwdbwd_body, job
from workers.executor import Executor
from workers.scheduler import Plan

pytestmark = pytest.mark.e2e
BASE = "tinkerq/tiny-qwen3"
PROMPT = [9707, 11, 1879, 13, 3555, 374, 264, 1273]
ADAM = types.AdamParams(learning_rate=5e-3, beta1=0.9, beta2=0.95, eps=1e-8)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("stack-tp2"), "sqlite", tensor_parallel_size="2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def service(stack):
    return tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "weights": np.ones(len(tokens) - 1, dtype=np.float32)})


def one_rank_loss(tmp_path) -> float:
    """The same datum's loss on one rank in this process (a fresh adapter adds nothing)."""
    executor = Executor.build(load_settings(env={}, data_dir=str(tmp_path)))
    create(executor, "m", rank=8)
    out = executor.run(Plan(train=[job("forward", fwdbwd_body("m", 1, PROMPT, forward_only=True),
                                       "m", 1, rid="f")]))
    return deserialize_forward_backward_output(out["f"].proto).metrics["loss:sum"]


def follower(stack: Stack) -> psutil.Process:
    children = psutil.Process(stack.procs["worker"].pid).children(recursive=True)
    ranks = [p for p in children if "spawn_main" in " ".join(p.cmdline())
             and "resource_tracker" not in " ".join(p.cmdline())]
    assert len(ranks) == 1, [p.cmdline() for p in children]
    return ranks[0]


def test_two_ranks_serve_the_sdk(service, stack, tmp_path):
    assert "1 data-parallel replica(s) × 2 tensor-parallel rank(s) (gloo)" in stack.logs(
        tail=100_000)
    tc = service.create_lora_training_client(BASE, rank=8).result()
    first = tc.forward([datum(PROMPT)], "cross_entropy").result().metrics["loss:sum"]
    assert first == pytest.approx(one_rank_loss(tmp_path), rel=1e-5)
    for _ in range(3):
        tc.forward_backward([datum(PROMPT)], "cross_entropy").result()
        tc.optim_step(ADAM).result()
    after = tc.forward([datum(PROMPT)], "cross_entropy").result().metrics["loss:sum"]
    assert after < first - 1.0  # it trained, over both ranks
    sampler = tc.save_weights_and_get_sampling_client().result()
    out = sampler.sample(types.ModelInput.from_ints(PROMPT), 2,
                         types.SamplingParams(max_tokens=6, temperature=1.0, seed=5)).result()
    assert [len(s.tokens) for s in out.sequences] == [6, 6]
    assert all(math.isfinite(lp) for s in out.sequences for lp in s.logprobs)


def test_a_rank_dying_mid_call_loses_nothing(service, stack):
    """The follower is killed while the worker holds a forward_backward. The worker exits 70
    naming the rank; restarted, it takes the call back from Redis at once (not after the
    hours-long visibility timeout), rebuilds the run at both ranks from its snapshot and the
    calls after it, and answers the call: the client sees latency only, and the run goes on
    as if nothing happened. The state saved before still loads, optimizer included."""
    tc = service.create_lora_training_client(BASE, rank=8).result()
    tc.forward_backward([datum(PROMPT)], "cross_entropy").result()
    tc.optim_step(ADAM).result()
    saved = tc.save_state("before-crash").result().path
    want = tc.forward([datum(PROMPT)], "cross_entropy").result().metrics["loss:sum"]
    log = stack.data_dir / "worker.log"
    received = log.read_text().count("tinker.forward_backward[")
    rng = np.random.default_rng(0)
    heavy = [datum(rng.integers(0, 150_000, 700).tolist()) for _ in range(3)]  # seconds
    future = tc.forward_backward(heavy, "cross_entropy")
    deadline = time.monotonic() + 60
    while log.read_text().count("tinker.forward_backward[") == received:  # not yet taken
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)
    time.sleep(0.5)
    os.kill(follower(stack).pid, signal.SIGKILL)
    worker = stack.procs.pop("worker")
    assert worker.wait(60) == 70
    assert "rank 1 exited (code -9)" in log.read_text()
    stack.restart("worker")
    out = future.result(timeout=300)  # answered, within seconds of the restart
    assert len(out.loss_fn_outputs) == len(heavy)
    assert "put back 1 call(s)" in log.read_text() and "rebuilding model" in log.read_text()
    after = tc.forward([datum(PROMPT)], "cross_entropy").result().metrics["loss:sum"]
    assert after == pytest.approx(want, rel=1e-5)  # weights as they were before the crash
    tc.optim_step(ADAM).result()
    resumed = service.create_training_client_from_state_with_optimizer(saved).result()
    got = resumed.forward([datum(PROMPT)], "cross_entropy").result().metrics["loss:sum"]
    assert got == pytest.approx(want, rel=1e-5)
    resumed.forward_backward([datum(PROMPT)], "cross_entropy").result()
    resumed.optim_step(ADAM).result()
