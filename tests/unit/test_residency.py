"""More models than adapter slots: offloaded runs train exactly as if always resident.

Each test drives two executors on the same tiny base model with the same plans: one with
2 device slots (runs move to CPU memory and back), one with 8 (everything stays resident),
and compares the results, which must be equal: the copies are fp32 to fp32.

Micro-batches hold one datum each (`train_micro_batch_size=8`, data of 5 tokens), so both
executors do the same float operations whichever models share a pass: packing another
model's rows next to a datum changes matmul shapes and so rounding, which AdamW amplifies
in near-zero gradients; that is batching, not offloading, and is left out here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tinker.proto.response_conv import deserialize_forward_backward_output

from config import load_settings
from protocol.jobs import UserError
from tests.conftest import tiny_qwen3_config
from tests.unit.test_executor import create, fwdbwd_body, job
from workers import checkpoints
from workers.executor import Executor
from workers.lora import BASE_SLOT
from workers.model import AdapterSpec, LoraModel
from workers.residency import Residency
from workers.scheduler import Plan

ADAM = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
        "weight_decay": 0.01, "grad_clip_norm": 1.0}


def make_executor(tmp_path, slots: int, max_models: int = 64) -> Executor:
    settings = load_settings(env={}, data_dir=str(tmp_path), max_lora_adapters=slots,
                             max_models=max_models, train_micro_batch_size=8)
    model = LoraModel.from_config(tiny_qwen3_config(), torch.device("cpu"), torch.float32)
    return Executor(model, settings, decode=lambda ids: "", eos_token_ids=[511])


@pytest.fixture
def pair(tmp_path):
    """(offloading executor with 2 slots, reference executor with everything resident)."""
    return make_executor(tmp_path / "small", 2), make_executor(tmp_path / "ref", 8)


def tokens_of(model_id: str, step: int) -> list[int]:
    k = sum(map(ord, model_id)) + 7 * step
    return [(k + 13 * i) % 500 + 1 for i in range(6)]


def fwdbwd(model_id: str, step: int, forward_only: bool = False):
    kind = "forward" if forward_only else "forward_backward"
    body = fwdbwd_body(model_id, step, tokens_of(model_id, step), forward_only=forward_only)
    return job(kind, body, model_id, step)


def optim(model_id: str, step: int):
    return job("optim_step", {"adam_params": ADAM}, model_id, step)


def run_both(pair, plan: Plan) -> list[dict]:
    outcomes = [ex.run(plan) for ex in pair]
    for outs in outcomes:
        assert all(o.ok for o in outs.values()), {k: o.error for k, o in outs.items()}
    return outcomes


def logprobs(ex: Executor, model_id: str) -> np.ndarray:
    outcome = ex.run(Plan(train=[fwdbwd(model_id, 99, forward_only=True)]))
    out = deserialize_forward_backward_output(outcome[f"forward-{model_id}-99"].proto)
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].data)


def assert_same_state(pair, model_id: str) -> None:
    small, ref = pair
    np.testing.assert_allclose(logprobs(small, model_id), logprobs(ref, model_id), atol=1e-6)
    for a, b in zip(small.runs[model_id].adam.exp_avg, ref.runs[model_id].adam.exp_avg,
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_five_models_on_two_slots_train_like_the_reference(pair):
    models = ["m0", "m1", "m2", "m3", "m4"]
    for i, m in enumerate(models):
        run_both(pair, Plan(barriers=[job("create_model", {
            "model_id": m, "base_model": "tiny",
            "lora": {"rank": 4, "seed": i, "train_attn": True, "train_mlp": True,
                     "train_unembed": True}}, m)]))
    step = 1
    for _ in range(3):  # every model's grads wait offloaded while the others use the slots
        for m in models:
            run_both(pair, Plan(train=[fwdbwd(m, step)]))
        for m in models:
            run_both(pair, Plan(barriers=[optim(m, step + 1)]))
        step += 2
    # one tick with all five models: run in groups of two on the small executor
    run_both(pair, Plan(train=[fwdbwd(m, step) for m in models]))
    for m in models:
        run_both(pair, Plan(barriers=[optim(m, step + 1)]))
    assert len(pair[0].residency.offloaded) == 3 and not pair[1].residency.offloaded
    for m in models:
        assert_same_state(pair, m)


def test_accumulated_grads_survive_offload(pair):
    for m in ("a", "b", "c"):
        create(pair[0], m, seed=3)
        create(pair[1], m, seed=3)
    run_both(pair, Plan(train=[fwdbwd("a", 1)]))
    run_both(pair, Plan(train=[fwdbwd("b", 1)]))
    run_both(pair, Plan(train=[fwdbwd("c", 1)]))
    saved = pair[0].residency.offloaded["a"]  # b and c took both slots
    assert all(w.A.grad is not None and w.B.grad is not None for w in saved.values())
    run_both(pair, Plan(barriers=[optim("a", 2)]))
    assert_same_state(pair, "a")


def test_save_weights_of_an_offloaded_model(pair, tmp_path):
    for m in ("a", "b", "c"):
        create(pair[0], m, seed=5)
        create(pair[1], m, seed=5)
    run_both(pair, Plan(train=[fwdbwd("a", 1)]))
    run_both(pair, Plan(barriers=[optim("a", 2)]))
    run_both(pair, Plan(train=[fwdbwd("b", 1), fwdbwd("c", 1)]))
    assert "a" in pair[0].residency.offloaded
    folders = [tmp_path / name / "a-s1" for name in ("small-ckpt", "ref-ckpt")]
    for ex, folder in zip(pair, folders, strict=True):
        saved = ex.run(Plan(barriers=[job("save_weights", {
            "checkpoint_dir": str(folder), "tinker_path": "tinker://a/weights/s1"}, "a", 3)]))
        assert saved["save_weights-a-3"].ok
    for name in (checkpoints.WEIGHTS_FILE, checkpoints.OPTIMIZER_FILE):
        small, ref = (load_file(f / name) for f in folders)
        assert small.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(small[key], ref[key], atol=1e-6, rtol=0)
    state = [json.loads((f / checkpoints.STATE_FILE).read_text()) for f in folders]
    assert state[0] == state[1]


def test_more_models_than_max_models_is_a_user_error(tmp_path):
    ex = make_executor(tmp_path, slots=2, max_models=3)
    for m in ("a", "b", "c"):
        assert create(ex, m)[f"create_model-{m}-None"].ok
    outcome = create(ex, "d")["create_model-d-None"]
    assert outcome.category == "user" and "max_models=3" in outcome.error


def test_sampler_weights_share_the_lru_and_never_take_a_loaded_slot(tmp_path):
    """Two sampler slots, three saved adapters: the least recently used folder leaves; a
    folder written again is dropped; a later load never lands in a slot another folder
    holds (the old cache reused the last slot after a drop and so served the wrong weights)."""
    model = LoraModel.from_config(tiny_qwen3_config(), torch.device("cpu"), torch.float32)
    residency = Residency(model, num_slots=1, max_models=4, sampler_slots=2)
    folders, first_A = [], {}
    for seed in range(4):
        model.add_adapter(0, AdapterSpec(rank=4, alpha=32), torch.Generator().manual_seed(seed))
        folder = str(tmp_path / f"adapter{seed}")
        checkpoints.save_sampler_weights(model, 0, Path(folder), "tiny")
        first_A[folder] = next(iter(model.adapter_weights(0).values())).A.detach().clone()
        folders.append(folder)

    def serves(folder: str) -> None:
        slot = residency.sampler_slot(folder)
        assert slot >= 1, "sampler weights sit in the sampler slots, after the training one"
        torch.testing.assert_close(next(iter(model.adapter_weights(slot).values())).A,
                                   first_A[folder], atol=0, rtol=0)

    f0, f1, f2, f3 = folders
    assert residency.sampler_slot(None) == BASE_SLOT
    serves(f0), serves(f1), serves(f0)  # f1 is now the least recently used
    serves(f2)
    assert set(residency.samplers) == {f0, f2}
    residency.forget_sampler(f0)  # f0 was saved again
    serves(f3)
    serves(f2)
    assert sorted(residency.samplers.values()) == [1, 2]
    with pytest.raises(UserError):  # a folder that holds no weights leaves the slots as they were
        residency.sampler_slot(str(tmp_path / "missing"))
    serves(f1)
    assert set(residency.samplers) == {f1, f2}


def test_the_offload_memory_budget_refuses_new_runs_not_kept_ones(tmp_path):
    """Each run's state (weights, grads, AdamW moments) stays in CPU memory once offloaded, so
    max_models runs could outgrow the machine (the kernel killed a worker at 22.6 GB): a new
    run that would pass max_offload_gib is refused with a user error; the runs already kept
    still train, offloading each other."""
    settings = load_settings(env={}, data_dir=str(tmp_path), max_lora_adapters=1,
                             max_models=64, train_micro_batch_size=8)
    model = LoraModel.from_config(tiny_qwen3_config(), torch.device("cpu"), torch.float32)
    one_run = Residency(model, 1, 1).state_bytes(AdapterSpec(rank=4, alpha=32))
    budget_gib = 2.2 * one_run / 2**30  # room for two offloaded runs, not three
    ex = Executor(model, dataclasses.replace(settings, max_offload_gib=budget_gib),
                  decode=lambda ids: "", eos_token_ids=[511])
    for i, m in enumerate(("a", "b", "c")):
        create(ex, m, seed=i)
        run_both((ex,), Plan(train=[fwdbwd(m, 1)]))
        run_both((ex,), Plan(barriers=[optim(m, 2)]))
    assert len(ex.residency.offloaded) == 2
    assert 0 < ex.residency.offloaded_bytes() <= ex.residency.budget_bytes
    refused = create(ex, "d")["create_model-d-None"]
    assert not refused.ok and refused.category == "user"
    assert "max_offload_gib" in refused.error and "2 runs" in refused.error
    for m in ("a", "b", "c"):  # the kept runs go on, each brought back in turn
        run_both((ex,), Plan(train=[fwdbwd(m, 3)]))


def test_released_runs_leave_memory_and_come_back_exactly(pair):
    """An idle run is released: weights, pending grads and AdamW moments go to one file in
    released_dir and leave both the device slot and the CPU copies; its next call reads them
    back and trains on exactly as the run that never left memory."""
    small, ref = pair
    for m in ("a", "b", "c"):
        create(small, m, seed=7)
        create(ref, m, seed=7)
    for m in ("a", "b", "c"):  # c resident, a offloaded, both with AdamW moments
        run_both(pair, Plan(train=[fwdbwd(m, 1)]))
        run_both(pair, Plan(barriers=[optim(m, 2)]))
    run_both(pair, Plan(train=[fwdbwd("c", 3)]))  # c holds grads not yet stepped
    assert "a" in small.residency.offloaded and small.residency.in_slot("c")

    small.run(Plan(releases=["a", "c"]))
    res = small.residency
    assert set(res.released) == {"a", "c"} and res.offloaded_bytes() == 0
    assert not res.offloaded and not res.in_slot("a") and not res.in_slot("c")
    assert small.runs["a"].adam is None and len(res.free_slots["train"]) == 1
    files = sorted(p.name for p in res.released_dir.iterdir())
    assert files == ["a.rank0.safetensors", "c.rank0.safetensors"]

    run_both(pair, Plan(barriers=[optim("c", 4)]))  # the grads written out step the same
    run_both(pair, Plan(train=[fwdbwd("a", 3)]))
    run_both(pair, Plan(barriers=[optim("a", 4)]))
    assert not res.released and not list(res.released_dir.iterdir())
    for m in ("a", "c"):
        assert small.runs[m].adam.step == ref.runs[m].adam.step == 2
        assert_same_state(pair, m)


def test_a_run_that_cannot_be_written_stays_in_memory(pair, tmp_path):
    small, _ = pair
    create(small, "a", seed=1)
    run_both((small,), Plan(train=[fwdbwd("a", 1)]))
    small.residency.released_dir = tmp_path / "file"
    small.residency.released_dir.write_text("not a folder")
    small.run(Plan(releases=["a"]))
    assert small.residency.in_slot("a") and not small.residency.released
    run_both((small,), Plan(barriers=[optim("a", 2)]))
