"""The engine's executor on a tiny model: every job kind, and failure isolation in a tick."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from config import load_settings
from protocol.jobs import Job
from workers.executor import Executor
from workers.scheduler import Plan


@pytest.fixture
def executor(tiny_model, tmp_path):
    settings = load_settings(env={}, data_dir=str(tmp_path), max_lora_adapters=2, max_models=2)
    return Executor(tiny_model, settings, decode=lambda ids: "", eos_token_ids=[511])


def request_body(model_id: str, seq_id: int, data: list[types.Datum],
                 loss_fn="cross_entropy", forward_only=False) -> bytes:
    """A forward_backward (or, with forward_only, forward) request as the API enqueues it."""
    request = types.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id,
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn),
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def fwdbwd_body(model_id: str, seq_id: int, tokens: list[int], loss_fn="cross_entropy",
                forward_only=False) -> bytes:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "weights": np.ones(len(tokens) - 1, dtype=np.float32)},
    )
    return request_body(model_id, seq_id, [datum], loss_fn, forward_only)


def job(kind: str, body, model_id=None, seq_id=None, rid=None) -> Job:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Job(request_id=rid or f"{kind}-{model_id}-{seq_id}", kind=kind, payload=payload,
               model_id=model_id, seq_id=seq_id)


def create(executor: Executor, model_id: str, rank: int = 4, seed: int = 0):
    body = {"model_id": model_id, "base_model": "tiny",
            "lora": {"rank": rank, "seed": seed, "train_attn": True, "train_mlp": True,
                     "train_unembed": True}}
    return executor.run(Plan(barriers=[job("create_model", body, model_id)]))


def test_bad_request_fails_alone_in_a_shared_tick(executor):
    create(executor, "a")
    create(executor, "b")
    good = job("forward_backward", fwdbwd_body("a", 1, [1, 2, 3, 4]), "a", 1)
    bad = job("forward_backward", fwdbwd_body("b", 1, [1, 2, 999, 4]), "b", 1)
    outcomes = executor.run(Plan(train=[good, bad]))
    assert outcomes[good.request_id].ok
    out = deserialize_forward_backward_output(outcomes[good.request_id].proto)
    assert out.metrics["loss:sum"] > 0 and len(out.loss_fn_outputs[0]["logprobs"].data) == 3
    failure = outcomes[bad.request_id]
    assert not failure.ok and failure.category == "user" and "[0, 512)" in failure.error


def test_payloads_that_do_not_decode_fail_alone(executor):
    """A payload is decoded once, when its job is made; one that does not decode costs no
    tokens of the tick's budget and fails its own job as bad input when the job runs."""
    create(executor, "a")
    good = job("forward_backward", fwdbwd_body("a", 1, [1, 2, 3, 4]), "a", 1)
    broken = job("forward_backward", b"\xff\x00 not protobuf", "a", 2, rid="broken-fb")
    not_json = job("optim_step", b"{not json", "a", 3, rid="broken-optim")
    assert good.num_tokens == 3 and broken.num_tokens == 0 and broken.invalid
    outcomes = executor.run(Plan(train=[good, broken], barriers=[not_json]))
    assert outcomes[good.request_id].ok
    for rid in ("broken-fb", "broken-optim"):
        assert not outcomes[rid].ok and outcomes[rid].category == "user", outcomes[rid]
    assert "not JSON" in outcomes["broken-optim"].error


def test_more_models_than_allowed_is_a_user_error(executor):
    create(executor, "a")
    create(executor, "b")
    outcome = create(executor, "c")["create_model-c-None"]
    assert outcome.category == "user" and "max_models=2" in outcome.error


