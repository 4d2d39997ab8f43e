"""The worker's executor over 2 ranks (a real follower process, gloo on CPU) against one rank,
on the built-in default model: every job kind gives the same answer, checkpoints move
between N=2 and N=1 both ways, and a rank that dies ends the worker instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from config import load_settings
from tests.unit.test_executor import fwdbwd_body, job
from workers.executor import Executor
from workers.scheduler import Plan

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [9707, 11, 1879, 13, 3555, 374]
# eps well above the smallest gradients: Adam's first steps would otherwise turn their
# rounding differences (sums in another order over two ranks) into ±lr moves
ADAM = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-4,
        "weight_decay": 0.01, "grad_clip_norm": 0.0}  # (clipping: test_tp.py)


def settings(tmp: Path, n: int):
    return load_settings(env={}, data_dir=str(tmp), max_lora_adapters=2, max_models=4,
                         max_sampler_adapters=2, tensor_parallel_size=n)


def logprobs(executor: Executor, model_id: str, seq: int) -> np.ndarray:
    body = fwdbwd_body(model_id, seq, PROMPT, forward_only=True)
    out = executor.run(Plan(train=[job("forward", body, model_id, seq, rid=f"f{seq}")]))
    return np.asarray(deserialize_forward_backward_output(out[f"f{seq}"].proto)
                      .loss_fn_outputs[0]["logprobs"].data)


def script(executor: Executor, ckpt: Path) -> dict:
    """Train a little, save both kinds of checkpoint, sample from the sampler weights."""
    body = {"model_id": "a", "base_model": "tiny", "lora": {
        "rank": 8, "seed": 3, "train_attn": True, "train_mlp": True, "train_unembed": True}}
    executor.run(Plan(barriers=[job("create_model", body, "a")]))
    got: dict = {"fwdbwd": []}
    for seq in (1, 3):
        out = executor.run(Plan(train=[job("forward_backward", fwdbwd_body("a", seq, PROMPT),
                                           "a", seq, rid=f"fb{seq}")]))
        got["fwdbwd"].append(deserialize_forward_backward_output(out[f"fb{seq}"].proto))
        step = executor.run(Plan(barriers=[job("optim_step", {"adam_params": ADAM}, "a",
                                               seq + 1, rid=f"o{seq}")]))
        got.setdefault("grad_norm", []).append(step[f"o{seq}"].json["metrics"]["grad_norm:mean"])
    got["after"] = logprobs(executor, "a", 5)
    executor.run(Plan(barriers=[job("save_weights", {
        "checkpoint_dir": str(ckpt / "state"), "tinker_path": "tinker://a/weights/s"}, "a", 6),
        ]))
    executor.run(Plan(barriers=[job("save_weights_for_sampler", {
        "checkpoint_dir": str(ckpt / "sampler"), "tinker_path": "tinker://a/sampler_weights/s"},
        "a", 7)]))
    sample = {"prompt": PROMPT, "num_samples": 2, "max_tokens": 6, "temperature": 0.0,
              "top_k": -1, "top_p": 1.0, "seed": 1, "stop_strings": [], "stop_token_ids": [],
              "stop_at_eos": False, "prompt_logprobs": False, "topk_prompt_logprobs": 0,
              "adapter_dir": str(ckpt / "sampler")}
    greedy = executor.run(Plan(samples=[job("sample", sample, rid="s1")]))
    while executor.busy:
        greedy.update(executor.run(Plan()))
    got["greedy"] = [s.tokens for s in deserialize_sample_response(greedy["s1"].proto).sequences]
    return got


def load(executor: Executor, model_id: str, state: Path) -> np.ndarray:
    out = executor.run(Plan(barriers=[job("load_weights", {
        "model_id": model_id, "create": True, "checkpoint_dir": str(state), "optimizer": True,
        "tinker_path": "tinker://x/weights/s", "base_model": "tiny"}, model_id)]))
    assert all(o.ok for o in out.values()), out
    return logprobs(executor, model_id, 1)


def test_two_ranks_answer_like_one_and_checkpoints_cross_over(tmp_path):
    one = Executor.build(settings(tmp_path, 1))
    two = Executor.build(settings(tmp_path, 2))
    try:
        assert two.leader is not None and two.model.tp.size == 2
        a, b = script(one, tmp_path / "n1"), script(two, tmp_path / "n2")
        for x, y in zip(a["fwdbwd"], b["fwdbwd"], strict=True):
            assert y.metrics["loss:sum"] == pytest.approx(x.metrics["loss:sum"], rel=1e-5)
            np.testing.assert_allclose(y.loss_fn_outputs[0]["logprobs"].data,
                                       x.loss_fn_outputs[0]["logprobs"].data, atol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
        np.testing.assert_allclose(b["after"], a["after"], atol=2e-4)
        assert b["greedy"] == a["greedy"]
        # a state saved with N=2 loads with N=1 and the reverse, optimizer included
        np.testing.assert_allclose(load(one, "from2", tmp_path / "n2" / "state"), b["after"],
                                   atol=1e-5)
        np.testing.assert_allclose(load(two, "from1", tmp_path / "n1" / "state"), a["after"],
                                   atol=1e-5)
        for e, name in ((one, "from2"), (two, "from1")):  # the moments came along: same step
            e.run(Plan(train=[job("forward_backward", fwdbwd_body(name, 2, PROMPT), name, 2)]))
            e.run(Plan(barriers=[job("optim_step", {"adam_params": ADAM}, name, 3)]))
        np.testing.assert_allclose(logprobs(two, "from1", 4), logprobs(one, "from2", 4),
                                   atol=5e-4)
    finally:
        two.leader.close()


def test_a_state_saved_at_two_ranks_loads_at_four_and_one(tmp_path):
    """Checkpoints do not depend on N: trained and saved at N=2, loaded at N=4 and at N=1,
    the same logprobs. (A model with 4 KV heads, so that N=4 divides them.)"""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from workers.default_model import DEFAULT_MODEL_CONFIG, write_tokenizer

    folder = tmp_path / "kv4"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen3Config(**(
        DEFAULT_MODEL_CONFIG | {"num_key_value_heads": 4}))).save_pretrained(folder)
    write_tokenizer(folder)

    def build(n: int) -> Executor:
        return Executor.build(load_settings(
            env={}, data_dir=str(tmp_path / f"data{n}"), base_model=str(folder),
            max_lora_adapters=2, max_models=4, max_sampler_adapters=2, tensor_parallel_size=n))

    two = build(2)
    try:
        saved = script(two, tmp_path / "n2")
    finally:
        two.leader.close()
    four = build(4)
    try:
        assert four.model.tp.size == 4 and len(four.leader.procs) == 3
        at_four = load(four, "from2", tmp_path / "n2" / "state")
    finally:
        four.leader.close()
    at_one = load(build(1), "from2", tmp_path / "n2" / "state")
    np.testing.assert_allclose(at_four, saved["after"], atol=1e-5)
    np.testing.assert_allclose(at_one, saved["after"], atol=1e-5)


LEADER = textwrap.dedent("""
    import sys, time
    from config import load_settings
    from workers.executor import Executor
    from workers.scheduler import Plan
    ex = Executor.build(load_settings(env={}, data_dir=sys.argv[1], tensor_parallel_size=2))
    print("follower", ex.leader.procs[0].pid, flush=True)
    while True:
        ex.run(Plan())
        time.sleep(0.05)
