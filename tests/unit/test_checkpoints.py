"""Checkpoint folders: training state round trips, and sampler weights that peft can load.

Run: python -m pytest tests/unit/test_checkpoints.py -q
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from protocol.jobs import UserError
from tests.conftest import tiny_qwen3_config
from workers import checkpoints
from workers.checkpoints import (
    load_sampler_weights,
    load_training_state,
    save_sampler_weights,
    save_training_state,
)
from workers.model import AdapterSpec, LoraModel
from workers.training.losses import token_losses
from workers.training.optimizer import adamw_step

CPU = torch.device("cpu")
HP = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01}
TOKENS = [[5, 17, 300, 42, 9, 77, 128], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
TARGETS = [t[1:] + [7] for t in TOKENS]

# peft warns whenever a tied lm_head is targeted; we want exactly its default (adapter on
# lm_head only, embeddings untouched), which is what MultiLoraLinear computes.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def _trained(model: LoraModel, slot: int, spec: AdapterSpec, steps: int = 3):
    """An adapter in `slot` after a few cross-entropy steps (so B is non-zero)."""
    model.add_adapter(slot, spec, torch.Generator().manual_seed(slot + 1))
    state = None
    for _ in range(steps):
        lps = model.target_logprobs(TOKENS, TARGETS, [slot, slot])
        loss = sum(
            token_losses("cross_entropy", lp, {"weights": torch.ones_like(lp)}, {}).sum()
            for lp in lps
        )
        loss.backward()
        state, _ = adamw_step(model.adapter_parameters(slot), state, **HP, grad_clip_norm=1.0)
    assert all(w.B.abs().sum() > 0 for w in model.adapter_weights(slot).values())
    return state


def _logprobs(model: LoraModel, slot: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.target_logprobs(TOKENS, TARGETS, [slot, slot])


def test_training_state_round_trip(tiny_model, tmp_path):
    spec = AdapterSpec(rank=4, alpha=16.0, train_attn=True, train_mlp=False, train_unembed=True)
    state = _trained(tiny_model, 0, spec)
    folder = tmp_path / "ckpt" / "step-3"
    size = save_training_state(tiny_model, 0, state, folder, base_model="tiny-qwen3")
    assert size == sum(f.stat().st_size for f in folder.iterdir())
    assert sorted(p.name for p in tmp_path.joinpath("ckpt").iterdir()) == ["step-3"]

    spec2, weights, state2 = load_training_state(folder)
    assert spec2 == spec
    tiny_model.set_adapter_weights(1, spec2, weights)
    for (n0, w0), (n1, w1) in zip(
        tiny_model.adapter_weights(0).items(), tiny_model.adapter_weights(1).items(), strict=True
    ):
        assert n0 == n1 and torch.equal(w0.A, w1.A) and torch.equal(w0.B, w1.B)
        assert w0.scale == w1.scale
    assert state2.step == state.step
    for a, b in zip(
        state.exp_avg + state.exp_avg_sq, state2.exp_avg + state2.exp_avg_sq, strict=True
    ):
        assert torch.equal(a, b)
    # Moments line up with adapter_parameters order: shapes match pairwise.
    assert [p.shape for p in tiny_model.adapter_parameters(1)] == [m.shape for m in state2.exp_avg]
    for a, b in zip(_logprobs(tiny_model, 0), _logprobs(tiny_model, 1), strict=True):
        assert torch.equal(a, b)


def test_training_state_without_optimizer_and_overwrite(tiny_model, tmp_path):
    spec = AdapterSpec(rank=2, alpha=2.0)
    tiny_model.add_adapter(0, spec, torch.Generator().manual_seed(0))
    folder = tmp_path / "ckpt"
    save_training_state(tiny_model, 0, None, folder, base_model="tiny")
    state = _trained(tiny_model, 0, spec, steps=1)
    save_training_state(tiny_model, 0, state, folder, base_model="tiny")  # replaces
    _, weights, state2 = load_training_state(folder)
    assert state2 is not None and state2.step == 1
    B = weights["model.layers.0.self_attn.q_proj"][1]
    assert torch.equal(B, tiny_model.adapter_weights(0)["model.layers.0.self_attn.q_proj"].B)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folders left behind


def test_missing_folder_or_files_are_user_errors(tiny_model, tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        load_training_state(tmp_path / "nowhere")
    tiny_model.add_adapter(0, AdapterSpec(rank=2, alpha=2.0), torch.Generator().manual_seed(0))
    save_sampler_weights(tiny_model, 0, tmp_path / "s", base_model="tiny")
    with pytest.raises(UserError, match="tinkerq_state.json"):
        load_training_state(tmp_path / "s")
    (tmp_path / "s" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        load_sampler_weights(tmp_path / "s")
    with pytest.raises(UserError, match="slot 5"):
        save_sampler_weights(tiny_model, 5, tmp_path / "t", base_model="tiny")


def test_peft_state_dict_keys_match_ours(tiny_model, tmp_path):
    """Our file holds exactly the LoRA keys peft's own state dict has for these targets."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    spec = AdapterSpec(rank=4, alpha=8.0)
    tiny_model.add_adapter(0, spec, torch.Generator().manual_seed(0))
    save_sampler_weights(tiny_model, 0, tmp_path / "s", base_model="tiny")
    peft_model = get_peft_model(
        _unwrapped_hf(), LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.targets))
    )
    theirs = {k for k in get_peft_model_state_dict(peft_model, save_embedding_layers=False)}
    ours = set(load_file(str(tmp_path / "s" / "adapter_model.safetensors")))
    assert ours == theirs


