"""The engine thread: concurrent submitters are batched into few ticks, in seq_id order."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from tinker.proto.response_conv import deserialize_forward_backward_output

from config import load_settings
from protocol.jobs import Job
from tests.unit.test_executor import fwdbwd_body, job
from workers.engine import Engine
from workers.executor import Executor


def start_engine(tiny_model, tmp_path, **overrides) -> Engine:
    settings = load_settings(env={}, data_dir=str(tmp_path), tick_gather_ms=50, **overrides)
    engine = Engine(settings, Executor(tiny_model, settings, lambda ids: "", [511]))
    engine._thread.start()
    return engine


def create_body(model_id: str) -> dict:
    return {"model_id": model_id, "base_model": "tiny",
            "lora": {"rank": 4, "seed": 0, "train_attn": True, "train_mlp": True,
                     "train_unembed": True}}


def test_concurrent_calls_of_many_models_share_ticks(tiny_model, tmp_path):
    engine = start_engine(tiny_model, tmp_path, max_lora_adapters=8)
    models = [f"m{i}" for i in range(8)]
    for m in models:
        assert engine.submit(job("create_model", create_body(m), m)).result(10).ok
    ticks_before = engine.ticks
    jobs = [job("forward", fwdbwd_body(m, seq, [1, 2, 3, 4], forward_only=True), m, seq)
            for m in models for seq in (1, 2, 3)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # like Celery's thread pool
        outcomes = list(pool.map(lambda j: engine.submit(j).result(30), jobs))
    assert all(o.ok for o in outcomes)
    assert engine.ticks - ticks_before < len(jobs) / 4  # 24 calls in a handful of ticks


def test_out_of_order_arrival_runs_in_seq_order(tiny_model, tmp_path):
    engine = start_engine(tiny_model, tmp_path)
    assert engine.submit(job("create_model", create_body("a"), "a")).result(10).ok
    adam = {"learning_rate": 0.5, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
            "weight_decay": 0.0, "grad_clip_norm": 0.0}
    # seq 3 (forward) arrives first; it must see the update of seq 2, which needs seq 1.
    third = engine.submit(job("forward", fwdbwd_body("a", 3, [1, 2, 3], forward_only=True),
                              "a", 3))
    second = engine.submit(Job("opt", "optim_step", json.dumps({"adam_params": adam}).encode(),
                               "a", 2))
    first = engine.submit(job("forward_backward", fwdbwd_body("a", 1, [1, 2, 3]), "a", 1))
    loss = [deserialize_forward_backward_output(f.result(10).proto).metrics["loss:sum"]
            for f in (first, third)]
    assert second.result(10).ok
    assert loss[1] < loss[0]


def test_a_gap_fails_after_its_timeout(tiny_model, tmp_path):
    engine = start_engine(tiny_model, tmp_path, seq_gap_timeout_s=0.5)
    assert engine.submit(job("create_model", create_body("a"), "a")).result(10).ok
    late = engine.submit(job("forward", fwdbwd_body("a", 2, [1, 2, 3], forward_only=True), "a", 2))
    outcome = late.result(10)
    assert not outcome.ok and "seq_id 1" in outcome.error


def test_unknown_model_is_answered_not_left_waiting(tiny_model, tmp_path):
    engine = start_engine(tiny_model, tmp_path)
    outcome = engine.submit(job("forward", fwdbwd_body("ghost", 1, [1, 2]), "ghost", 1)).result(5)
    assert not outcome.ok and "no state in this worker" in outcome.error


def test_a_tick_that_raises_answers_its_calls_and_the_order_goes_on(tiny_model, tmp_path,
                                                                    monkeypatch):
    """An exception out of the executor used to leave the tick's futures (and so their
    Celery tasks and rows) waiting forever; now they fail, and the model's next call runs."""
    engine = start_engine(tiny_model, tmp_path)
    assert engine.submit(job("create_model", create_body("a"), "a")).result(10).ok
    real = engine.executor.run

    def broken(plan):
        monkeypatch.setattr(engine.executor, "run", real)  # the next tick works again
        raise RuntimeError("a bug in the executor")

    monkeypatch.setattr(engine.executor, "run", broken)
    failed = engine.submit(job("forward", fwdbwd_body("a", 1, [1, 2, 3], forward_only=True),
                               "a", 1)).result(10)
    assert not failed.ok and failed.category == "server" and "a bug" in failed.error
    after = engine.submit(job("forward", fwdbwd_body("a", 2, [1, 2, 3], forward_only=True),
                              "a", 2)).result(10)
    assert after.ok