def test_train_save_load_and_sample(executor, tmp_path):
    create(executor, "a", seed=7)
    body = fwdbwd_body("a", 1, [5, 6, 7, 8, 9])
    before = executor.run(Plan(train=[job("forward_backward", body, "a", 1)]))
    adam = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
            "weight_decay": 0.0, "grad_clip_norm": 1.0}
    step = executor.run(Plan(barriers=[job("optim_step", {"adam_params": adam}, "a", 2)]))
    assert step["optim_step-a-2"].json["metrics"]["grad_norm:mean"] > 0
    after = executor.run(Plan(train=[job("forward", fwdbwd_body("a", 3, [5, 6, 7, 8, 9],
                                                                 forward_only=True), "a", 3)]))
    loss = [deserialize_forward_backward_output(o.proto).metrics["loss:sum"]
            for o in (*before.values(), *after.values())]
    assert loss[1] < loss[0]

    state_dir = tmp_path / "ckpt" / "weights" / "s1"
    saved = executor.run(Plan(barriers=[job(
        "save_weights", {"checkpoint_dir": str(state_dir), "tinker_path": "tinker://a/weights/s1"},
        "a", 4)]))["save_weights-a-4"]
    assert saved.ok and saved.checkpoint["name"] == "s1" and saved.checkpoint["size_bytes"] > 0
    loaded = executor.run(Plan(barriers=[job("load_weights", {
        "model_id": "b", "create": True, "checkpoint_dir": str(state_dir), "optimizer": True,
        "tinker_path": "tinker://a/weights/s1", "base_model": "tiny"}, "b")]))
    assert loaded["load_weights-b-None"].ok
    lp = [deserialize_forward_backward_output(executor.run(Plan(train=[job(
        "forward", fwdbwd_body(m, 5, [5, 6, 7, 8, 9], forward_only=True), m, 5)]))[
        f"forward-{m}-5"].proto).loss_fn_outputs[0]["logprobs"].data for m in ("a", "b")]
    np.testing.assert_array_equal(lp[0], lp[1])

    sampler_dir = tmp_path / "ckpt" / "sampler_weights" / "x"
    executor.run(Plan(barriers=[job("save_weights_for_sampler", {
        "checkpoint_dir": str(sampler_dir), "tinker_path": None,
        "sampling_session_id": "s:sample:0"}, "a", 6)]))
    sample = {"prompt": [5, 6], "num_samples": 2, "max_tokens": 3, "temperature": 0.0,
              "top_k": -1, "top_p": 1.0, "seed": 1, "stop_strings": [], "stop_token_ids": [],
              "stop_at_eos": False, "prompt_logprobs": True, "topk_prompt_logprobs": 0,
              "adapter_dir": str(sampler_dir)}
    res = executor.run(Plan(samples=[job("sample", sample, rid="s1")]))["s1"]
    decoded = deserialize_sample_response(res.proto)
    assert [len(s.tokens) for s in decoded.sequences] == [3, 3]
    with torch.no_grad():  # greedy from the saved adapter = greedy continuation of model a
        first = executor.model.target_logprobs([[5, 6]], [[6, decoded.sequences[0].tokens[0]]],
                                               [executor.runs["a"].slot])[0]
    assert first[1].item() == pytest.approx(decoded.sequences[0].logprobs[0], abs=1e-5)
    assert decoded.prompt_logprobs[0] is None  # the SDK turns the leading NaN into None


def test_save_weights_external_writes_the_peft_files_maybe_encrypted(executor, tmp_path):
    """An export is the sampler weights' peft folder; with recipients, each file is replaced
    by its age encryption, which the recipient's identity decrypts to the same bytes."""
    import pyrage

    create(executor, "a", seed=3)
    identity = pyrage.x25519.Identity.generate()
    folders = {n: tmp_path / n for n in ("ref", "plain", "locked")}
    saves = [
        job("save_weights_for_sampler", {"checkpoint_dir": str(folders["ref"]),
                                         "tinker_path": "tinker://a/sampler_weights/ref"}, "a", 1),
        job("save_weights_external", {"checkpoint_dir": str(folders["plain"]),
                                      "tinker_path": "tinker://a/external_weights/plain",
                                      "age_recipients": None}, "a", 2),
        job("save_weights_external", {"checkpoint_dir": str(folders["locked"]),
                                      "tinker_path": "tinker://a/external_weights/locked",
                                      "age_recipients": [str(identity.to_public())]}, "a", 3),
    ]
    out = executor.run(Plan(barriers=saves))
    plain = out["save_weights_external-a-2"]
    assert plain.json == {"path": "tinker://a/external_weights/plain",
                          "type": "save_weights_external",
                          "size_bytes": plain.checkpoint["size_bytes"]}
    assert plain.checkpoint["kind"] == "external" and plain.checkpoint["size_bytes"] > 0
    names = ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in folders["ref"].iterdir()) == names
    assert sorted(p.name for p in folders["locked"].iterdir()) == [f"{n}.age" for n in names]
    ref_config = (folders["ref"] / names[0]).read_bytes()
    assert (folders["plain"] / names[0]).read_bytes() == ref_config
    locked = {n: pyrage.decrypt((folders["locked"] / f"{n}.age").read_bytes(), [identity])
              for n in names}
    assert locked[names[0]] == ref_config
    assert locked[names[1]] == (folders["plain"] / names[1]).read_bytes()
    # The export names the unembedding as Tinker's exports do; every tensor is the sampler's.
    ref, plain = (load_file(folders[n] / names[1]) for n in ("ref", "plain"))
    head = "base_model.model.lm_head.lora_B.weight"
    assert head in ref and head not in plain
    renamed = {k.replace(".lm_head.", ".model.unembed_tokens."): v for k, v in ref.items()}
    assert renamed.keys() == plain.keys()
    assert all(renamed[k].equal(plain[k]) for k in plain)