def _unwrapped_hf():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        tiny_qwen3_config(), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@pytest.mark.parametrize(
    "spec",
    [AdapterSpec(rank=4, alpha=8.0), AdapterSpec(rank=2, alpha=5.0, train_mlp=False)],
    ids=["all", "attn+unembed"],
)
def test_sampler_weights_load_in_peft_and_match(tiny_model, tmp_path, spec):
    from peft import PeftModel

    _trained(tiny_model, 2, spec)
    folder = tmp_path / "sampler"
    save_sampler_weights(tiny_model, 2, folder, base_model="tiny-qwen3")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == spec.rank and config["target_modules"] == list(spec.targets)

    hf = _unwrapped_hf()
    base = LoraModel.from_config(tiny_qwen3_config(), CPU, torch.float32, seed=0).hf
    for (n, a), (_, b) in zip(hf.state_dict().items(), base.state_dict().items(), strict=True):
        assert torch.equal(a, b), n  # the same base weights as tiny_model
    peft_model = PeftModel.from_pretrained(hf, str(folder)).eval()

    with torch.no_grad():
        for tokens, targets, ours in zip(TOKENS, TARGETS, _logprobs(tiny_model, 2), strict=True):
            logits = peft_model(input_ids=torch.tensor([tokens])).logits[0]  # [S, V]
            theirs = torch.log_softmax(logits.float(), -1)[torch.arange(len(targets)), targets]
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    spec2, weights = load_sampler_weights(folder)
    assert spec2 == spec
    tiny_model.set_adapter_weights(3, spec2, weights)
    for a, b in zip(_logprobs(tiny_model, 2), _logprobs(tiny_model, 3), strict=True):
        assert torch.equal(a, b)


def test_start_up_removes_only_what_dead_writers_left(tmp_path):
    """A worker killed mid-save left `.<name>.tmp-*` folders that nothing removed. At start
    the worker removes this host's whose writer is gone and anyone's a day old; a live
    writer's folder (here: this process's, or another host's fresh one) and checkpoints stay."""
    run = tmp_path / "tenant" / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host, pid = socket.gethostname(), dead.stdout.strip()
    folders = {
        "dead": run / "weights" / f".step-1.tmp-{host}-{pid}-abc123",
        "dead_old": run / "weights" / f".a.b-c.old-{host}-{pid}-x_9",
        "dead_session": run / "sampler_weights" / "_session" / f".s:1.tmp-{host}-{pid}-q",
        "live": run / "weights" / f".step-2.tmp-{host}-{os.getpid()}-def456",
        "other_fresh": run / "weights" / ".step-3.tmp-elsewhere-1-ghi789",
        "other_stale": run / "sampler_weights" / ".s.tmp-elsewhere-2-jkl012",
        "checkpoint": run / "weights" / "step-1",
    }
    for folder in folders.values():
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    day_ago = time.time() - checkpoints.STALE_AFTER_S - 60
    os.utime(folders["other_stale"], (day_ago, day_ago))
    removed = checkpoints.remove_stale_temp(tmp_path)
    assert sorted(removed) == sorted(folders[k] for k in ("dead", "dead_old", "dead_session",
                                                          "other_stale"))
    assert all(folders[k].is_dir() for k in ("live", "other_fresh", "checkpoint"))


def test_a_save_names_its_writer(tiny_model, tmp_path, monkeypatch):
    """The temporary folder of a save carries this host and pid (what start-up reads)."""
    seen = []
    real = checkpoints._replace_dir
    monkeypatch.setattr(checkpoints, "_replace_dir",
                        lambda src, dst: (seen.append(src.name), real(src, dst)))
    tiny_model.add_adapter(0, AdapterSpec(rank=4, alpha=16.0), torch.Generator().manual_seed(0))
    save_sampler_weights(tiny_model, 0, tmp_path / "s1", "tiny")
    assert seen and checkpoints._writer(seen[0]) == (socket.gethostname(), os.getpid())