def test_an_idle_model_is_released_by_the_engine_alone_and_comes_back(tiny_model, tmp_path):
    """With no call coming, the engine still wakes when a model's release_idle_s is up, writes
    its state out and frees it; the model's next call reads it back and goes on."""
    engine = start_engine(tiny_model, tmp_path, release_idle_s=0.3)
    residency = engine.executor.residency
    assert engine.submit(job("create_model", create_body("a"), "a")).result(10).ok
    first = engine.submit(job("forward_backward", fwdbwd_body("a", 1, [1, 2, 3]), "a", 1))
    assert first.result(10).ok and residency.in_slot("a")
    deadline = time.monotonic() + 10
    while "a" not in residency.released and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "a" in residency.released and not residency.in_slot("a")
    again = engine.submit(job("forward_backward", fwdbwd_body("a", 2, [1, 2, 3]), "a", 2))
    assert again.result(10).ok and residency.in_slot("a") and not residency.released
    grads = [p.grad for p in tiny_model.adapter_parameters(residency.runs["a"].slot)]
    assert all(g is not None for g in grads)  # the first call's grads came back, summed


def test_a_finished_sessions_model_is_released_after_its_pending_calls(tiny_model, tmp_path):
    """retire() (the session finished) releases a model once the calls it already holds are
    answered, with idle releases off; the other model stays in memory."""
    engine = start_engine(tiny_model, tmp_path, release_idle_s=0)
    residency = engine.executor.residency
    for m in ("a", "b"):
        assert engine.submit(job("create_model", create_body(m), m)).result(10).ok
    pending = engine.submit(job("forward_backward", fwdbwd_body("a", 1, [1, 2, 3]), "a", 1))
    engine.retire(["a"])
    assert pending.result(10).ok
    deadline = time.monotonic() + 10
    while "a" not in residency.released and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "a" in residency.released and not residency.in_slot("a")
    assert residency.in_slot("b") and "b" not in residency.released


def test_a_lost_gpu_answers_every_call_and_stops_the_worker(tiny_model, tmp_path):
    """After a call fails with a server error, the engine probes the device; once it is lost
    (an illegal address poisons the CUDA context), the failed tick's calls, the calls queued
    behind them and every later call are answered with a server error, and on_fatal stops
    the worker so that its supervisor restarts it."""
    engine = start_engine(tiny_model, tmp_path)
    stopped = []
    engine.on_fatal = lambda: stopped.append(True)
    assert engine.submit(job("create_model", create_body("a"), "a")).result(10).ok
    assert engine.submit(job("forward", fwdbwd_body("a", 1, [1, 2, 3], forward_only=True),
                             "a", 1)).result(10).ok and not stopped  # probed only on failure
    engine.probe = lambda: "AcceleratorError: an illegal memory access was encountered"
    real_run = engine.executor.run

    def run(plan):  # the kernel's fault, as the GPU raises it
        if plan.train:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(plan)

    engine.executor.run = run
    # seq 2's tick fails on the device; seq 4 waits behind a gap
    bad = engine.submit(job("forward", fwdbwd_body("a", 2, [1, 2], forward_only=True),
                            "a", 2))
    waiting = engine.submit(job("forward", fwdbwd_body("a", 4, [1, 2], forward_only=True),
                                "a", 4))
    first = bad.result(10)
    assert not first.ok and first.category == "server" and "illegal memory" in first.error
    queued = waiting.result(10)
    assert not queued.ok and queued.category == "server" and "illegal memory" in queued.error
    later = engine.submit(job("forward", fwdbwd_body("a", 3, [1, 2], forward_only=True), "a", 3))
    assert later.done() and "restarting" in later.result().error
    assert stopped == [True]