""")


def _start_leader(tmp: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", LEADER, str(tmp)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.startswith("follower"), proc.stderr.read()  # type: ignore[union-attr]
    return proc, int(line.split()[1])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_dead_follower_stops_the_worker_with_a_message(tmp_path):
    proc, follower = _start_leader(tmp_path)
    os.kill(follower, signal.SIGKILL)
    code = proc.wait(timeout=30)
    assert code == 70
    assert "rank 1 exited (code -9)" in proc.stderr.read()  # type: ignore[union-attr]


def test_a_follower_does_not_outlive_its_leader(tmp_path):
    proc, follower = _start_leader(tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not _gone(follower) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(follower)


def test_a_run_snapshotted_at_two_ranks_is_restored_at_two_and_one(tmp_path):
    """A snapshot holds whole tensors: a run snapshotted at N=2 (the followers take part in
    the gather, rank 0 writes) and its calls replayed rebuild it at N=2 and at N=1."""
    from protocol.jobs import RESTORE
    from store import snapshots

    def calls(model_id: str) -> list:
        out = []
        for seq in (1, 3):
            out += [job("forward_backward", fwdbwd_body(model_id, seq, PROMPT), model_id, seq,
                        rid=f"{model_id}-fb{seq}"),
                    job("optim_step", {"adam_params": ADAM}, model_id, seq + 1,
                        rid=f"{model_id}-o{seq}")]
        return out

    def restore(executor: Executor, model_id: str, root: Path) -> np.ndarray:
        body = {"model_id": model_id, "base_model": "tiny", "snapshot_seq": 0,
                "snapshot_dir": str(snapshots.folder(root, "a", 0)), "next_seq": 5}
        restore = job(RESTORE, body, model_id, rid=f"restore-{model_id}")
        restore.body["replay"] = calls(model_id)
        out = executor.run(Plan(barriers=[restore]))
        assert out[restore.request_id].ok, out
        return logprobs(executor, model_id, 5)

    two = Executor.build(settings(tmp_path / "two", 2))
    try:
        create = {"model_id": "a", "base_model": "tiny", "lora": {"rank": 8, "seed": 3}}
        two.run(Plan(barriers=[job("create_model", create, "a")], snapshots=["a"]))
        assert two.snapshots.wait_idle(30)
        for call in calls("a"):
            plan = Plan(train=[call]) if call.kind == "forward_backward" else Plan(
                barriers=[call])
            assert all(o.ok for o in two.run(plan).values())
        trained = logprobs(two, "a", 5)
        root = tmp_path / "two" / "snapshots"
        np.testing.assert_allclose(restore(two, "again", root), trained, atol=1e-6)
    finally:
        two.leader.close()
    one = Executor.build(settings(tmp_path / "one", 1))
    np.testing.assert_allclose(restore(one, "again", root), trained, atol=2e-4)