def test_random_seed_replays_unseeded_inits_and_samples(tmp_path):
    """With random_seed set, a create without a seed and a sample without one come out the
    same in a second worker; a different seed gives another adapter and other samples."""
    from tests.conftest import tiny_qwen3_config
    from workers.model import LoraModel

    def run(seed: int) -> tuple[list[torch.Tensor], list[list[int]]]:
        model = LoraModel.from_config(tiny_qwen3_config(), torch.device("cpu"), torch.float32,
                                      seed=0)
        settings = load_settings(env={}, data_dir=str(tmp_path / str(seed)), random_seed=seed)
        ex = Executor(model, settings, decode=lambda ids: "", eos_token_ids=[511])
        body = {"model_id": "a", "base_model": "tiny",
                "lora": {"rank": 4, "train_attn": True, "train_mlp": True,
                         "train_unembed": True}}  # (no seed)
        assert ex.run(Plan(barriers=[job("create_model", body, "a")]))[
            "create_model-a-None"].ok
        weights = [t.detach().clone() for t in model.adapter_parameters(ex.runs["a"].slot)]
        sample = {"prompt": [5, 6], "num_samples": 3, "max_tokens": 4, "temperature": 1.0,
                  "top_k": -1, "top_p": 1.0, "seed": None, "stop_strings": [],
                  "stop_token_ids": [], "stop_at_eos": False, "prompt_logprobs": False,
                  "topk_prompt_logprobs": 0}  # (the base model)
        out = ex.run(Plan(samples=[job("sample", sample, rid="s")]))["s"]
        assert out.ok, out
        return weights, [s.tokens for s in deserialize_sample_response(out.proto).sequences]

    first, again, other = run(11), run(11), run(12)
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0], strict=True))
    assert first[1] == again[1]
    assert not all(torch.equal(a, b) for a, b in zip(first[0], other[0], strict=True))
    assert first[1] != other[1]


def test_random_seed_below_minus_one_is_refused(tmp_path):
    from config import SettingsError

    with pytest.raises(SettingsError, match="random_seed=-2"):
        load_settings(env={}, data_dir=str(tmp_path), random_seed=-2)
    assert load_settings(env={"TINKERQ_RANDOM_SEED": "7"}, data_dir=str(tmp_path)).random_seed == 7


def test_a_models_training_does_not_depend_on_who_shares_its_ticks(tiny_model, tmp_path):
    """Model a takes an RL-style step (an importance-sampling loss with per-token advantages,
    Adam at a high learning rate) alone, then in a fresh worker beside model b, whose
    forward_backward and optim_step run in the same ticks: a's logprobs afterwards agree up
    to float rounding (the packed pass sums in another order). Had b's datum reached a's
    gradient, they would move by far more (a trained on both datums, checked below)."""
    adam = {"learning_rate": 0.07, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
            "weight_decay": 0.0, "grad_clip_norm": 0.0}
    mine, theirs = [5, 6, 7, 8, 9, 10], [40, 41, 300, 2, 9]

    def is_body(model_id: str, seq_id: int, sequences: list[list[int]]) -> bytes:
        data = [types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                            "logprobs": np.full(len(tokens) - 1, -6.0, dtype=np.float32),
                            "advantages": np.linspace(-1.0, 1.0, len(tokens) - 1,
                                                      dtype=np.float32)})
            for tokens in sequences]
        return request_body(model_id, seq_id, data, "importance_sampling")

    def logprobs_of_a_after(batches: dict[str, list[list[int]]], folder: str) -> np.ndarray:
        settings = load_settings(env={}, data_dir=str(tmp_path / folder), max_lora_adapters=2,
                                 max_models=2)
        ex = Executor(tiny_model, settings, decode=lambda ids: "", eos_token_ids=[511])
        for m in batches:
            create(ex, m, seed=3)
        ex.run(Plan(train=[job("forward_backward", is_body(m, 1, batches[m]), m, 1)
                           for m in batches]))
        for m in batches:  # one barrier per model and tick, as the scheduler plans them
            ex.run(Plan(barriers=[job("optim_step", {"adam_params": adam}, m, 2)]))
        out = ex.run(Plan(train=[job("forward", fwdbwd_body("a", 3, mine, forward_only=True),
                                     "a", 3)]))
        return np.array(deserialize_forward_backward_output(out["forward-a-3"].proto)
                        .loss_fn_outputs[0]["logprobs"].data)

    alone = logprobs_of_a_after({"a": [mine]}, "alone")
    shared = logprobs_of_a_after({"a": [mine], "b": [theirs]}, "shared")
    leaked = logprobs_of_a_after({"a": [mine, theirs]}, "leaked")
    np.testing.assert_allclose(shared, alone, atol=1e-4, rtol=0)
    assert np.abs(leaked - alone).max() > 0.1, np.abs(leaked - alone).max()
